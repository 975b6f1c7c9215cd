//! `gamma_mlp` on the emulator.

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::gamma_mlp as gamma_kernel;
use speckv_kernels::params::{FeatureAccum, MlpWeights};

use super::Emulator;
use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};

impl Emulator {
    /// `gamma_mlp`: every sequence's γ for its next step from its accumulator. Returns (γ,
    /// predicted tokens per step, `GAMMA_*` flags) per sequence.
    pub fn gamma_mlp(
        &self,
        controller: &Controller,
        weights: &MlpWeights,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
        if accum.is_empty() {
            return Err(Error::Empty { what: "batch" });
        }
        if self.block == 0 || self.block > 1024 {
            return Err(Error::BadBlockSize(self.block));
        }
        let n = accum.len();
        let cost = controller.cost_table();
        emu::launch_schedules(
            "gamma_mlp_f32",
            |seed| {
                let mut gammas = vec![0i32; n];
                let mut expected = vec![0f32; n];
                let mut flags = vec![0u32; n];
                let params = controller.params(
                    n,
                    compression_code,
                    fallback,
                    GammaPtrs {
                        weights,
                        accum: accum.as_ptr(),
                        compression: std::ptr::null(),
                        cost: cost
                            .as_ref()
                            .map(|c| c.as_ptr())
                            .unwrap_or(std::ptr::null()),
                        gammas_out: gammas.as_mut_ptr(),
                        expected_out: expected.as_mut_ptr(),
                        flags_out: flags.as_mut_ptr(),
                    },
                );
                let mut l = Launch::new(
                    "gamma_mlp_f32",
                    (n as u32).div_ceil(self.block),
                    self.block,
                    0,
                )
                .input("weights", std::slice::from_ref(weights))
                .input("accum", accum)
                .output("gammas_out", &mut gammas)
                .output("expected_out", &mut expected)
                .output("flags_out", &mut flags)
                .schedule(seed)
                .math(self.math);
                if let Some(c) = cost.as_ref() {
                    l = l.input("cost", c);
                }
                // SAFETY: the weights are one struct, accumulators and outputs have `n` elements,
                // the cost table (if any) one entry per candidate, `Controller::new` checked the
                // candidates, and the sanitizer checks every access against these buffers.
                unsafe { emu::launch_checked(&l, || gamma_kernel::gamma_mlp(&params)) }?;
                Ok((gammas, expected, flags))
            },
            |(g, e, f)| {
                let mut v = bytemuck::cast_slice::<i32, u8>(g).to_vec();
                v.extend_from_slice(bytemuck::cast_slice(e));
                v.extend_from_slice(bytemuck::cast_slice(f));
                v
            },
        )
        .map_err(Error::from)
    }
}

//! The γ decision on the device: the controller's weights uploaded once, `gamma_mlp` launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::{FeatureAccum, MlpWeights};

use super::{ByValue, CudaBackend, KernelFn};
use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};

/// Block size of `gamma_mlp` launches (one thread per sequence).
pub const GAMMA_BLOCK: u32 = 128;

/// The controller's weights and cost table on the device, uploaded once.
pub struct DeviceController {
    controller: Controller,
    weights: cudarc::driver::CudaSlice<u8>,
    cost: Option<cudarc::driver::CudaSlice<f32>>,
}

impl CudaBackend {
    /// Uploads the controller's weights (once).
    pub fn upload_controller(&self, controller: &Controller) -> Result<DeviceController> {
        let w = controller.mlp.to_f32();
        let weights = self.stream.clone_htod(bytemuck::bytes_of(&w))?;
        let cost = match controller.cost_table() {
            Some(c) => Some(self.stream.clone_htod(&c)?),
            None => None,
        };
        Ok(DeviceController {
            controller: controller.clone(),
            weights,
            cost,
        })
    }

    /// Launches `gamma_mlp` on device accumulators, writing device γ (no synchronisation).
    pub fn launch_gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &cudarc::driver::CudaSlice<u8>,
        gammas: &mut cudarc::driver::CudaSlice<i32>,
        batch: usize,
        compression_code: f32,
        fallback: i32,
    ) -> Result<()> {
        if accum.len() < batch * std::mem::size_of::<FeatureAccum>()
            || gammas.len() < batch
            || batch == 0
        {
            return Err(Error::Other(format!(
                "gamma_mlp: buffers smaller than the batch of {batch}"
            )));
        }
        let st = &self.stream;
        let (w, _g0) = dc.weights.device_ptr(st);
        let (a, _g1) = accum.device_ptr(st);
        let (c, _g2) = match dc.cost.as_ref() {
            Some(x) => {
                let (p, g) = x.device_ptr(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (g, _g3) = gammas.device_ptr_mut(st);
        let params = dc.controller.params(
            batch,
            compression_code,
            fallback,
            GammaPtrs {
                weights: w as *const MlpWeights,
                accum: a as *const FeatureAccum,
                compression: std::ptr::null(),
                cost: c as *const f32,
                gammas_out: g as *mut i32,
                expected_out: std::ptr::null_mut(),
                flags_out: std::ptr::null_mut(),
            },
        );
        let cfg = LaunchConfig {
            grid_dim: ((batch as u32).div_ceil(GAMMA_BLOCK), 1, 1),
            block_dim: (GAMMA_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let arg = ByValue(params);
        let mut b = st.launch_builder(self.function(KernelFn::GammaMlp));
        b.arg(&arg);
        // SAFETY: sizes checked above; the weights and cost table were uploaded for this
        // controller; the buffers outlive the launch.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// γ per sequence from host accumulators (upload, launch, download).
    pub fn gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<Vec<i32>> {
        let d_accum = self
            .stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let mut gammas = self.stream.alloc_zeros::<i32>(accum.len())?;
        self.launch_gamma_mlp(
            dc,
            &d_accum,
            &mut gammas,
            accum.len(),
            compression_code,
            fallback,
        )?;
        Ok(self.stream.clone_dtoh(&gammas)?)
    }

    /// Mean time of one `gamma_mlp` launch for `batch` device-resident sequences (CUDA events).
    pub fn time_gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &[FeatureAccum],
        iters: u32,
    ) -> Result<Duration> {
        let d_accum = self
            .stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let mut gammas = self.stream.alloc_zeros::<i32>(accum.len())?;
        self.time_cold(iters, || {
            self.launch_gamma_mlp(dc, &d_accum, &mut gammas, accum.len(), 0.0, 4)
        })
    }
}

impl CudaBackend {
    /// Mean time (cold L2) of one `softmax_stats_v2` launch over `logits` accumulating into
    /// per-row features, with (`decide`) or without the γ decision fused into its final merge: the
    /// difference is what the fused decision adds to a drafted position.
    pub fn time_stats_decide(
        &self,
        dc: &DeviceController,
        logits: &crate::stats::Logits<'_>,
        iters: u32,
        decide: bool,
    ) -> Result<Duration> {
        use speckv_kernels::params::{GammaMlpParams, RowStats, STATS_ACCUMULATE, STATS_DECIDE};
        let rows = logits.rows();
        let st = &self.stream;
        let d_logits = st.clone_htod(logits.data().bytes())?;
        let mut d_out = st.alloc_zeros::<u8>(rows * std::mem::size_of::<RowStats>())?;
        let accum0 = vec![FeatureAccum::EMPTY; rows];
        let mut d_accum = st.clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(&accum0))?;
        let mut d_gammas = st.alloc_zeros::<i32>(rows)?;
        let mut d_flags = st.alloc_zeros::<u32>(rows)?;
        let (_, plan) = crate::plan::softmax_stats_v2(
            rows as u32,
            logits.vocab() as u32,
            logits.dtype(),
            self.sm_count,
        );
        let mut scratch = super::stats::StatsScratch::new(self, rows, &plan)?;
        let (lp, _g0) = d_logits.device_ptr(st);
        let (op, _g1) = d_out.device_ptr_mut(st);
        let (ap, _g2) = d_accum.device_ptr_mut(st);
        let (gp, _g3) = d_gammas.device_ptr_mut(st);
        let (fp, _g4) = d_flags.device_ptr_mut(st);
        let (w, _g5) = dc.weights.device_ptr(st);
        let (c, _g6) = match dc.cost.as_ref() {
            Some(x) => {
                let (p, g) = x.device_ptr(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let gparams: GammaMlpParams = dc.controller.params(
            rows,
            0.0,
            4,
            GammaPtrs {
                weights: w as *const MlpWeights,
                accum: ap as *const FeatureAccum,
                compression: std::ptr::null(),
                cost: c as *const f32,
                gammas_out: gp as *mut i32,
                expected_out: std::ptr::null_mut(),
                flags_out: fp as *mut u32,
            },
        );
        let d_decision = st.clone_htod(bytemuck::bytes_of(&Pod(gparams)))?;
        let (dp, _g7) = d_decision.device_ptr(st);
        let opts = crate::stats::StatsOptions {
            temperature: 1.0,
            sample: false,
            seed: 0,
            step: 0,
            accumulate: crate::stats::Accumulate::Add,
        };
        let base = crate::stats::stats_params(
            logits,
            &opts,
            lp as *const u8,
            op as *mut speckv_kernels::params::RowStats,
            ap as *mut FeatureAccum,
        );
        let mut p2 = scratch.params(st, base, &plan);
        p2.flags = STATS_ACCUMULATE | if decide { STATS_DECIDE } else { 0 };
        p2.decision = if decide {
            dp as *const GammaMlpParams
        } else {
            std::ptr::null()
        };
        // SAFETY: every buffer above has `rows` entries or the plan's size and lives to the end of
        // this function; the decision parameters point at them.
        self.time_cold(iters, || unsafe {
            self.launch_stats_v2(logits.dtype(), p2, &plan)
        })
    }
}

/// `GammaMlpParams` as bytes (a `#[repr(C)]` struct of pointers and scalars with no padding: its
/// size is asserted in the kernels crate).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Pod(speckv_kernels::params::GammaMlpParams);
// SAFETY: `GammaMlpParams` is `#[repr(C)]`, 104 bytes of 8-byte pointers, i32/u32/f32 fields and
// an i32 array with no padding (asserted in params.rs); any bit pattern is a valid value to copy.
unsafe impl bytemuck::Zeroable for Pod {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Pod {}

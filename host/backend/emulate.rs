//! Launches the kernels' own source on the CPU emulator of the CUDA execution model
//! ([`speckv_kernels::emu`]) with host buffers: the path `cargo test` uses to check every kernel
//! without a GPU. Slow by design (one coroutine per GPU thread); use the CPU backend for speed.
//!
//! Every launch runs with the sanitizer on (its buffers registered with their lengths and
//! directions), under several seeded schedules ([`emu::schedule_seeds`], `SPECKV_EMU_SCHEDULES`),
//! whose outputs must agree bit for bit; [`Emulator::math`] selects exact or GPU-approximate
//! `ex2` / `lg2` / `rcp`.

use speckv_kernels::emu::{self, Launch, Math};
use speckv_kernels::gamma_mlp as gamma_kernel;
use speckv_kernels::gemv::{self as gemv_kernel, Fp16, Int8, Nf4};
use speckv_kernels::params::{FeatureAccum, MlpWeights, RowStats};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};
use speckv_kernels::verify as verify_kernel;

use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};
use crate::stats::{check_accum, check_block, stats_params, Logits, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};
use crate::weights::gemv::{check as check_gemv, params as gemv_params, raw, MAX_M};
use crate::weights::quant::QMatrix;

/// The emulator as a backend: a block size and a math mode for every launch.
#[derive(Clone, Copy, Debug)]
pub struct Emulator {
    pub block: u32,
    pub math: Math,
}

impl Emulator {
    /// `block` threads per block, exact math.
    pub fn new(block: u32) -> Emulator {
        Emulator {
            block,
            math: Math::Exact,
        }
    }

    /// `ex2` / `lg2` / `rcp` as the GPU's `.approx.ftz` instructions compute them.
    pub fn gpu_math(mut self, seed: u64) -> Emulator {
        self.math = Math::GpuApprox { seed };
        self
    }

    /// `softmax_stats`; `accum` is updated as the CUDA kernel would update it.
    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        opts.validate()?;
        self.softmax_stats_unchecked_options(logits, opts, accum)
    }

    /// `softmax_stats` with the options not validated, as a launch from another host (an engine
    /// loading the PTX, the C ABI's CUDA path) could make it: the kernel flags a bad temperature.
    pub fn softmax_stats_unchecked_options(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        check_block(self.block)?;
        check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
        let rows = logits.rows();
        let initial: Option<Vec<FeatureAccum>> = accum.as_ref().map(|a| a.to_vec());
        let dtype = logits.data().dtype();
        let name = format!("softmax_stats_{}", dtype.name());
        let (out, acc) = emu::launch_schedules(
            &name,
            |seed| {
                let mut out = vec![RowStats::default(); rows];
                let mut acc = initial.clone();
                let accum_ptr = acc
                    .as_mut()
                    .map(|a| a.as_mut_ptr())
                    .unwrap_or(std::ptr::null_mut());
                let params = stats_params(
                    logits,
                    opts,
                    logits.data().bytes().as_ptr(),
                    out.as_mut_ptr(),
                    accum_ptr,
                );
                let mut l = Launch::new(
                    name.as_str(),
                    rows as u32,
                    self.block,
                    kernel::shared_bytes(self.block),
                )
                .input("logits", logits.data().bytes())
                .output("out", &mut out)
                .schedule(seed)
                .math(self.math);
                if let Some(a) = acc.as_mut() {
                    l = l.output("accum", a);
                }
                // SAFETY: the registered buffers are the kernel's whole world: `Logits::new`
                // checked that the logits cover every row the kernel reads, `out` has one slot per
                // row and the accumulators (if any) too (`check_accum`); the sanitizer checks
                // every access against them.
                unsafe {
                    match logits.data() {
                        LogitsData::F32(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<F32>(&params))
                        }
                        LogitsData::F16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<F16>(&params))
                        }
                        LogitsData::Bf16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<Bf16>(&params))
                        }
                    }
                }?;
                Ok((out, acc))
            },
            |(out, acc)| {
                let mut v = bytemuck::cast_slice::<RowStats, u8>(out).to_vec();
                if let Some(a) = acc {
                    v.extend_from_slice(bytemuck::cast_slice(a));
                }
                v
            },
        )?;
        if let (Some(dst), Some(src)) = (accum, acc) {
            dst.copy_from_slice(&src);
        }
        Ok(out)
    }

    /// `verify` on validated input.
    pub fn verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate()?;
        self.verify_unchecked_values(v)
    }

    /// `verify` with only the shapes validated, so γ_b and draft tokens reach the kernel as a
    /// device-side controller could write them (the kernel flags bad ones per sequence).
    pub fn verify_unchecked_values(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate_shapes()?;
        check_block(self.block)?;
        let name = format!("verify_{}", v.target.dtype().name());
        emu::launch_schedules(
            &name,
            |seed| {
                let mut out = VerifyOutput::new(v.batch, v.gamma_max);
                let (draft, draft_t) = match v.draft {
                    DraftDist::Logits { data, temperature } => (data.bytes(), Some(temperature)),
                    DraftDist::Probs(p) => (bytemuck::cast_slice::<f32, u8>(p), None),
                };
                let params = v.params(VerifyPtrs {
                    target: v.target.bytes().as_ptr(),
                    draft: draft.as_ptr(),
                    draft_tokens: v.draft_tokens.as_ptr(),
                    gammas: v.gammas.as_ptr(),
                    target_temperature: v.target_temperature.as_ptr(),
                    draft_temperature: draft_t.map(|t| t.as_ptr()).unwrap_or(std::ptr::null()),
                    accepted: out.accepted.as_mut_ptr(),
                    emitted: out.emitted.as_mut_ptr(),
                    emitted_count: out.emitted_count.as_mut_ptr(),
                    ratios: out.ratios.as_mut_ptr(),
                    counterfactual: out.counterfactual.as_mut_ptr(),
                    seq_flags: out.flags.as_mut_ptr(),
                });
                let mut l = Launch::new(
                    name.as_str(),
                    v.batch as u32,
                    self.block,
                    verify_kernel::shared_bytes(self.block),
                )
                .input("target_logits", v.target.bytes())
                .input("draft", draft)
                .input("draft_tokens", v.draft_tokens)
                .input("gammas", v.gammas)
                .input("target_temperature", v.target_temperature)
                .output("accepted", &mut out.accepted)
                .output("emitted", &mut out.emitted)
                .output("emitted_count", &mut out.emitted_count)
                .output("ratios", &mut out.ratios)
                .output("counterfactual", &mut out.counterfactual)
                .output("seq_flags", &mut out.flags)
                .schedule(seed)
                .math(self.math);
                if let Some(t) = draft_t {
                    l = l.input("draft_temperature", t);
                }
                // SAFETY: `validate_shapes` checked every input length against the shapes the
                // kernel reads (token ids and γ are checked by the kernel itself before use), the
                // outputs are sized by `VerifyOutput::new` for the same shapes, and the sanitizer
                // checks every access against the registered buffers.
                unsafe {
                    match v.target {
                        LogitsData::F32(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<F32>(&params))
                        }
                        LogitsData::F16(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<F16>(&params))
                        }
                        LogitsData::Bf16(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<Bf16>(&params))
                        }
                    }
                }?;
                Ok(out)
            },
            verify_fingerprint,
        )
        .map_err(Error::from)
    }

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

    /// y `[m, out]` = x `[m, in]` · Wᵀ (one warp per output row).
    pub fn gemv(&self, w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        check_gemv(w, x, m)?;
        check_block(self.block)?;
        let (out, _) = w.shape();
        let (wb, scales) = raw(w);
        let tile = gemv_kernel::tile_for(m as u32)
            .ok_or_else(|| Error::Other(format!("M = {m} above {MAX_M}")))?;
        let name = format!("gemv_{}_m{tile}", w.format().name());
        let rows_per_block = self.block / 32;
        emu::launch_schedules(
            &name,
            |seed| {
                let mut y = vec![0f32; m * out];
                let sp = scales.map(|s| s.as_ptr()).unwrap_or(std::ptr::null());
                let p = gemv_params(w, m, wb.as_ptr(), sp, x.as_ptr(), y.as_mut_ptr());
                let mut l = Launch::new(
                    name.as_str(),
                    (out as u32).div_ceil(rows_per_block),
                    self.block,
                    0,
                )
                .input("weight", wb)
                .input("x", x)
                .output("y", &mut y)
                .schedule(seed)
                .math(self.math);
                if let Some(s) = scales {
                    l = l.input("scales", s);
                }
                macro_rules! go {
                    ($fmt:ty) => {
                        match tile {
                            1 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 1>(&p)),
                            2 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 2>(&p)),
                            4 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 4>(&p)),
                            8 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 8>(&p)),
                            _ => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 16>(&p)),
                        }
                    };
                }
                // SAFETY: `check_gemv` matched x to the matrix, y has m·out slots, the weight
                // bytes and scales come from a QMatrix whose invariants (lengths from its shape)
                // hold, and the sanitizer checks every access against these buffers.
                unsafe {
                    match w {
                        QMatrix::Fp16 { .. } => go!(Fp16),
                        QMatrix::Int8 { .. } => go!(Int8),
                        QMatrix::Nf4 { .. } => go!(Nf4),
                    }
                }?;
                Ok(y)
            },
            |y| bytemuck::cast_slice::<f32, u8>(y).to_vec(),
        )
        .map_err(Error::from)
    }
}

fn verify_fingerprint(o: &VerifyOutput) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(bytemuck::cast_slice(&o.accepted));
    v.extend_from_slice(bytemuck::cast_slice(&o.emitted));
    v.extend_from_slice(bytemuck::cast_slice(&o.emitted_count));
    v.extend_from_slice(bytemuck::cast_slice(&o.ratios));
    v.extend_from_slice(bytemuck::cast_slice(&o.counterfactual));
    v.extend_from_slice(bytemuck::cast_slice(&o.flags));
    v
}

/// Runs `softmax_stats` on the emulator with `block` threads per row (exact math).
pub fn softmax_stats(
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
    block: u32,
) -> Result<Vec<RowStats>> {
    Emulator::new(block).softmax_stats(logits, opts, accum)
}

/// Runs `verify` on the emulator with `block` threads per sequence (exact math).
pub fn verify(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify(v)
}

/// Runs `verify` with only the shapes validated (see [`Emulator::verify_unchecked_values`]).
pub fn verify_unchecked_values(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify_unchecked_values(v)
}

/// Runs `gamma_mlp` on the emulator (see [`Emulator::gamma_mlp`]).
pub fn gamma_mlp(
    controller: &Controller,
    weights: &MlpWeights,
    accum: &[FeatureAccum],
    compression_code: f32,
    fallback: i32,
    block: u32,
) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
    Emulator::new(block).gamma_mlp(controller, weights, accum, compression_code, fallback)
}

/// Runs the GEMV on the emulator with `block` threads per block (see [`Emulator::gemv`]).
pub fn gemv(w: &QMatrix, x: &[f32], m: usize, block: u32) -> Result<Vec<f32>> {
    Emulator::new(block).gemv(w, x, m)
}

//! Launches the kernels' own source on the CPU emulator of the CUDA execution model
//! ([`speckv_kernels::emu`]) with host buffers: the path `cargo test` uses to check every kernel
//! without a GPU. Slow by design (one coroutine per GPU thread); use the CPU backend for speed.

use speckv_kernels::emu::{self, LaunchConfig};
use speckv_kernels::gamma_mlp as gamma_kernel;
use speckv_kernels::params::MlpWeights;
use speckv_kernels::params::{FeatureAccum, RowStats};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};
use speckv_kernels::verify as verify_kernel;

use crate::controller::{Controller, GammaPtrs};
use crate::error::Result;
use crate::stats::{check_accum, check_block, stats_params, Logits, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};

/// Runs `softmax_stats` on the emulator with `block` threads per row.
pub fn softmax_stats(
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
    block: u32,
) -> Result<Vec<RowStats>> {
    opts.validate()?;
    check_block(block)?;
    check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
    let mut out = vec![RowStats::default(); logits.rows()];
    let accum_ptr = match accum {
        Some(a) => a.as_mut_ptr(),
        None => std::ptr::null_mut(),
    };
    let params = stats_params(
        logits,
        opts,
        logits.data().bytes().as_ptr(),
        out.as_mut_ptr(),
        accum_ptr,
    );
    let cfg = LaunchConfig {
        grid: logits.rows() as u32,
        block,
        shared_bytes: kernel::shared_bytes(block),
    };
    // SAFETY: `Logits::new` checked that the logits cover every row the kernel reads, `out` has
    // one slot per row, `check_accum` that the accumulators (if any) do too, and the launch shape
    // is the kernel's documented one; the kernel writes each row's results from one thread only.
    unsafe {
        match logits.data() {
            LogitsData::F32(_) => emu::launch(cfg, || kernel::softmax_stats::<F32>(&params))?,
            LogitsData::F16(_) => emu::launch(cfg, || kernel::softmax_stats::<F16>(&params))?,
            LogitsData::Bf16(_) => emu::launch(cfg, || kernel::softmax_stats::<Bf16>(&params))?,
        }
    }
    Ok(out)
}

/// Runs `verify` on the emulator with `block` threads per sequence.
pub fn verify(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    v.validate()?;
    verify_unchecked_values(v, block)
}

/// Runs `verify` with only the shapes validated, so γ_b and draft tokens reach the kernel as a
/// device-side controller could write them (the kernel flags bad ones per sequence).
pub fn verify_unchecked_values(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    v.validate_shapes()?;
    check_block(block)?;
    let mut out = VerifyOutput::new(v.batch, v.gamma_max);
    let (draft, draft_t) = match v.draft {
        DraftDist::Logits { data, temperature } => (data.bytes().as_ptr(), temperature.as_ptr()),
        DraftDist::Probs(p) => (p.as_ptr() as *const u8, std::ptr::null()),
    };
    let params = v.params(VerifyPtrs {
        target: v.target.bytes().as_ptr(),
        draft,
        draft_tokens: v.draft_tokens.as_ptr(),
        gammas: v.gammas.as_ptr(),
        target_temperature: v.target_temperature.as_ptr(),
        draft_temperature: draft_t,
        accepted: out.accepted.as_mut_ptr(),
        emitted: out.emitted.as_mut_ptr(),
        emitted_count: out.emitted_count.as_mut_ptr(),
        ratios: out.ratios.as_mut_ptr(),
        counterfactual: out.counterfactual.as_mut_ptr(),
        seq_flags: out.flags.as_mut_ptr(),
    });
    let cfg = LaunchConfig {
        grid: v.batch as u32,
        block,
        shared_bytes: verify_kernel::shared_bytes(block),
    };
    // SAFETY: `validate_shapes` checked every input length against the shapes the kernel reads
    // (token ids and γ are checked by the kernel itself before use), the outputs are sized by
    // `VerifyOutput::new` for the same shapes, and each sequence's outputs are written by one
    // thread of its own block.
    unsafe {
        match v.target {
            LogitsData::F32(_) => emu::launch(cfg, || verify_kernel::verify::<F32>(&params))?,
            LogitsData::F16(_) => emu::launch(cfg, || verify_kernel::verify::<F16>(&params))?,
            LogitsData::Bf16(_) => emu::launch(cfg, || verify_kernel::verify::<Bf16>(&params))?,
        }
    }
    Ok(out)
}

/// Runs `gamma_mlp` on the emulator: every sequence's γ for its next step from its accumulator.
/// Returns (γ, predicted tokens per step) per sequence.
pub fn gamma_mlp(
    controller: &Controller,
    weights: &MlpWeights,
    accum: &[FeatureAccum],
    compression_code: f32,
    fallback: i32,
    block: u32,
) -> Result<(Vec<i32>, Vec<f32>)> {
    if accum.is_empty() {
        return Err(crate::Error::Empty { what: "batch" });
    }
    if block == 0 || block > 1024 {
        return Err(crate::Error::BadBlockSize(block));
    }
    let n = accum.len();
    let mut gammas = vec![0i32; n];
    let mut expected = vec![0f32; n];
    let cost = controller.cost_table();
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
        },
    );
    let cfg = LaunchConfig {
        grid: (n as u32).div_ceil(block),
        block,
        shared_bytes: 0,
    };
    // SAFETY: the weights are one struct, accumulators and outputs have `n` elements, the cost
    // table (if any) one entry per candidate, and `Controller::new` checked the candidates; each
    // thread writes only its own sequence's outputs.
    unsafe { emu::launch(cfg, || gamma_kernel::gamma_mlp(&params))? };
    Ok((gammas, expected))
}

//! Launches the kernels' own source on the CPU emulator of the CUDA execution model
//! ([`speckv_kernels::emu`]) with host buffers: the path `cargo test` uses to check every kernel
//! without a GPU. Slow by design (one coroutine per GPU thread); use the CPU backend for speed.

use speckv_kernels::emu::{self, LaunchConfig};
use speckv_kernels::params::{FeatureAccum, RowStats};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};

use crate::error::Result;
use crate::logits::{check_accum, check_block, stats_params, Logits, LogitsData, StatsOptions};

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

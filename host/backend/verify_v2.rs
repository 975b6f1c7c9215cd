//! The launch sequence of a stand-alone v2 verification, shared by the CUDA backend and the
//! caller-context path: the draft rows' statistics (logits mode with a positive draft temperature
//! somewhere), `verify_v2_rows`, `verify_v2_sample` — parameters built from v1's, scratch in one
//! workspace laid out by `speckv_kernels::verify::full_plan_v2`.

use speckv_kernels::params::{
    RowStats, SoftmaxStatsV2Params, StatsState, VerifyParams, VerifyV2Params, VERIFY_DRAFT_PROBS,
};
use speckv_kernels::verify::FullPlanV2;

use crate::backend::cuda::KernelFn;
use crate::stats::Dtype;

/// One launch of the sequence.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    DraftStats(SoftmaxStatsV2Params),
    Verify(KernelFn, VerifyV2Params),
}

/// A launch: entry, grid, block, shared bytes and its parameters.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub f: KernelFn,
    pub grid: u32,
    pub block: u32,
    pub shared: usize,
    pub step: Step,
}

/// The launches for `p` (v1's parameters, device addresses) with the workspace at `ws` (device
/// address, `plan.bytes` bytes, its counter regions zero).
pub fn launches(p: &VerifyParams, dtype: Dtype, plan: &FullPlanV2, ws: u64) -> Vec<Launch> {
    let mut out = Vec::with_capacity(3);
    let logits_mode = p.flags & VERIFY_DRAFT_PROBS == 0;
    let rows = p.batch * p.gamma_max;
    let draft_stats = if logits_mode && rows > 0 {
        let s = &plan.stats;
        let sp = SoftmaxStatsV2Params {
            logits: p.draft,
            out: (ws + plan.draft_stats as u64) as *mut RowStats,
            accum: std::ptr::null_mut(),
            partials: (ws + plan.stats_partials as u64) as *mut StatsState,
            counters: (ws + plan.stats_counters as u64) as *mut u32,
            decision: std::ptr::null(),
            seed: 0,
            step: 0,
            rows,
            vocab: p.vocab,
            row_stride: p.draft_stride,
            temperature: 1.0,
            flags: 0,
            splits: s.splits,
            chunk_vecs: s.chunk_vecs,
            temperature_group: p.gamma_max,
            temperatures: p.draft_temperature,
            stop: std::ptr::null(),
        };
        out.push(Launch {
            f: KernelFn::SoftmaxStatsV2(dtype),
            grid: s.grid,
            block: s.block,
            shared: s.shared_bytes,
            step: Step::DraftStats(sp),
        });
        (ws + plan.draft_stats as u64) as *const RowStats
    } else {
        std::ptr::null()
    };
    let v = &plan.verify;
    let p2 = VerifyV2Params {
        base: *p,
        draft_stats,
        workspace: ws as *mut u8,
        row_splits: v.row_splits,
        row_chunk_vecs: v.row_chunk_vecs,
        sample_splits: v.sample_splits,
        sample_chunk_vecs: v.sample_chunk_vecs,
    };
    out.push(Launch {
        f: KernelFn::VerifyV2Rows(dtype),
        grid: v.row_grid,
        block: v.row_block,
        shared: v.shared_bytes,
        step: Step::Verify(KernelFn::VerifyV2Rows(dtype), p2),
    });
    out.push(Launch {
        f: KernelFn::VerifyV2Sample(dtype),
        grid: v.sample_grid,
        block: v.sample_block,
        shared: v.shared_bytes,
        step: Step::Verify(KernelFn::VerifyV2Sample(dtype), p2),
    });
    out
}

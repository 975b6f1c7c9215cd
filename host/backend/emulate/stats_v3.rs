//! `softmax_stats_v3` on the emulator: a batch's rows, each with its own options and accumulator,
//! in one launch.

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::params::{FeatureAccum, RowStats, SoftmaxStatsV3Params, StatsRow, StatsState};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, PlanV2, F16, F32};

use super::Emulator;
use crate::error::{Error, Result};
use crate::stats::{
    check_block, check_stats_rows, fill_stats_rows, Logits, LogitsData, StatsOptions,
};

impl Emulator {
    /// `softmax_stats_v3` with the plan for a GPU of `sm_count` SMs: launch row k gives the
    /// statistics of logits row `rows[k]` with `opts[k]` and updates `accums[k]` as its options
    /// say. Tokens are drawn as a one-row launch of `opts[k]` draws them (Philox stream 0).
    pub fn softmax_stats_v3(
        &self,
        logits: &Logits<'_>,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        sm_count: u32,
    ) -> Result<Vec<RowStats>> {
        let plan = crate::plan::softmax_stats_v3(
            rows.len() as u32,
            logits.vocab() as u32,
            logits.data().dtype(),
            sm_count,
        )
        .1;
        self.softmax_stats_v3_planned(logits, rows, opts, accums, &plan)
    }

    /// [`Emulator::softmax_stats_v3`] with an explicit plan (any split count, chunk and block
    /// size).
    pub fn softmax_stats_v3_planned(
        &self,
        logits: &Logits<'_>,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        plan: &PlanV2,
    ) -> Result<Vec<RowStats>> {
        check_stats_rows(rows, opts, accums.len(), logits.rows())?;
        let mut desc = Vec::with_capacity(rows.len());
        fill_stats_rows(rows, opts, &mut desc);
        self.softmax_stats_v3_unchecked(logits, &desc, accums, plan)
    }

    /// `softmax_stats_v3` with row descriptions as another host could write them (any row,
    /// stream, slot or temperature): the kernel flags what it cannot follow, and two accumulating
    /// rows naming one slot are the sanitizer's write race (an error). Only the plan and the
    /// buffers are checked.
    pub fn softmax_stats_v3_unchecked(
        &self,
        logits: &Logits<'_>,
        desc: &[StatsRow],
        accums: &mut [FeatureAccum],
        plan: &PlanV2,
    ) -> Result<Vec<RowStats>> {
        check_block(plan.block)?;
        let n = desc.len();
        let splits = plan.splits.max(1) as usize;
        if plan.grid as usize != n * splits || plan.chunk_vecs == 0 {
            return Err(Error::Other(format!(
                "inconsistent v3 plan {plan:?} for {n} rows"
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let dtype = logits.data().dtype();
        let name = format!("softmax_stats_v3_{}", dtype.name());
        let initial = accums.to_vec();
        let (out, acc) = emu::launch_schedules(
            &name,
            |seed| {
                let mut out = vec![RowStats::default(); n];
                let mut acc = initial.clone();
                let mut partials = vec![StatsState::EMPTY; n * splits];
                let mut counters = vec![0u32; n];
                let params = SoftmaxStatsV3Params {
                    logits: logits.data().bytes().as_ptr(),
                    out: out.as_mut_ptr(),
                    accum: if acc.is_empty() {
                        std::ptr::null_mut()
                    } else {
                        acc.as_mut_ptr()
                    },
                    partials: partials.as_mut_ptr(),
                    counters: counters.as_mut_ptr(),
                    row_params: desc.as_ptr(),
                    rows: n as u32,
                    logit_rows: logits.rows() as u32,
                    vocab: logits.vocab() as u32,
                    row_stride: logits.row_stride() as u32,
                    accum_slots: acc.len() as u32,
                    splits: plan.splits,
                    chunk_vecs: plan.chunk_vecs,
                    _pad: 0,
                };
                let l = Launch::new(name.as_str(), plan.grid, plan.block, plan.shared_bytes)
                    .input("logits", logits.data().bytes())
                    .input("row_params", desc)
                    .output("out", &mut out)
                    .output("accum", &mut acc)
                    .output("partials", &mut partials)
                    .output("counters", &mut counters)
                    .schedule(seed)
                    .math(self.math);
                // SAFETY: the registered buffers are the kernel's whole world: `Logits::new`
                // checked that the logits cover `logit_rows` rows, `out` and the scratch have a
                // slot per launch row, the counters start at zero, descriptions past the logits
                // or the accumulators are flagged by the kernel, and the sanitizer checks every
                // access against the buffers.
                unsafe {
                    match logits.data() {
                        LogitsData::F32(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats_v3::<F32>(&params))
                        }
                        LogitsData::F16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats_v3::<F16>(&params))
                        }
                        LogitsData::Bf16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats_v3::<Bf16>(&params))
                        }
                    }
                }?;
                if counters.iter().any(|&c| c != 0) {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: format!("arrival counters not reset: {counters:?}"),
                    });
                }
                Ok((out, acc))
            },
            |(out, acc)| {
                let mut v = bytemuck::cast_slice::<RowStats, u8>(out).to_vec();
                v.extend_from_slice(bytemuck::cast_slice(acc));
                v
            },
        )?;
        accums.copy_from_slice(&acc);
        Ok(out)
    }
}

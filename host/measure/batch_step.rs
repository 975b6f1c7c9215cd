//! The host's wall clock of a plain batched decode step as the batched decode loop makes it, on
//! any batched state ([`BatchPass`]): the step of every sequence with its LM head, then the
//! statistics of every sequence's row where the logits are (on CUDA one `softmax_stats_v3`
//! launch, a copy up of the row descriptions and a copy back of the statistics, which waits for
//! the step). `bench step --batch-sizes` reports it next to the step's device time, which leaves
//! out the statistics, the copies and the host's part.

use std::time::{Duration, Instant};

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::backend::forward::MAX_STEP;
use crate::error::{Error, Result};
use crate::model::BatchPass;
use crate::stats::{Accumulate, StatsOptions};

/// Mean host time of one plain greedy decode step of every sequence of `pass` at cache length
/// `at`, over `iters` steps after an untimed one (which captures a device state's graph). The
/// caches are first filled to `at` positions (token 0, no logits) and cut back to `at` after
/// every step, so each step attends over `at` positions; what they held before is overwritten.
pub fn time_plain_decode_step(pass: &mut dyn BatchPass, at: usize, iters: u32) -> Result<Duration> {
    let seqs = pass.lens().len();
    if iters == 0 || seqs == 0 || at >= pass.capacity() {
        return Err(Error::Other(format!(
            "timing a decode step at cache length {at}, {iters} times, over {seqs} sequences: \
             needs at least one step, one sequence and caches of {} positions (these hold {})",
            at.saturating_add(1),
            pass.capacity()
        )));
    }
    for s in 0..seqs {
        pass.truncate_seq(s, 0)?;
    }
    let per = MAX_STEP / seqs;
    let mut filled = 0;
    let mut tokens = Vec::with_capacity(MAX_STEP);
    while filled < at {
        let m = per.min(at - filled);
        tokens.clear();
        tokens.resize(seqs * m, 0);
        pass.step_batch_resident(&tokens, false)?;
        filled += m;
    }
    let one = vec![0u32; seqs];
    let rows: Vec<usize> = (0..seqs).collect();
    let greedy = StatsOptions {
        temperature: 0.0,
        sample: false,
        seed: 0,
        step: 0,
        accumulate: Accumulate::No,
    };
    let opts = vec![greedy; seqs];
    let mut accums = vec![FeatureAccum::EMPTY; seqs];
    let mut out: Vec<RowStats> = Vec::with_capacity(seqs);
    let mut step = |pass: &mut dyn BatchPass| -> Result<()> {
        pass.step_batch_resident(&one, true)?;
        pass.rows_stats(&rows, &opts, &mut accums, &mut out)?;
        for s in 0..seqs {
            pass.truncate_seq(s, at)?;
        }
        Ok(())
    };
    step(pass)?;
    let t = Instant::now();
    for _ in 0..iters {
        step(pass)?;
    }
    Ok(t.elapsed() / iters)
}

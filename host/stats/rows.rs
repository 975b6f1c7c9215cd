//! The CPU twin of `softmax_stats_v3`: rows described one by one ([`StatsRow`]: which logits row,
//! its seed, random step, Philox stream, temperature, flags and accumulator slot), each read once,
//! in parallel — the same statistics, flags and tokens as the kernel. The statistics pass of one
//! set of options ([`super::cpu::softmax_stats_into`]) is the case of rows 0..n drawing from
//! streams 0..n.

use rayon::prelude::*;
use speckv_kernels::params::{
    FeatureAccum, RowStats, StatsRow, STATS_ACCUMULATE, STATS_ACCUM_RESET, STATS_SAMPLE,
};

use super::cpu::{segment_dispatch, Partial, MIN_SEGMENT};
use super::{check_temperature, Logits, LogitsData};
use crate::error::{Error, Result};

/// One row of a pass: where it starts in the data, its (valid) temperature, whether it samples,
/// and its Philox (seed, step, stream).
#[derive(Clone, Copy)]
pub(super) struct RowJob {
    pub base: usize,
    pub temperature: f32,
    pub sample: bool,
    pub rng: (u64, u64, u32),
}

/// The statistics of `n` rows of `vocab` elements of `data`, row k as `job(k)` says, on `threads`
/// threads, into `out` (cleared first); `partials` is working memory kept by the caller.
pub(super) fn rows_into(
    threads: usize,
    data: LogitsData<'_>,
    vocab: usize,
    n: usize,
    job: impl Fn(usize) -> RowJob + Sync,
    partials: &mut Vec<Partial>,
    out: &mut Vec<RowStats>,
) {
    // Several segments per row when rows are fewer than threads.
    let per_row = if n >= threads {
        1
    } else {
        (2 * threads)
            .div_ceil(n.max(1))
            .min(vocab.div_ceil(MIN_SEGMENT))
            .max(1)
    };
    let seg_len = vocab.div_ceil(per_row);
    let inv_t = |t: f32| if t == 0.0 { 1.0 } else { 1.0 / t };
    partials.clear();
    partials.resize(n * per_row, Partial::EMPTY);
    partials.par_iter_mut().enumerate().for_each(|(at, slot)| {
        let (k, seg) = (at / per_row, at % per_row);
        let j = job(k);
        let (start, end) = (seg * seg_len, ((seg + 1) * seg_len).min(vocab));
        let rng = (j.sample && j.temperature != 0.0).then_some(j.rng);
        *slot = segment_dispatch(data, j.base, start, end, inv_t(j.temperature), rng);
    });
    out.clear();
    out.extend(partials.chunks(per_row).enumerate().map(|(k, parts)| {
        let j = job(k);
        let it = inv_t(j.temperature);
        let mut p = Partial::EMPTY;
        for q in parts {
            p.merge(q, it);
        }
        let greedy = j.temperature == 0.0;
        p.finish(it, greedy, !greedy && j.sample)
    }));
}

/// Descriptions a launch over `logit_rows` rows and `accum_slots` accumulators can follow, checked
/// on the host: every row present, every temperature valid, only the flags v3 reads
/// (`STATS_SAMPLE`, `STATS_ACCUMULATE`, `STATS_ACCUM_RESET`), every accumulating row a slot of its
/// own.
pub fn check_row_descs(desc: &[StatsRow], logit_rows: usize, accum_slots: usize) -> Result<()> {
    let known = STATS_SAMPLE | STATS_ACCUMULATE | STATS_ACCUM_RESET;
    let mut taken = vec![false; accum_slots];
    for (k, d) in desc.iter().enumerate() {
        if d.row as usize >= logit_rows {
            return Err(Error::Other(format!(
                "row description {k} reads logits row {} of {logit_rows}",
                d.row
            )));
        }
        check_temperature(d.temperature)?;
        if d.flags & !known != 0 {
            return Err(Error::Other(format!(
                "row description {k} has flags {:#x}: only sample (1), accumulate (2) and reset \
                 (4) are per-row options",
                d.flags
            )));
        }
        if d.flags & STATS_ACCUMULATE != 0 {
            let s = d.accum_slot as usize;
            match taken.get_mut(s) {
                None => {
                    return Err(Error::Other(format!(
                        "row description {k} accumulates into slot {s} of {accum_slots}"
                    )))
                }
                Some(true) => {
                    return Err(Error::Other(format!(
                        "row descriptions share accumulator slot {s}: each accumulating row \
                         needs its own"
                    )))
                }
                Some(t) => *t = true,
            }
        }
    }
    Ok(())
}

/// The statistics of the described rows of `logits` on `threads` threads (launch row k at
/// `out[k]`), the accumulators updated as each row's flags say: `softmax_stats_v3`'s results.
pub fn softmax_stats_rows(
    threads: usize,
    logits: &Logits<'_>,
    desc: &[StatsRow],
    accum: &mut [FeatureAccum],
) -> Result<Vec<RowStats>> {
    check_row_descs(desc, logits.rows(), accum.len())?;
    let stride = logits.row_stride();
    let job = |k: usize| {
        let d = &desc[k];
        RowJob {
            base: d.row as usize * stride,
            temperature: d.temperature,
            sample: d.flags & STATS_SAMPLE != 0,
            rng: (d.seed, d.step, d.stream),
        }
    };
    let (mut partials, mut out) = (Vec::new(), Vec::new());
    rows_into(
        threads,
        logits.data(),
        logits.vocab(),
        desc.len(),
        job,
        &mut partials,
        &mut out,
    );
    for (d, r) in desc.iter().zip(&out) {
        if d.flags & STATS_ACCUMULATE != 0 {
            let a = &mut accum[d.accum_slot as usize];
            if d.flags & STATS_ACCUM_RESET != 0 {
                *a = FeatureAccum::EMPTY;
            }
            a.push(r.entropy, r.confidence, r.flags);
        }
    }
    Ok(out)
}

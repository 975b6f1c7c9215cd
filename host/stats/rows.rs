//! The CPU twin of `softmax_stats_v3`: rows described one by one ([`StatsRow`]: which logits row,
//! its seed, random step, Philox stream, temperature, flags and accumulator slot), each read once,
//! in parallel — the same statistics, flags and tokens as the kernel. The statistics pass of one
//! set of options ([`super::cpu::softmax_stats_into`]) is the case of rows 0..n drawing from
//! streams 0..n. Also [`row_summary`], one row's reduction, which the CPU verification reads.

use speckv_kernels::params::{
    FeatureAccum, RowStats, StatsRow, STATS_ACCUMULATE, STATS_ACCUM_RESET, STATS_SAMPLE,
};

use super::cpu::{rows_into, segment_dispatch, RowJob};
use super::{check_temperature, Logits, LogitsData};
use crate::error::{Error, Result};

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

/// One row read once: its max, argmax, Σ e^{(x−max)/T} (f64), `ROW_NONFINITE` if it held a NaN or
/// +inf, and — with `rng` = (seed, step, stream) — the Gumbel-max winner, formed exactly as the
/// kernels form it. Used by the CPU verification path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowSummary {
    pub max: f32,
    pub argmax: u32,
    pub sum: f64,
    pub flags: u32,
    pub key_idx: u32,
}

pub(crate) fn row_summary(
    data: LogitsData<'_>,
    base: usize,
    len: usize,
    inv_t: f32,
    rng: Option<(u64, u64, u32)>,
) -> RowSummary {
    let p = segment_dispatch(data, base, 0, len, inv_t, rng);
    RowSummary {
        max: p.max,
        argmax: p.argmax,
        sum: p.sum,
        flags: p.flags,
        key_idx: p.key_idx,
    }
}

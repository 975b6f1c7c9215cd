//! A model's forward pass together with its decode state, wherever it runs: the CPU pass over its
//! KV caches ([`CpuPass`](super::CpuPass)), or the device program ([`device`](super::device)) on CUDA or on the emulator. The
//! decode loops drive a [`Pass`], so `generate`, `profile` and `bench decode` run on any of them.

use speckv_kernels::params::{FeatureAccum, RowStats};

use super::Config;
use crate::backend::forward::MAX_STEP;
use crate::error::{Error, Result};
pub use crate::stats::DraftStop;
use crate::stats::{Accumulate, StatsOptions};
use crate::verify::{VerifyBatch, VerifyOutput, VerifyStep};
use crate::weights::cpu::MAX_M;

/// A forward pass with its KV cache.
pub trait Pass {
    /// Appends `tokens` and returns the logits `[keep, vocab]` of the last `keep` positions,
    /// borrowed until the next call.
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]>;
    /// Positions in the cache.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets every position from `len` on (rejected drafts).
    fn truncate(&mut self, len: usize);
    /// Makes room for `positions` in total (an error where the cache cannot grow that far).
    fn reserve(&mut self, positions: usize) -> Result<()>;
    /// The model's hyper-parameters.
    fn cfg(&self) -> &Config;
    /// Where the pass runs ("cpu", "cuda", "emulator").
    fn backend(&self) -> &'static str;
    /// A draft step: appends `tokens` and returns the statistics of the last position's logits
    /// (`accum` updated as `opts` says), computed where the logits are — the device's
    /// `softmax_stats` kernel for a device pass, which then reads back one `RowStats` and the
    /// accumulator instead of a vocabulary of logits. With `want_row` the row itself comes back
    /// too (sampling verifies against the draft's distribution). With `stop` the per-token
    /// stopping rule decides too, where the statistics are computed — in `softmax_stats_v2`'s
    /// epilogue (`STATS_STOP`) on a device pass — and `stop.state` is updated as the kernel
    /// updates it (see [`DraftStop`]).
    fn run_stats(
        &mut self,
        tokens: &[u32],
        opts: &StatsOptions,
        accum: &mut [FeatureAccum; 1],
        want_row: bool,
        stop: Option<&mut DraftStop<'_>>,
    ) -> Result<(RowStats, Option<&[f32]>)>;
    /// A plain decoding step: appends `tokens` and returns the next token of the last position's
    /// logits — the argmax (greedy, `opts.temperature` 0) or the Gumbel-max draw of `opts` —
    /// chosen where the logits are. An error for a row with no token to choose (NaN, +inf or
    /// only −inf logits).
    fn next_token(&mut self, tokens: &[u32], opts: &StatsOptions) -> Result<u32>;
    /// A draft phase whose γ is chosen before drafting (no per-token stop): appends `feed`, then
    /// each draft but the last, and returns in `out` every draft's token (the argmax, or when
    /// sampling the Gumbel-max draw of step `opts.step + j`) and statistics, the step's
    /// accumulator over them (reset by the first), and with `want_rows` their logits rows
    /// `[gamma, vocab]`. A flagged row is an error. By default one [`Pass::run_stats`] per draft; a
    /// CUDA pass enqueues the whole phase, each pass's token fed from the previous pass's
    /// statistics in device memory, and waits once.
    fn draft_run(
        &mut self,
        feed: &[u32],
        gamma: usize,
        opts: &StatsOptions,
        want_rows: bool,
        out: &mut DraftRun,
    ) -> Result<()> {
        draft_run_stepwise(self, feed, gamma, opts, want_rows, out)
    }
    /// A verification step: appends `tokens` (the pending token and the drafts) and verifies the
    /// drafts against the logits of every position, where they are — the device's `verify`
    /// kernels for a device pass, which then reads back the verdict only.
    fn run_verify(
        &mut self,
        tokens: &[u32],
        step: &VerifyStep<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()>;
}

/// The checks of a draft step before anything runs (a refused step leaves the cache as it was):
/// the options, and the stopping rule's inputs when it decides too.
pub(crate) fn check_stats_call(opts: &StatsOptions, stop: Option<&DraftStop<'_>>) -> Result<()> {
    opts.validate()?;
    if let Some(s) = stop {
        s.check(opts)?;
    }
    Ok(())
}

/// What [`Pass::draft_run`] returns: each draft's token and statistics, the step's accumulator,
/// and the drafts' rows when asked (empty otherwise).
#[derive(Clone, Debug)]
pub struct DraftRun {
    pub tokens: Vec<u32>,
    pub stats: Vec<RowStats>,
    pub accum: FeatureAccum,
    pub rows: Vec<f32>,
}

impl Default for DraftRun {
    fn default() -> Self {
        DraftRun {
            tokens: Vec::new(),
            stats: Vec::new(),
            accum: FeatureAccum::EMPTY,
            rows: Vec::new(),
        }
    }
}

impl DraftRun {
    /// Room for `gamma` drafts and `rows` floats of their rows: a loop that reuses it allocates
    /// nothing per step.
    pub fn with_capacity(gamma: usize, rows: usize) -> DraftRun {
        DraftRun {
            tokens: Vec::with_capacity(gamma),
            stats: Vec::with_capacity(gamma),
            accum: FeatureAccum::EMPTY,
            rows: Vec::with_capacity(rows),
        }
    }

    fn clear(&mut self) {
        self.tokens.clear();
        self.stats.clear();
        self.accum = FeatureAccum::EMPTY;
        self.rows.clear();
    }
}

/// The checks of a draft phase before anything runs: 1..=15 drafts, something to feed, options
/// that choose a token (sampling with a temperature draws one).
pub(crate) fn check_draft_run(feed: &[u32], gamma: usize, opts: &StatsOptions) -> Result<()> {
    opts.validate()?;
    if feed.is_empty() {
        return Err(Error::Empty { what: "draft feed" });
    }
    if gamma == 0 || gamma >= MAX_M {
        return Err(Error::Other(format!(
            "a draft phase of {gamma} drafts: 1 to {} are allowed",
            MAX_M - 1
        )));
    }
    if opts.temperature > 0.0 && !opts.sample {
        return Err(Error::Other(
            "a sampled draft phase draws its tokens: `sample` must be set".to_string(),
        ));
    }
    Ok(())
}

/// The options of draft `j` of a phase: its own random step, the accumulator reset by the first.
pub(crate) fn draft_options(opts: &StatsOptions, j: usize) -> StatsOptions {
    StatsOptions {
        step: opts.step + j as u64,
        accumulate: if j == 0 {
            Accumulate::Reset
        } else {
            Accumulate::Add
        },
        ..*opts
    }
}

/// [`Pass::draft_run`] one [`Pass::run_stats`] at a time (the host learns each token before the
/// next pass).
pub fn draft_run_stepwise(
    pass: &mut (impl Pass + ?Sized),
    feed: &[u32],
    gamma: usize,
    opts: &StatsOptions,
    want_rows: bool,
    out: &mut DraftRun,
) -> Result<()> {
    check_draft_run(feed, gamma, opts)?;
    out.clear();
    let mut accum = [FeatureAccum::EMPTY];
    for j in 0..gamma {
        let o = draft_options(opts, j);
        let last = out.tokens.last().copied();
        let input = match &last {
            None => feed,
            Some(t) => std::slice::from_ref(t),
        };
        let (st, row) = pass.run_stats(input, &o, &mut accum, want_rows, None)?;
        let x = token_of(&st, &o)?;
        if let Some(r) = row {
            out.rows.extend_from_slice(r);
        }
        out.tokens.push(x);
        out.stats.push(st);
    }
    out.accum = accum[0];
    Ok(())
}

/// Index of the largest logit, ties to the lower index (as the kernels break them); an error for a
/// row holding NaN or +inf, or only −inf (there is no token to choose).
pub fn argmax(row: &[f32], step: usize) -> Result<u32> {
    if let Some(i) = row.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
        return Err(Error::NonFiniteLogits {
            step,
            what: format!("logit {} at token {i}", row[i]),
        });
    }
    let (i, v) = row
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
            if v > b.1 {
                (i, v)
            } else {
                b
            }
        });
    if v == f32::NEG_INFINITY {
        return Err(Error::NonFiniteLogits {
            step,
            what: "a row of only −inf logits".to_string(),
        });
    }
    Ok(i as u32)
}

/// The token a row's statistics chose (the Gumbel-max draw; the argmax when greedy), or the error
/// of a flagged row.
pub(crate) fn token_of(st: &RowStats, opts: &StatsOptions) -> Result<u32> {
    let t = if opts.temperature == 0.0 {
        st.argmax
    } else {
        st.sampled
    };
    if st.flags != 0 {
        return Err(Error::NonFiniteLogits {
            step: opts.step as usize,
            what: format!("a flagged row (flags {:#x})", st.flags),
        });
    }
    u32::try_from(t).map_err(|_| {
        Error::Other("no token was drawn: a sampled step needs `sample` set".to_string())
    })
}

/// [`Pass::next_token`] of a device pass: the statistics kernel chooses, one `RowStats` comes
/// back.
pub(crate) fn resident_next_token(
    pass: &mut (impl Pass + ?Sized),
    tokens: &[u32],
    opts: &StatsOptions,
) -> Result<u32> {
    let (st, _) = pass.run_stats(tokens, opts, &mut [FeatureAccum::EMPTY], false, None)?;
    token_of(&st, opts)
}

/// A decode state of several sequences stepped together, the same number of positions m each
/// ([`CpuPass::new_batch`](super::CpuPass::new_batch), and the device executors' batched mode,
/// [`EmulatedForward::new_batch`] and [`CudaForward::new_batch`]); the batched decode loops drive
/// it. Its single-sequence
/// [`Pass`] calls are errors.
///
/// [`EmulatedForward::new_batch`]: super::device::EmulatedForward::new_batch
/// [`CudaForward::new_batch`]: super::device::CudaForward::new_batch
pub trait BatchPass: Pass {
    /// Every sequence's positions in the cache.
    fn lens(&self) -> &[usize];
    /// Positions each sequence's cache holds at most.
    fn capacity(&self) -> usize;
    /// One step of every sequence: `tokens` holds m tokens per sequence, sequence by sequence
    /// (at most 16 in all); returns the logits `[seqs · m, vocab]`.
    fn step_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// [`BatchPass::step_batch`] leaving the logits where they are computed — none without
    /// `logits` (the LM head is skipped) — for [`BatchPass::logits_rows`] to read the rows wanted.
    fn step_batch_resident(&mut self, tokens: &[u32], logits: bool) -> Result<()>;
    /// Appends to `out` the logits of `rows` (indices into the last step's `seqs · m` rows).
    fn logits_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()>;
    /// The statistics of rows of the last step, computed where its logits are: `rows[k]` with
    /// `opts[k]` (its own seed, random step and accumulate mode), `accums[k]` updated as they say;
    /// into `out` (cleared first). On a device: one statistics launch for every row and one
    /// read-back of every `RowStats` and accumulator — no logits row crosses the bus.
    fn rows_stats(
        &mut self,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        out: &mut Vec<RowStats>,
    ) -> Result<()>;
    /// Verifies the last step's logits where they are, as the target rows `[seqs, γmax + 1,
    /// vocab]` of `v` (`v.target` is not read; `v.draft` holds the draft's rows when sampling,
    /// empty when greedy); only the verdict comes back.
    fn verify_step(&mut self, v: &VerifyBatch<'_>, out: &mut VerifyOutput) -> Result<()>;
    /// Forgets every position of sequence `seq` from `len` on.
    fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()>;
}

/// A batched state of `seqs` sequences: 1 to 16 (one position each in a step of at most 16 rows).
pub(crate) fn check_seqs(seqs: usize) -> Result<()> {
    if seqs == 0 || seqs > MAX_STEP {
        return Err(Error::Other(format!(
            "{seqs} sequences in a batch: 1 to {MAX_STEP} (one position each in a step of at most \
             {MAX_STEP} rows)"
        )));
    }
    Ok(())
}

/// `rows` of the last batched step's `step_rows` logits rows are there.
pub(crate) fn check_rows(rows: &[usize], step_rows: usize) -> Result<()> {
    match rows.iter().find(|&&r| r >= step_rows) {
        Some(r) => Err(Error::Other(format!(
            "logits row {r} of a step that left {step_rows} rows"
        ))),
        None => Ok(()),
    }
}

/// A [`BatchPass::rows_stats`] call: one options and accumulator per row, options that are
/// valid, rows the last step left.
pub(crate) fn check_rows_stats(
    rows: &[usize],
    opts: &[StatsOptions],
    accums: &[FeatureAccum],
    step_rows: usize,
) -> Result<()> {
    crate::stats::check_stats_rows(rows, opts, accums.len(), step_rows)
}

/// `v` verifies the last batched step of a state of `seqs` sequences that left `step_rows` rows:
/// one sequence per sequence of the state, γmax + 1 rows each.
pub(crate) fn check_verify(v: &VerifyBatch<'_>, seqs: usize, step_rows: usize) -> Result<()> {
    if v.batch != seqs || v.batch * (v.gamma_max + 1) != step_rows {
        return Err(Error::Other(format!(
            "verification of {} sequences of γmax {} over a step that left {step_rows} rows of \
             {seqs} sequences",
            v.batch, v.gamma_max
        )));
    }
    Ok(())
}

/// Forgets every position of sequence `seq` (of `lens`) from `len` on.
pub(crate) fn truncate_seq(lens: &mut [usize], seq: usize, len: usize) -> Result<()> {
    let n = lens.len();
    let l = lens
        .get_mut(seq)
        .ok_or_else(|| Error::Other(format!("sequence {seq} of a batch of {n}")))?;
    *l = len.min(*l);
    Ok(())
}

/// The single-sequence calls (the [`Pass`] methods) on a batched state of `seqs` sequences are an
/// error: it steps with its batch calls.
pub(crate) fn check_single(seqs: usize) -> Result<()> {
    if seqs != 1 {
        return Err(Error::Other(format!(
            "a forward state of {seqs} sequences steps them together (`step_batch`)"
        )));
    }
    Ok(())
}

/// `positions` fit a device cache allocated for `capacity` (device caches do not grow: the graph
/// and the kernels' parameters hold their addresses).
pub(crate) fn fixed_capacity(positions: usize, capacity: usize) -> Result<()> {
    if positions > capacity {
        return Err(Error::Other(format!(
            "{positions} positions requested of a device KV cache allocated for {capacity}"
        )));
    }
    Ok(())
}

//! One sequence of a speculative batch: what the single-sequence loop keeps, per sequence, and
//! its step in three parts (begin, a draft per pass, commit the verdict).

use std::collections::BTreeMap;

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::controller::replay::draft_keep;
use crate::decode::speculative::{next_heuristic, step_gamma, token_verdict};
use crate::decode::{catch_up, GenConfig, GenStats, Policy};
use crate::error::{Error, Result};
use crate::model::BatchPass;
use crate::stats::{Accumulate, StatsOptions};
use crate::verify::VerifyOutput;

/// A sequence of a speculative batch: what the single-sequence loop keeps, per sequence.
pub(super) struct Seq {
    pending: u32,
    /// Committed tokens the draft has yet to see.
    backlog: Vec<u32>,
    /// Committed tokens the draft never saw (its catch-up window): its cache trails by as many.
    skipped: usize,
    pub(super) out: Vec<u32>,
    pub(super) done: bool,
    heuristic_gamma: u32,
    prev_accum: Option<FeatureAccum>,
    rng_step: u64,
    greedy: bool,
    /// This step's γ limit, drafts, their rows (sampling) and accumulator.
    gmax: usize,
    pub(super) xs: Vec<u32>,
    pub(super) qrows: Vec<f32>,
    pub(super) accum: [FeatureAccum; 1],
    /// The statistics of the row the last draft pass left for it.
    pub(super) last: RowStats,
    pub(super) counts: SeqCounts,
}

impl Seq {
    pub(super) fn new(pending: u32, cfg: &GenConfig, greedy: bool, vocab: usize) -> Seq {
        let gm = cfg.gamma_max as usize;
        Seq {
            pending,
            // Plain steps (`auto`'s gate) add one committed token each: room for all of them.
            backlog: Vec::with_capacity(cfg.max_tokens + 2),
            skipped: 0,
            out: Vec::with_capacity(cfg.max_tokens),
            done: cfg.max_tokens == 0,
            heuristic_gamma: 4,
            prev_accum: None,
            rng_step: 0,
            greedy,
            gmax: 0,
            xs: Vec::with_capacity(gm),
            qrows: Vec::with_capacity(if greedy { 0 } else { gm * vocab }),
            accum: [FeatureAccum::EMPTY],
            last: RowStats::default(),
            counts: SeqCounts::default(),
        }
    }

    /// Starts a step: its γ limit (`gamma`, else the policy's), and in `feed` what the draft's
    /// first pass feeds it (nothing when it drafts nothing: the backlog then keeps the pending
    /// token for the next step).
    pub(super) fn begin(
        &mut self,
        policy: &Policy,
        gamma: Option<usize>,
        cfg: &GenConfig,
        feed: &mut Vec<u32>,
    ) {
        self.xs.clear();
        self.qrows.clear();
        self.accum = [FeatureAccum::EMPTY];
        if self.done {
            self.gmax = 0;
            return;
        }
        self.gmax = gamma.unwrap_or_else(|| {
            let step = self.counts.steps;
            step_gamma(
                policy,
                step,
                self.prev_accum.as_ref(),
                self.heuristic_gamma,
                cfg,
            ) as usize
        });
        self.backlog.push(self.pending);
        self.skipped += catch_up(&mut self.backlog, cfg.draft_catch_up);
        if self.gmax > 0 {
            feed.append(&mut self.backlog);
        }
    }

    /// The options of sequence `i`'s next draft: its own seed and random step (advanced), the
    /// accumulator reset by the step's first draft.
    pub(super) fn draft_options(&mut self, i: usize, cfg: &GenConfig) -> StatsOptions {
        let o = StatsOptions {
            temperature: cfg.temperature,
            sample: !self.greedy,
            seed: crate::philox::derive(
                cfg.seed.wrapping_add(i as u64),
                crate::philox::PURPOSE_DRAFT,
                0,
            ),
            step: self.rng_step,
            accumulate: if self.xs.is_empty() {
                Accumulate::Reset
            } else {
                Accumulate::Add
            },
        };
        self.rng_step += 1;
        o
    }

    /// Sequence `i`'s draft from the statistics of its last row (`self.last`; `row` is that row
    /// when sampling, empty when greedy): keeps it or not (the batch's `verdict` when given, else
    /// the policy's), and puts in `feed` the token to feed next when it drafts on.
    pub(super) fn draft(
        &mut self,
        i: usize,
        policy: &Policy,
        verdict: Option<(bool, bool)>,
        row: &[f32],
        feed: &mut Vec<u32>,
    ) -> Result<()> {
        let st = self.last;
        if st.flags != 0 {
            return Err(Error::NonFiniteLogits {
                step: self.rng_step as usize,
                what: format!("sequence {i}'s draft logits flagged {:#x}", st.flags),
            });
        }
        let (keep, more) = verdict
            .or_else(|| token_verdict(policy, &st, self.greedy))
            .unwrap_or((true, true));
        if !keep {
            return Ok(());
        }
        let x = if self.greedy { st.argmax } else { st.sampled };
        let x = x as u32;
        self.xs.push(x);
        if !self.greedy {
            self.qrows.extend_from_slice(row);
        }
        // x is verified but not fed when the sequence stops here: the draft sees it next step.
        if more && self.xs.len() < self.gmax {
            feed.push(x);
        }
        Ok(())
    }

    /// Puts in `feed` what the verification pass feeds: the pending token and the drafts
    /// (nothing when done).
    pub(super) fn verify_feed(&self, feed: &mut Vec<u32>) {
        feed.clear();
        if !self.done {
            feed.push(self.pending);
            feed.extend_from_slice(&self.xs);
        }
    }

    /// Commits sequence `i`'s verdict after its verification pass: the caches cut back to the
    /// accepted prefix, the emitted tokens appended up to a stop token or `max_tokens`.
    pub(super) fn commit(
        &mut self,
        i: usize,
        vout: &VerifyOutput,
        target: &mut dyn BatchPass,
        draft: &mut dyn BatchPass,
        stop: &[u32],
        cfg: &GenConfig,
    ) -> Result<()> {
        if vout.flags[i] != 0 {
            return Err(Error::NonFiniteLogits {
                step: self.counts.steps,
                what: format!(
                    "sequence {i}'s target or draft rows flagged by verification ({:#x})",
                    vout.flags[i]
                ),
            });
        }
        let (g, k) = (self.xs.len(), vout.accepted[i] as usize);
        // The pass fed the pending token and the g drafts.
        let before = target.lens()[i] - 1 - g;
        target.truncate_seq(i, before + 1 + k)?;
        if g > 0 {
            let (keep, unseen) = draft_keep(k, g, draft.lens()[i] + self.skipped == before + 1 + g);
            draft.truncate_seq(i, before + 1 + keep - self.skipped)?;
            self.backlog.clear();
            if unseen {
                self.backlog.push(self.xs[g - 1]);
            }
        }
        self.counts.add(g, k);
        let emitted = vout.tokens(i);
        for (j, &t) in emitted.iter().enumerate() {
            let t = t as u32;
            if stop.contains(&t) {
                self.done = true;
                break;
            }
            self.out.push(t);
            if self.out.len() == cfg.max_tokens {
                self.done = true;
                break;
            }
            if j + 1 == emitted.len() {
                self.pending = t;
            }
        }
        self.heuristic_gamma = next_heuristic(self.heuristic_gamma, g, k, cfg.gamma_max);
        self.prev_accum = Some(self.accum[0]);
        Ok(())
    }
}

/// A sequence's speculation counts.
#[derive(Default)]
pub(super) struct SeqCounts {
    steps: usize,
    drafted: usize,
    accepted: usize,
    hist: BTreeMap<u32, usize>,
    /// Tokens fed to the draft (padding excluded).
    pub(super) draft_tokens: usize,
}

impl SeqCounts {
    pub(super) fn add(&mut self, g: usize, k: usize) {
        self.steps += 1;
        self.drafted += g;
        self.accepted += k;
        *self.hist.entry(g as u32).or_default() += 1;
    }

    /// The sequence's statistics; the batch's times are filled in by [`finish`].
    pub(super) fn stats(self, tokens: Vec<u32>) -> GenStats {
        GenStats {
            steps: if self.steps == 0 {
                tokens.len()
            } else {
                self.steps
            },
            drafted: self.drafted,
            accepted: self.accepted,
            acceptance_rate: self.accepted as f64 / self.drafted.max(1) as f64,
            mean_gamma: self.drafted as f64 / self.steps.max(1) as f64,
            gamma_histogram: self.hist,
            draft_tokens: self.draft_tokens,
            seconds: 0.0,
            prefill_seconds: 0.0,
            tokens_per_second: 0.0,
            tokens,
        }
    }
}

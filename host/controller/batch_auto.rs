//! `auto` for a batch of sequences: per-token stopping when one batched draft pass drafts for
//! every sequence and one batched verification checks them all.
//!
//! A batched step's cost is shared. Its draft passes compute every sequence's row, and its
//! verification pass computes γ_step + 1 rows of every sequence (γ_step the batch's largest γ,
//! the shorter sequences padded). So while the batch drafts on, a sequence's extra draft costs
//! nothing, and a kept draft never lowers a sequence's expected tokens: the batch drafts in
//! lockstep, every drafting sequence keeping each draft the batch keeps. What remains to decide
//! after draft pass j is the batch's: discard draft j, keep it and stop, or draft on. That is the
//! single sequence's rule ([`stop_rule::decide`]) with the expected tokens summed over the
//! sequences, each with its own hazard (its own features and calibration), and the costs those of
//! batched passes. For a batch of one it is that rule, bit for bit ([`decide_batch`],
//! `tests/batch_auto.rs`).
//!
//! The gate before a step (speculate at all?) is [`PlainGate`]'s comparison with the same sums,
//! each sequence with its own moving average of first-draft hazards. A batch of several takes one
//! plain step early to measure it (the one-sequence prior says little about how a pass of B rows
//! compares with one of B · (γ + 1); a single sequence, and a batch of one, do so under the
//! assumed prior only), and reads unmeasured verification costs off the line through the
//! measured ones. Its probes back off while they lose, as one sequence's do (each makes the
//! draft catch up on B rows per plain step since the last, up to its catch-up window:
//! `GenConfig::draft_catch_up`), and it does not probe at all while the measured costs say that
//! even drafts all accepted would lose to a plain step (`gate::speculation_could_pay`).

use speckv_kernels::params::{
    FeatureAccum, MlpWeights, RowStats, StepCosts, StopState, STOP_TIMES,
};
use speckv_kernels::stop_rule;

pub use crate::controller::hazard::speculate_batch;
use crate::controller::hazard::{
    speculation_could_pay, Calibration, DraftTime, HazardModel, OnlineCost, PlainGate,
    ProbeSchedule, CALIBRATION_RATE, ONLINE_COST_ALPHA,
};
use crate::controller::records::Compression;
use crate::controller::stop::MAX_GAMMA;
use crate::controller::CostModel;
use crate::error::{Error, Result};

/// The most sequences a batched step decides for (a step holds 16 rows).
pub const MAX_SEQS: usize = crate::weights::gemv::MAX_M;

/// The batch's decision on the draft just computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchVerdict {
    /// Every drafting sequence keeps this draft (verifies it).
    pub keep: bool,
    /// The batch drafts the next token (implies `keep`).
    pub more: bool,
}

/// The batch's decision after the draft at position `j` of every drafting sequence, whose
/// hazards are `hazards[i]` (that sequence's state `states[i]`): [`stop_rule::decide`] with the
/// expected tokens summed over the sequences. The costs are a batched draft pass (`draft`) and
/// the batched verification of γ drafts per sequence (`verify(γ)`). Every state is updated as the
/// rule updates one: a kept draft counted, stopped unless the batch drafts on with room left.
///
/// Sums run in f32 from 0 in sequence order, so one sequence gives [`stop_rule::decide`]'s
/// decision and state exactly.
pub fn decide_batch<V: Fn(u32) -> f32>(
    states: &mut [StopState],
    hazards: &[f32],
    j: u32,
    gamma_max: u32,
    draft: f32,
    verify: V,
) -> BatchVerdict {
    let n = states.len().min(hazards.len()).min(MAX_SEQS);
    let gamma_max = gamma_max.min(STOP_TIMES as u32 - 1);
    // The kernels' lockstep comparison (`softmax_stats_v2`'s epilogue runs the same function).
    let (keep, more) = stop_rule::compare_lockstep(
        n as u32,
        |i| states[i as usize],
        |i| hazards[i as usize],
        j,
        gamma_max,
        draft,
        verify,
    );
    for (s, &h) in states.iter_mut().zip(hazards).take(n) {
        stop_rule::apply_lockstep(s, h, j, gamma_max, keep, more);
    }
    BatchVerdict {
        keep,
        more: more && j + (keep as u32) < gamma_max,
    }
}

/// A prior for a batch of `seqs` sequences from a one-sequence cost model: verification of γ
/// drafts per sequence is `seqs · (γ + 1)` rows, as the model's verification at
/// γ' = `seqs · (γ + 1) − 1`; a draft pass of `seqs` rows costs the model's draft scaled as those
/// rows scale its verification. One sequence: the model itself.
pub fn batch_prior(prior: &CostModel, seqs: usize) -> CostModel {
    let seqs = seqs.max(1);
    let rows = |g: usize| prior.verify((seqs * (g + 1) - 1) as u32);
    let per_seq = MAX_SEQS / seqs;
    CostModel {
        draft_ms_per_token: prior.draft_ms_per_token * rows(0) / prior.verify(0),
        verify_ms: (0..per_seq.max(1)).map(rows).collect(),
        // Only the trace replays read the draft's feeds; a batch is not replayed.
        draft_feed_ms: Vec::new(),
        source: if seqs == 1 {
            prior.source.clone()
        } else {
            format!("{} (for {seqs} sequences a step)", prior.source)
        },
    }
}

/// The online costs of batched steps of `seqs` sequences, from one sequence's `prior`
/// ([`batch_prior`]).
pub fn batch_online_cost(prior: &CostModel, seqs: usize) -> OnlineCost {
    OnlineCost::new(batch_prior(prior, seqs), ONLINE_COST_ALPHA)
}

/// The costs a batched step of `seqs` sequences weighs from its online costs `cost`: a batch of
/// several reads its verification costs off the line through what it measured (its passes span B
/// to 16 rows, where the prior's shape says little); a batch of one keeps `auto`'s own estimate.
pub fn batch_step_costs(cost: &OnlineCost, seqs: usize, gamma_max: usize) -> StepCosts {
    if seqs > 1 {
        cost.step_costs_linear(gamma_max)
    } else {
        cost.step_costs(gamma_max)
    }
}

/// One sequence's part of [`BatchAuto`].
#[derive(Clone, Copy, Debug)]
struct SeqAuto {
    calibration: Calibration,
    /// Its moving average of first-draft hazards (the gate's only use of it).
    first: PlainGate,
    state: StopState,
    drafting: bool,
    hazards: [f64; MAX_GAMMA + 1],
}

/// The `auto` policy's state across the steps of a batched generation: each sequence's
/// calibration and first-draft hazards, the batch's measured pass costs, this step's rule.
#[derive(Clone, Debug)]
pub struct BatchAuto {
    pub weights: MlpWeights,
    /// Batched passes' costs: a draft pass of every sequence, the verification of γ drafts each.
    pub cost: OnlineCost,
    seqs: Vec<SeqAuto>,
    probes: ProbeSchedule,
    costs: StepCosts,
    gamma_max: usize,
    /// Drafts kept by every drafting sequence this step.
    kept: u32,
    /// Take one plain step to measure it (a batch of several, or the assumed prior).
    measure_plain: bool,
    /// No gate: every step drafts (`auto-nogate`).
    pub gate_off: bool,
}

impl BatchAuto {
    /// `seqs` sequences (1 to [`MAX_SEQS`]); the costs start from `prior` (one sequence's) as
    /// [`batch_prior`] scales it.
    pub fn new(model: &HazardModel, prior: &CostModel, seqs: usize) -> Result<BatchAuto> {
        if seqs == 0 || seqs > MAX_SEQS {
            return Err(Error::Other(format!(
                "`auto` over {seqs} sequences: a batched step holds 1 to {MAX_SEQS}"
            )));
        }
        let one = SeqAuto {
            calibration: Calibration::new(CALIBRATION_RATE),
            first: PlainGate::default(),
            state: StopState::START,
            drafting: false,
            hazards: [0.0; MAX_GAMMA + 1],
        };
        Ok(BatchAuto {
            weights: model.weights(),
            cost: batch_online_cost(prior, seqs),
            seqs: vec![one; seqs],
            probes: ProbeSchedule::default(),
            costs: StepCosts {
                draft: 0.0,
                verify: [f32::INFINITY; STOP_TIMES],
            },
            gamma_max: 0,
            kept: 0,
            measure_plain: seqs > 1 || prior.is_assumed(),
            gate_off: false,
        })
    }

    /// Before a step in which the sequences `active[i]` decode: the drafts each may make (0: a
    /// plain step for all). The gate speculates when some active sequence has no first-draft
    /// hazard yet, when speculating promises more tokens per second, and otherwise probes on a
    /// [`ProbeSchedule`] (unless even drafts all accepted could not pay:
    /// [`speculation_could_pay`]); a batch of several sequences, or one under the assumed prior,
    /// first takes one plain step to measure it.
    pub fn begin_step(&mut self, gamma_max: usize, active: &[bool]) -> usize {
        self.costs = batch_step_costs(&self.cost, self.seqs.len(), gamma_max);
        let mut first = [0f64; MAX_SEQS];
        let (mut n, mut unknown) = (0, false);
        for (s, _) in self.seqs.iter().zip(active).filter(|(_, &a)| a) {
            match s.first.first_hazard() {
                Some(h) => {
                    first[n] = h;
                    n += 1;
                }
                None => unknown = true,
            }
        }
        // In `AutoState::begin_step`'s order, so a batch of one gates as one sequence does. A
        // batch of several, or one under the assumed prior, takes one plain step to measure it
        // once the hazards are known: the prior's shape, scaled from one row to B · (γ + 1), is
        // only a guess at how a plain step's cost compares (on a CPU it grows with rows far
        // faster), and a gate that never takes a plain step never learns it.
        let explore = self.measure_plain && !self.cost.measured(0);
        let speculate = if unknown || (self.gate_off && gamma_max > 0) {
            true
        } else if gamma_max == 0 || explore {
            if explore {
                self.probes.plain_step();
            }
            false
        } else {
            // A probe makes the draft catch up on every sequence's tokens since the last
            // speculative step (B rows a plain step, up to the catch-up window): while probes
            // keep losing, they back off.
            let wins = speculate_batch(&first[..n], &self.costs, gamma_max);
            let could_pay = wins || speculation_could_pay(n, &self.costs, gamma_max);
            self.probes.speculate(wins, could_pay)
        };
        self.gamma_max = if speculate { gamma_max } else { 0 };
        self.kept = 0;
        for (i, s) in self.seqs.iter_mut().enumerate() {
            s.state = StopState::START;
            s.drafting = self.gamma_max > 0 && active.get(i).copied().unwrap_or(false);
        }
        self.gamma_max
    }

    /// The batch's verdict on the draft every drafting sequence just made: `drafts` gives, per
    /// drafting sequence, its index, its accumulator after this draft and this draft's row
    /// statistics. A sequence this step did not start drafting, one past the batch, or one named
    /// again is ignored.
    pub fn decide<'a>(
        &mut self,
        drafts: impl IntoIterator<Item = (usize, &'a FeatureAccum, &'a RowStats)>,
        compression: Compression,
    ) -> BatchVerdict {
        let (mut states, mut hs, mut who) = (
            [StopState::START; MAX_SEQS],
            [0f32; MAX_SEQS],
            [0; MAX_SEQS],
        );
        let mut n = 0;
        let j = self.kept;
        for (i, accum, row) in drafts {
            // A sequence named twice would be counted twice: only the first counts.
            if n == MAX_SEQS || who[..n].contains(&i) {
                continue;
            }
            let Some(s) = self.seqs.get_mut(i).filter(|s| s.drafting) else {
                continue;
            };
            let x = stop_rule::features(
                row.entropy,
                row.confidence,
                accum,
                compression.code() as f32,
                j,
            );
            let h = stop_rule::hazard(&self.weights, &x, s.calibration.odds_scale());
            if j == 0 {
                s.first.observe_first(h as f64);
            }
            (states[n], hs[n], who[n]) = (s.state, h, i);
            n += 1;
        }
        let c = &self.costs;
        let verdict = decide_batch(
            &mut states[..n],
            &hs[..n],
            j,
            self.gamma_max as u32,
            c.draft,
            |g| c.verify.get(g as usize).copied().unwrap_or(f32::NAN),
        );
        for k in 0..n {
            let s = &mut self.seqs[who[k]];
            s.state = states[k];
            if verdict.keep {
                if let Some(slot) = s.hazards.get_mut(j as usize) {
                    *slot = hs[k] as f64;
                }
            }
        }
        self.kept = j + verdict.keep as u32;
        verdict
    }

    /// After verification: the step's batched `draft` passes ([`DraftTime::measured`] is what
    /// the draft's cost learns from), the batched verification of `gamma_step` drafts per
    /// sequence took `verify_seconds`, and `accepted` gives each sequence that drafted its index
    /// and accepted drafts (for its calibration).
    pub fn end_step(
        &mut self,
        draft: &DraftTime,
        gamma_step: usize,
        verify_seconds: f64,
        accepted: impl IntoIterator<Item = (usize, usize)>,
    ) {
        let (passes, seconds) = draft.measured();
        self.cost
            .observe(passes, seconds, gamma_step, verify_seconds);
        let kept = self.kept as usize;
        for (i, k) in accepted {
            if let Some(s) = self.seqs.get_mut(i).filter(|s| s.drafting) {
                let n = kept.min(s.hazards.len());
                s.calibration.observe(&s.hazards[..n], k);
            }
        }
    }

    /// Sequence `i`'s calibrated odds scale.
    pub fn odds_scale(&self, i: usize) -> Option<f32> {
        self.seqs.get(i).map(|s| s.calibration.odds_scale())
    }
}

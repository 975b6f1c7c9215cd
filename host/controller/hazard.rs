//! Per-token stopping: after each drafted token, draft on or stop, from what is known at that moment.
//!
//! A hazard model — the 16-unit MLP of [`crate::controller::mlp`] with other inputs — predicts
//! h_j = P(draft j is accepted | drafts 0..j−1 were) from [`token_features`]: this token's entropy and
//! top-1 probability, the step's running mean entropy and minimum confidence over drafts 0..=j, the
//! compression code of the target's weights and the position j. A_j = h_0 ⋯ h_j is then the chance
//! that drafts 0..=j are all accepted, and a step that verifies γ drafts emits 1 + A_0 + … + A_{γ−1}
//! tokens on average. [`StopRule`] drafts on while some longer step, with the hazards after j taken
//! equal to h_j, promises more tokens per second than stopping now, under costs measured while
//! decoding ([`OnlineCost`]).
//!
//! The rule itself is `speckv_kernels::stop_rule`, in f32: the CPU runs those functions and
//! `softmax_stats_v2` runs them in its epilogue (`STATS_STOP`), so both make the same decisions on
//! the same inputs (`tests/stop_rule.rs`). The same features are built from `speckv profile`'s
//! traces, or from an engine's draft records, for training
//! (`controller::hazard_training`), replaying the f32 accumulator, so the model is trained on
//! exactly what the live policy sees (`tests/models.rs` checks it).

use serde::{Deserialize, Serialize};

use speckv_kernels::params::{FeatureAccum, MlpWeights, StepCosts, STOP_TIMES};
use speckv_kernels::stop_rule;

use crate::controller::mlp::{Mlp, INPUTS};
use crate::controller::records::Compression;
use crate::controller::CostModel;
use crate::error::{Error, Result};

pub use crate::controller::gate::{
    speculate_batch, speculation_could_pay, PlainGate, ProbeSchedule, MAX_PROBE_EVERY, PROBE_EVERY,
};
pub use crate::controller::stop::{StopDecision, StopRule, MAX_GAMMA};

/// The hazard model's inputs for draft `position` (0-based) of a step, as the rule computes them on
/// the CPU and in `softmax_stats_v2`'s epilogue: (its entropy, its confidence, mean entropy over
/// drafts 0..=position, min confidence over drafts 0..=position, compression code, position), in
/// f32 from the step's feature accumulator after this draft's row.
pub fn token_features(
    entropy: f32,
    confidence: f32,
    accum: &FeatureAccum,
    compression: Compression,
    position: usize,
) -> [f64; INPUTS] {
    stop_rule::features(
        entropy,
        confidence,
        accum,
        compression.code() as f32,
        position as u32,
    )
    .map(|v| v as f64)
}

/// A step's draft work, as the online costs measure the draft on it ([`AutoState::end_step`],
/// `BatchAuto::end_step`) and `generate --step-log` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DraftTime {
    /// The step's draft passes (0: a plain step) and their wall time, statistics included.
    pub passes: usize,
    pub seconds: f64,
    /// Its first feed (each sequence's pending token, a draft a fully accepted step left unseen,
    /// and the tokens of plain steps it catches up on): the passes it took (0 when the loop did
    /// not time it apart: a phase run as one), their time, and the most tokens it fed a sequence.
    pub first_passes: usize,
    pub first_seconds: f64,
    pub first_tokens: usize,
}

/// The most tokens a step's first feed gives a sequence when the step before it speculated: the
/// pending token and at most one draft a fully accepted step left unseen. A longer first feed
/// catches the draft up on tokens of plain steps.
pub const STEADY_FEED: usize = 2;

impl DraftTime {
    /// Passes that each feed one token per sequence, the first timed as the others.
    pub fn steady(passes: usize, seconds: f64) -> DraftTime {
        DraftTime {
            passes,
            seconds,
            first_passes: passes.min(1),
            first_seconds: if passes > 0 {
                seconds / passes as f64
            } else {
                0.0
            },
            first_tokens: 1,
        }
    }

    /// The passes and seconds a draft pass's cost is measured on: every pass, less a first feed
    /// that caught the draft up on tokens of plain steps (longer than [`STEADY_FEED`], when timed
    /// apart). That feed is the price of returning from plain steps, paid once, not of drafting:
    /// counted as a draft pass, it raised the draft's cost after every probe, and with it the
    /// gate's lean to plain steps on every later step. A steady first feed of two tokens stays
    /// in: it costs more than a pass of one, and it recurs after every fully accepted step.
    pub fn measured(&self) -> (usize, f64) {
        if self.first_tokens > STEADY_FEED && self.first_passes > 0 {
            let passes = self.passes.saturating_sub(self.first_passes);
            (passes, (self.seconds - self.first_seconds).max(0.0))
        } else {
            (self.passes, self.seconds)
        }
    }
}

/// Step costs measured while decoding: an exponential moving average of the draft's time per
/// forward pass and of the verification time at each γ seen, on top of a prior cost model whose
/// shape fills in the γ not seen yet. Units are the prior's until the first measurement, then
/// seconds (the prior's times scaled to them where not measured) — only ratios of costs enter the
/// decision.
#[derive(Clone, Debug)]
pub struct OnlineCost {
    prior: CostModel,
    /// Weight of a new measurement.
    alpha: f64,
    draft: Option<f64>,
    verify: [Option<f64>; MAX_GAMMA + 1],
}

impl OnlineCost {
    pub fn new(prior: CostModel, alpha: f64) -> OnlineCost {
        OnlineCost {
            prior,
            alpha,
            draft: None,
            verify: [None; MAX_GAMMA + 1],
        }
    }

    fn ema(slot: &mut Option<f64>, x: f64, alpha: f64) {
        if x.is_finite() && x > 0.0 {
            *slot = Some(slot.map_or(x, |v| v + alpha * (x - v)));
        }
    }

    /// One step's measurement: `forwards` draft passes took `draft_seconds`, the verification of
    /// γ = `gamma` drafts took `verify_seconds`.
    pub fn observe(
        &mut self,
        forwards: usize,
        draft_seconds: f64,
        gamma: usize,
        verify_seconds: f64,
    ) {
        if forwards > 0 {
            Self::ema(&mut self.draft, draft_seconds / forwards as f64, self.alpha);
        }
        if let Some(slot) = self.verify.get_mut(gamma) {
            Self::ema(slot, verify_seconds, self.alpha);
        }
    }

    /// Verification time at γ: measured when seen, else the prior's shape scaled to the nearest γ
    /// measured (the prior alone before any measurement).
    pub fn verify(&self, gamma: usize) -> f64 {
        if let Some(Some(v)) = self.verify.get(gamma) {
            return *v;
        }
        self.prior_scaled(self.prior.verify(gamma as u32), gamma)
    }

    /// A time of the prior's, `t`, in the measured units: scaled as the prior's verification at
    /// the γ measured nearest to `gamma` compares with the measured one (`t` itself before any
    /// measurement).
    fn prior_scaled(&self, t: f64, gamma: usize) -> f64 {
        let nearest = (0..self.verify.len())
            .filter_map(|g| self.verify[g].map(|v| (g, v)))
            .min_by_key(|&(g, _)| g.abs_diff(gamma));
        match nearest {
            Some((g, v)) => v * t / self.prior.verify(g as u32),
            None => t,
        }
    }

    /// Whether the verification at γ has been measured (else [`OnlineCost::verify`] scales the
    /// prior's shape).
    pub fn measured(&self, gamma: usize) -> bool {
        matches!(self.verify.get(gamma), Some(Some(_)))
    }

    /// Verification time at γ from the measurements alone once two γ are measured: on the line
    /// between the nearest measured γ below and above, or above them on the line through the two
    /// largest (never below the largest measured time: more rows never cost less). Below every
    /// measured γ, and with fewer than two measured, [`OnlineCost::verify`]. A batch's passes
    /// span B to 16 rows, where the prior's shape, measured or assumed for one sequence, says
    /// little.
    pub fn verify_linear(&self, gamma: usize) -> f64 {
        // Read in place, not collected: the decode loop calls this every step.
        let t = &self.verify;
        let last_below = |end: usize| {
            (0..end.min(t.len()))
                .rev()
                .find_map(|g| t[g].map(|v| (g, v)))
        };
        if t.iter().filter(|v| v.is_some()).count() < 2 {
            return self.verify(gamma);
        }
        if let Some(Some(v)) = t.get(gamma) {
            return *v;
        }
        let below = last_below(gamma);
        let above = (gamma + 1..t.len()).find_map(|g| t[g].map(|v| (g, v)));
        let ((g0, v0), (g1, v1)) = match (below, above) {
            (Some(a), Some(b)) => (a, b),
            // Above the measured range: the two largest.
            (Some(b), None) => match last_below(b.0) {
                Some(a) => (a, b),
                None => return self.verify(gamma),
            },
            _ => return self.verify(gamma),
        };
        let at = v0 + (v1 - v0) * (gamma as f64 - g0 as f64) / (g1 as f64 - g0 as f64);
        if above.is_some() {
            at
        } else {
            at.max(v1)
        }
    }

    /// [`OnlineCost::step_costs`] with [`OnlineCost::verify_linear`]'s verification times.
    pub fn step_costs_linear(&self, gamma_max: usize) -> StepCosts {
        let mut verify = [f32::INFINITY; STOP_TIMES];
        let n = gamma_max.min(MAX_GAMMA) + 1;
        for (g, slot) in verify.iter_mut().enumerate().take(n) {
            *slot = self.verify_linear(g) as f32;
        }
        StepCosts {
            draft: self.draft() as f32,
            verify,
        }
    }

    /// The rule's costs: one draft pass and the verification at γ = 0..=`gamma_max` (+inf beyond).
    pub fn step_costs(&self, gamma_max: usize) -> StepCosts {
        let mut verify = [f32::INFINITY; STOP_TIMES];
        let n = gamma_max.min(MAX_GAMMA) + 1;
        for (g, slot) in verify.iter_mut().enumerate().take(n) {
            *slot = self.verify(g) as f32;
        }
        StepCosts {
            draft: self.draft() as f32,
            verify,
        }
    }

    /// Draft time per forward pass, in the units of [`OnlineCost::verify`]: measured after every
    /// speculative step; before the first, the prior's — scaled as its verification compares with
    /// what plain steps measured, if any (a plain step times a verification of γ = 0 and no draft
    /// pass, and a prior's milliseconds or target passes are not the measured seconds).
    pub fn draft(&self) -> f64 {
        self.draft
            .unwrap_or_else(|| self.prior_scaled(self.prior.draft_ms_per_token, 0))
    }
}

/// The hazard model and its stopping rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HazardModel {
    pub mlp: Mlp,
    /// Where the weights come from (traces, command).
    #[serde(default)]
    pub source: String,
}

/// The default model shipped with speckv: trained by `speckv train --hazard` on the Qwen2.5-Coder
/// 0.5B → 1.5B traces of every regime (`results/qwen/*/steps.csv`).
pub const DEFAULT_MODEL_JSON: &str = include_str!("default_hazard.json");

impl HazardModel {
    pub fn default_model() -> Result<HazardModel> {
        let m: HazardModel = serde_json::from_str(DEFAULT_MODEL_JSON)
            .map_err(|e| Error::Other(format!("the shipped hazard model is not valid: {e}")))?;
        m.mlp.check()?;
        Ok(m)
    }

    pub fn load(path: &std::path::Path) -> Result<HazardModel> {
        let m: HazardModel = crate::controller::load_json(path, "a hazard model")?;
        m.mlp.check()?;
        Ok(m)
    }

    /// Writes the model as JSON (the layout [`HazardModel::load`] reads).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::controller::save_json(path, self)
    }

    /// The model's f32 weights, as the rule and the kernel read them.
    pub fn weights(&self) -> MlpWeights {
        self.mlp.to_f32()
    }

    /// h = P(accept | prefix accepted) for features `x`, computed in f32 as the rule computes it
    /// (`stop_rule::hazard`): within [0.001, 0.999]; 0.001 when a feature or the prediction is not
    /// finite (fail closed, stop).
    pub fn hazard(&self, x: &[f64; INPUTS]) -> f64 {
        stop_rule::hazard(&self.weights(), &x.map(|v| v as f32), 1.0) as f64
    }
}

/// Online calibration of the hazard model: a scale k on its odds, h' = k·h / (1 − h + k·h), fitted
/// while decoding by stochastic gradient ascent on the log-likelihood of the verified drafts'
/// outcomes (d log L / d log k = y − h' per draft). A model trained on other prompts, another
/// machine's traces or another regime is pulled towards the acceptance actually seen.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    log_k: f64,
    rate: f64,
}

/// |log k| is kept below this (k within [1/20, 20]).
pub const MAX_LOG_ODDS_SCALE: f64 = 3.0;

impl Calibration {
    pub fn new(rate: f64) -> Calibration {
        Calibration { log_k: 0.0, rate }
    }

    /// A calibration at `odds_scale` already (finite, > 0), within the bounds it keeps.
    pub fn at(rate: f64, odds_scale: f32) -> Calibration {
        let log_k = (odds_scale as f64).ln();
        Calibration {
            log_k: log_k.clamp(-MAX_LOG_ODDS_SCALE, MAX_LOG_ODDS_SCALE),
            rate,
        }
    }

    /// The scale the rule applies to the model's odds.
    pub fn odds_scale(&self) -> f32 {
        self.log_k.exp() as f32
    }

    /// One verified step: `hazards[i]` is the (calibrated) hazard the rule used for kept draft i,
    /// `accepted` the drafts accepted. Draft i is an outcome when drafts before it were accepted:
    /// accepted (y = 1) for i < `accepted`, rejected (y = 0) at i = `accepted`.
    pub fn observe(&mut self, hazards: &[f64], accepted: usize) {
        for (i, &h) in hazards.iter().enumerate().take(accepted + 1) {
            let y = (i < accepted) as u32 as f64;
            if h.is_finite() {
                self.log_k += self.rate * (y - h);
            }
        }
        self.log_k = self.log_k.clamp(-MAX_LOG_ODDS_SCALE, MAX_LOG_ODDS_SCALE);
    }
}

/// Step-cost moving average weight of [`AutoState`].
pub const ONLINE_COST_ALPHA: f64 = 0.2;
/// Calibration learning rate of [`AutoState`].
pub const CALIBRATION_RATE: f64 = 0.1;

/// The `auto` policy's state across the steps of one generation: the hazard model's f32 weights,
/// the costs measured so far, the calibration and the gate.
#[derive(Clone, Debug)]
pub struct AutoState {
    pub weights: MlpWeights,
    pub cost: OnlineCost,
    pub calibration: Calibration,
    pub gate: PlainGate,
    hazards: [f64; MAX_GAMMA + 1],
    kept: usize,
    /// Take one plain step to measure it (the prior is the assumed one).
    measure_plain: bool,
    /// No gate: every step drafts (the replays' measure of what the gate adds).
    pub gate_off: bool,
}

impl AutoState {
    pub fn new(model: &HazardModel, prior: CostModel) -> AutoState {
        AutoState {
            measure_plain: prior.is_assumed(),
            weights: model.weights(),
            cost: OnlineCost::new(prior, ONLINE_COST_ALPHA),
            calibration: Calibration::new(CALIBRATION_RATE),
            gate: PlainGate::default(),
            hazards: [0.0; MAX_GAMMA + 1],
            kept: 0,
            gate_off: false,
        }
    }

    /// Before a step: its costs, the drafts it may make (0: a plain step) and its rule.
    pub fn begin_step(&mut self, gamma_max: usize) -> (StepCosts, usize, StopRule) {
        let costs = self.cost.step_costs(gamma_max);
        // Under the assumed prior, once the first hazards are known, one plain step measures
        // what a plain step costs (as a batch's gate does). Until then it is the prior's shape
        // scaled from the verifications measured, and the assumed shape (a GPU's: 2 % more a
        // position) made a CPU's plain step look a third dearer than it is, so the gate kept
        // speculating where plain steps were faster. A measured prior's shape is trusted.
        let explore = self.measure_plain && !self.cost.measured(0);
        let g = if self.gate_off {
            gamma_max
        } else if explore && self.gate.first_hazard().is_some() {
            self.gate.plain_step();
            0
        } else if self.gate.speculate(&costs, gamma_max) {
            gamma_max
        } else {
            0
        };
        self.kept = 0;
        (
            costs,
            g,
            StopRule::calibrated(self.calibration.odds_scale()),
        )
    }

    /// The rule's decision for a draft of this step.
    pub fn record(&mut self, d: &StopDecision) {
        if d.features[5] == 0.0 {
            self.gate.observe_first(d.hazard);
        }
        if d.keep {
            if let Some(slot) = self.hazards.get_mut(self.kept) {
                *slot = d.hazard;
                self.kept += 1;
            }
        }
    }

    /// After verification: the step's `draft` work ([`DraftTime::measured`] is what the draft's
    /// cost learns from), verifying γ drafts took `verify_seconds`, and `accepted` were accepted.
    pub fn end_step(
        &mut self,
        draft: &DraftTime,
        gamma: usize,
        verify_seconds: f64,
        accepted: usize,
    ) {
        let (passes, seconds) = draft.measured();
        self.cost.observe(passes, seconds, gamma, verify_seconds);
        let n = self.kept.min(gamma);
        self.calibration.observe(&self.hazards[..n], accepted);
    }
}

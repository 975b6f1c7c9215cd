//! One step's per-token stopping rule on the host: the kernels' `stop_rule` on a sequence's
//! [`StopState`], run either here ([`StopRule::decide`]) or by the pass that computed the draft's
//! statistics ([`StopRule::draft_stop`] → the pass's `run_stats` →
//! [`StopRule::observe`]), which on a device pass is `softmax_stats_v2`'s `STATS_STOP` epilogue.
//! Both give the same decisions on the same inputs (`tests/stop_rule.rs`, `tests/device_forward.rs`).

use speckv_kernels::params::{FeatureAccum, MlpWeights, RowStats, StepCosts, StopState};
use speckv_kernels::stop_rule;

use crate::controller::mlp::INPUTS;
use crate::controller::records::Compression;
use crate::stats::DraftStop;

/// The most drafts per step the rule plans for (the GEMV's largest M is γmax + 1).
pub const MAX_GAMMA: usize = crate::weights::gemv::MAX_M - 1;

/// One step's stopping rule on the CPU: the kernels' [`stop_rule::decide`] on a sequence's
/// [`StopState`], so the CPU decides exactly as `softmax_stats_v2`'s epilogue does.
#[derive(Clone, Copy, Debug)]
pub struct StopRule {
    pub state: StopState,
    /// The online calibration's odds scale (the calibration's `odds_scale`; 1: the model as trained).
    pub odds_scale: f32,
}

/// What the rule saw and decided for one draft.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StopDecision {
    pub features: [f64; INPUTS],
    pub hazard: f64,
    /// Keep this draft (verify it).
    pub keep: bool,
    /// Draft the next token (implies `keep`).
    pub more: bool,
}

impl Default for StopRule {
    fn default() -> Self {
        StopRule::new()
    }
}

impl StopRule {
    pub fn new() -> StopRule {
        StopRule::calibrated(1.0)
    }

    /// A step's rule with the model's odds multiplied by `odds_scale`.
    pub fn calibrated(odds_scale: f32) -> StopRule {
        StopRule {
            state: StopState::START,
            odds_scale,
        }
    }

    /// The decision for the draft whose row statistics `row` were just computed (and pushed into
    /// `accum`), with the step costs `costs` (from the online costs' `step_costs`) and room for
    /// `gamma_max` drafts in all.
    pub fn decide(
        &mut self,
        weights: &MlpWeights,
        accum: &FeatureAccum,
        row: &RowStats,
        compression: Compression,
        costs: &StepCosts,
        gamma_max: usize,
    ) -> StopDecision {
        let d = stop_rule::decide_host(
            weights,
            &mut self.state,
            accum,
            row.entropy,
            row.confidence,
            compression.code() as f32,
            self.odds_scale,
            gamma_max.min(MAX_GAMMA) as u32,
            costs,
        );
        StopDecision {
            features: d.features.map(|v| v as f64),
            hazard: d.hazard as f64,
            keep: d.keep,
            more: d.more,
        }
    }
}

impl StopRule {
    /// This rule's inputs for a pass that decides where the draft's statistics are computed
    /// (the pass's `run_stats` with a [`DraftStop`]).
    pub fn draft_stop<'w>(
        &self,
        weights: &'w MlpWeights,
        compression: Compression,
        costs: &StepCosts,
        gamma_max: usize,
    ) -> DraftStop<'w> {
        DraftStop {
            weights,
            costs: *costs,
            gamma_max: gamma_max.min(MAX_GAMMA) as u32,
            compression_code: compression.code() as f32,
            odds_scale: self.odds_scale,
            state: self.state,
        }
    }

    /// The decision a pass made (its [`DraftStop`]'s state after the draft whose statistics are
    /// `row`, pushed into `accum`), with the features and hazard the rule saw recomputed by the
    /// same f32 functions: what [`StopRule::decide`] returns on the same inputs.
    pub fn observe(
        &mut self,
        weights: &MlpWeights,
        accum: &FeatureAccum,
        row: &RowStats,
        compression: Compression,
        after: StopState,
    ) -> StopDecision {
        let x = stop_rule::features(
            row.entropy,
            row.confidence,
            accum,
            compression.code() as f32,
            self.state.kept,
        );
        let h = stop_rule::hazard(weights, &x, self.odds_scale);
        let keep = after.kept > self.state.kept;
        self.state = after;
        StopDecision {
            features: x.map(|v| v as f64),
            hazard: h as f64,
            keep,
            more: after.stopped == 0,
        }
    }
}

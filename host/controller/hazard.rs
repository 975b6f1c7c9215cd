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
//! The same features are built from `speckv profile`'s traces for training ([`examples`]), so the
//! model is trained on exactly what the live policy sees (`tests/controller.rs` checks it).

use serde::{Deserialize, Serialize};

use crate::controller::mlp::{Example, Mlp, INPUTS};
use crate::controller::records::Compression;
use crate::controller::records::TraceRow;
use crate::controller::CostModel;
use crate::error::{Error, Result};

/// The most drafts per step the rule plans for (the GEMV's largest M is γmax + 1).
pub const MAX_GAMMA: usize = crate::weights::gemv::MAX_M - 1;

/// The hazard model's inputs for draft `position` (0-based) of a step: (its entropy, its
/// confidence, mean entropy over drafts 0..=position, min confidence over drafts 0..=position,
/// compression code, position).
pub fn token_features(
    entropy: f64,
    confidence: f64,
    prefix_mean_entropy: f64,
    prefix_min_confidence: f64,
    compression: Compression,
    position: usize,
) -> [f64; INPUTS] {
    [
        entropy,
        confidence,
        prefix_mean_entropy,
        prefix_min_confidence,
        compression.code(),
        position as f64,
    ]
}

/// Training examples from trace rows (`speckv profile --out steps.csv`): one per draft j of a traced
/// step whose drafts 0..j−1 were all accepted, labelled 1 if draft j was accepted too. Rows are
/// grouped by (run, prompt, step); the group of an example is its run. A draft's own entropy and
/// confidence come from the rows' `draft_entropy`/`draft_confidence` columns, or — in traces
/// written before those columns — from consecutive prefix means (exact up to rounding).
pub fn examples(rows: &[TraceRow]) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let r0 = &rows[i];
        let key = (r0.run, r0.prompt, r0.step);
        let mut j = i;
        while j < rows.len() && (rows[j].run, rows[j].prompt, rows[j].step) == key {
            j += 1;
        }
        let step = &rows[i..j];
        for (n, r) in step.iter().enumerate() {
            if r.gamma as usize != n + 1 {
                return Err(Error::Other(format!(
                    "trace rows of run {} prompt {} step {}: γ' = {} where {} was expected (rows \
                     of a step must list γ' = 1, 2, … in order)",
                    r.run,
                    r.prompt,
                    r.step,
                    r.gamma,
                    n + 1
                )));
            }
            let accepted = r.trace_accepted as usize;
            if accepted < n {
                break; // draft n is only reached when drafts 0..n−1 were accepted
            }
            let (e, c) = match (r.draft_entropy, r.draft_confidence) {
                (Some(e), Some(c)) => (e, c),
                _ => {
                    let prev = n.checked_sub(1).map(|p| &step[p]);
                    let k = (n + 1) as f64;
                    let e = k * r.mean_draft_entropy
                        - prev.map_or(0.0, |p| n as f64 * p.mean_draft_entropy);
                    let c = k * r.mean_draft_confidence
                        - prev.map_or(0.0, |p| n as f64 * p.mean_draft_confidence);
                    (e, c)
                }
            };
            out.push(Example {
                x: token_features(
                    e,
                    c,
                    r.mean_draft_entropy,
                    r.min_draft_confidence,
                    r.compression,
                    n,
                ),
                y: (accepted > n) as u32 as f64,
                group: r.run,
            });
        }
        i = j;
    }
    if out.is_empty() {
        return Err(Error::Empty {
            what: "trace rows (no drafted token to learn from)",
        });
    }
    Ok(out)
}

/// Step costs measured while decoding: an exponential moving average of the draft's time per
/// forward pass and of the verification time at each γ seen, on top of a prior cost model whose
/// shape fills in the γ not seen yet. Units are the prior's until the first measurement, then
/// seconds — only ratios of costs enter the decision.
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
        let nearest = (0..self.verify.len())
            .filter(|&g| self.verify[g].is_some())
            .min_by_key(|&g| g.abs_diff(gamma));
        match nearest {
            Some(g) => {
                let v = self.verify[g].unwrap_or(0.0);
                v * self.prior.verify(gamma as u32) / self.prior.verify(g as u32)
            }
            None => self.prior.verify(gamma as u32),
        }
    }

    /// Draft time per forward pass, in the units of [`OnlineCost::verify`] (both are measured
    /// together, after every step; before the first, both are the prior's).
    pub fn draft(&self) -> f64 {
        self.draft.unwrap_or(self.prior.draft_ms_per_token)
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

    /// h = P(accept | prefix accepted) for features `x`, clamped to [0.001, 0.999] (a non-finite
    /// feature or prediction → 0.001: fail closed, stop).
    pub fn hazard(&self, x: &[f64; INPUTS]) -> f64 {
        if !x.iter().all(|v| v.is_finite()) {
            return 0.001; // the ReLU would silently drop a NaN feature
        }
        let h = self.mlp.predict(x);
        if h.is_finite() {
            h.clamp(0.001, 0.999)
        } else {
            0.001
        }
    }
}

/// One step's state of the stopping rule: the running prefix features and A_{j−1}.
#[derive(Clone, Copy, Debug)]
pub struct StopRule {
    entropy_sum: f64,
    min_confidence: f64,
    /// A_{j−1} (1 before the first draft) and Σ_{i<j} A_i.
    survive: f64,
    expected: f64,
    position: usize,
}

/// What the rule saw and decided for one draft.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StopDecision {
    pub features: [f64; INPUTS],
    pub hazard: f64,
    /// Draft on (keep this draft and draft the next) or stop before this draft.
    pub keep: bool,
}

impl Default for StopRule {
    fn default() -> Self {
        StopRule::new()
    }
}

impl StopRule {
    pub fn new() -> StopRule {
        StopRule {
            entropy_sum: 0.0,
            min_confidence: f64::INFINITY,
            survive: 1.0,
            expected: 1.0,
            position: 0,
        }
    }

    /// The decision for the draft just computed (entropy, confidence) at position j of the step,
    /// with room for `gamma_max` drafts in all.
    pub fn decide(
        &mut self,
        model: &HazardModel,
        entropy: f32,
        confidence: f32,
        compression: Compression,
        cost: &OnlineCost,
        gamma_max: usize,
    ) -> StopDecision {
        let j = self.position;
        let (e, c) = (entropy as f64, confidence as f64);
        self.entropy_sum += e;
        self.min_confidence = self.min_confidence.min(c);
        let x = token_features(
            e,
            c,
            self.entropy_sum / (j + 1) as f64,
            self.min_confidence,
            compression,
            j,
        );
        let h = model.hazard(&x);
        // Step time when verifying γ drafts, the draft of position γ computed too when γ < γmax.
        let time = |g: usize| {
            let forwards = if g < gamma_max { g + 1 } else { g };
            forwards as f64 * cost.draft() + cost.verify(g)
        };
        let stop_rate = self.expected / time(j);
        let (mut a, mut e_tokens, mut keep) = (self.survive, self.expected, false);
        for g in j + 1..=gamma_max {
            a *= h;
            e_tokens += a;
            if e_tokens / time(g) > stop_rate {
                keep = true;
                break;
            }
        }
        if keep {
            self.survive *= h;
            self.expected += self.survive;
            self.position += 1;
        }
        StopDecision {
            features: x,
            hazard: h,
            keep,
        }
    }
}

/// Reads `speckv profile`'s trace rows (CSV).
pub fn read_trace_rows(path: &std::path::Path) -> Result<Vec<TraceRow>> {
    let mut r = csv::Reader::from_path(path)
        .map_err(|e| Error::Other(format!("{}: cannot read trace rows: {e}", path.display())))?;
    let mut rows = Vec::new();
    for (i, row) in r.deserialize::<TraceRow>().enumerate() {
        rows.push(row.map_err(|e| {
            Error::Other(format!(
                "{} row {}: not a trace row: {e}",
                path.display(),
                i + 2
            ))
        })?);
    }
    Ok(rows)
}

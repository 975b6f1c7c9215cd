//! The γ controller: the MLP's decision per step, on the CPU and on the device (`gamma_mlp`), and
//! the cost model the `speckv-cost` policy maximises tokens per unit time with.

pub mod batch_auto;
pub mod evaluate;
pub mod gate;
pub mod hazard;
pub mod hazard_training;
pub mod mlp;
pub mod plot;
pub mod records;
pub mod replay;
pub mod simulate;
pub mod stop;

use std::path::Path;

use serde::{Deserialize, Serialize};
use speckv_kernels::gamma_mlp;
use speckv_kernels::params::{
    FeatureAccum, GammaMlpParams, MlpWeights, GAMMA_EMPTY, GAMMA_FLAGGED_ROWS, GAMMA_NONFINITE,
    MAX_CANDIDATES,
};

use crate::controller::mlp::Mlp;
use crate::controller::records::Compression;
use crate::error::{Error, Result};

/// The paper's candidate set.
pub const PAPER_CANDIDATES: [u32; 4] = [2, 4, 6, 8];

/// Time of one speculation step as a function of γ: γ draft forward passes plus one verification
/// pass over γ + 1 positions. `verify_ms[i]` is the verification time at γ = i (interpolated
/// linearly, extrapolated from the last two points).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub draft_ms_per_token: f64,
    /// Verification time at γ = 0, 1, 2, … (at least one entry).
    pub verify_ms: Vec<f64>,
    /// A draft pass feeding n = 1, 2, … tokens at index n − 1 (linear beyond the last two): a
    /// step's first draft pass feeds the pending token, the draft a fully accepted step left
    /// unseen and the tokens of plain steps it catches up on. Empty: not measured (cost models
    /// written before it was), and every pass costs `draft_ms_per_token`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draft_feed_ms: Vec<f64>,
    /// Where the numbers come from.
    #[serde(default)]
    pub source: String,
}

impl CostModel {
    /// An assumed model for when nothing was measured: a draft costing 1/3 of the target per token
    /// (Llama-3.2-1B drafting for Llama-3.2-3B, the paper's pair), verification of γ + 1 positions
    /// memory-bound (1 + 2 % per extra position). Units: target forward passes.
    pub fn assumed() -> CostModel {
        CostModel {
            draft_ms_per_token: 1.0 / 3.0,
            verify_ms: (0..=16).map(|g| 1.0 + 0.02 * g as f64).collect(),
            draft_feed_ms: Vec::new(),
            source: "assumed: draft = 1/3 target per token, verification 1 + 0.02·γ target passes"
                .to_string(),
        }
    }

    /// Whether this is [`CostModel::assumed`]: no measurement behind it, so its shape (a
    /// verification 2 % dearer a position) is only a guess on the machine at hand.
    pub fn is_assumed(&self) -> bool {
        *self == CostModel::assumed()
    }

    pub fn load(path: &Path) -> Result<CostModel> {
        let c: CostModel = load_json(path, "a cost model")?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.draft_ms_per_token)
            || self.verify_ms.is_empty()
            || !self.verify_ms.iter().all(|&v| ok(v) && v > 0.0)
        {
            return Err(Error::Other("cost model: draft_ms_per_token must be ≥ 0 and verify_ms a non-empty list of positive times".to_string()));
        }
        if !self.draft_feed_ms.iter().all(|&v| ok(v) && v > 0.0) {
            return Err(Error::Other(
                "cost model: draft_feed_ms must list positive times (or be empty)".to_string(),
            ));
        }
        Ok(())
    }

    /// Time of a draft pass feeding `tokens` tokens (at least one): measured when listed, on the
    /// line through the last two beyond them (never below the last), `draft_ms_per_token` when
    /// nothing was measured.
    pub fn draft_feed(&self, tokens: usize) -> f64 {
        let f = &self.draft_feed_ms;
        let n = tokens.max(1);
        match f.len() {
            0 => self.draft_ms_per_token,
            len if n <= len => f[n - 1],
            1 => f[0],
            len => {
                let (a, b) = (f[len - 2], f[len - 1]);
                (b + (b - a) * (n - len) as f64).max(b)
            }
        }
    }

    /// Time of a step's draft phase: `passes` passes, the first feeding `first_tokens` tokens,
    /// each later one a token.
    pub fn draft_phase(&self, passes: usize, first_tokens: usize) -> f64 {
        match passes {
            0 => 0.0,
            p => self.draft_feed(first_tokens) + (p - 1) as f64 * self.draft_ms_per_token,
        }
    }

    /// Verification time at γ.
    pub fn verify(&self, gamma: u32) -> f64 {
        let v = &self.verify_ms;
        let g = gamma as usize;
        if g < v.len() {
            return v[g];
        }
        if v.len() == 1 {
            return v[0];
        }
        let (a, b) = (v[v.len() - 2], v[v.len() - 1]);
        b + (b - a) * (g - (v.len() - 1)) as f64
    }

    /// Time of a step at γ.
    pub fn step(&self, gamma: u32) -> f64 {
        gamma as f64 * self.draft_ms_per_token + self.verify(gamma)
    }
}

/// What the controller decided for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub gamma: u32,
    /// â(γ)·γ + 1 at the chosen γ (NaN for a fallback).
    pub expected_tokens: f64,
    /// `GAMMA_NONFINITE` when a feature or a prediction was not finite: `gamma` is then the
    /// smallest candidate (the cheapest step, trusting the draft least); 0 for a decision.
    pub flags: u32,
}

/// The 16-unit MLP controller.
#[derive(Clone, Debug)]
pub struct Controller {
    pub mlp: Mlp,
    pub candidates: Vec<u32>,
    /// Maximise tokens per unit time under this model instead of tokens per step.
    pub cost: Option<CostModel>,
}

impl Controller {
    pub fn new(mlp: Mlp, candidates: &[u32], cost: Option<CostModel>) -> Result<Controller> {
        if candidates.is_empty() || candidates.len() > MAX_CANDIDATES || candidates.contains(&0) {
            return Err(Error::Other(format!(
                "1 to {MAX_CANDIDATES} positive candidate γ values are needed, got {candidates:?}"
            )));
        }
        if let Some(c) = &cost {
            c.check()?;
        }
        Ok(Controller {
            mlp,
            candidates: candidates.to_vec(),
            cost,
        })
    }

    /// The decision for draft features `base` = (mean entropy, mean confidence, max entropy, min
    /// confidence) under `compression` (f64, the CPU path). Fail-closed: non-finite features or
    /// predictions give the smallest candidate, flagged.
    pub fn decide(&self, base: [f64; 4], compression: Compression) -> Decision {
        let fallback = Decision {
            gamma: self.candidates.iter().copied().min().unwrap_or(1),
            expected_tokens: f64::NAN,
            flags: GAMMA_NONFINITE,
        };
        if !base.iter().all(|v| v.is_finite()) {
            return fallback;
        }
        let mut best = (f64::NEG_INFINITY, fallback);
        for &g in &self.candidates {
            let a = self.mlp.predict(&[
                base[0],
                base[1],
                base[2],
                base[3],
                compression.code(),
                g as f64,
            ]);
            if !a.is_finite() {
                return fallback;
            }
            let a = a.clamp(0.0, 1.0);
            let tokens = a * g as f64 + 1.0;
            let score = match &self.cost {
                Some(c) => tokens / c.step(g),
                None => tokens,
            };
            if score > best.0 {
                best = (
                    score,
                    Decision {
                        gamma: g,
                        expected_tokens: tokens,
                        flags: 0,
                    },
                );
            }
        }
        best.1
    }

    /// Per-candidate costs for the kernel, if a cost model is set.
    pub fn cost_table(&self) -> Option<Vec<f32>> {
        self.cost
            .as_ref()
            .map(|c| self.candidates.iter().map(|&g| c.step(g) as f32).collect())
    }

    /// The decision exactly as the `gamma_mlp` kernel computes it (f32, same operation order):
    /// (γ, predicted tokens per step, `GAMMA_*` flags — non-zero when `fallback` was used).
    pub fn decide_f32(
        &self,
        weights: &MlpWeights,
        accum: &FeatureAccum,
        code: f32,
        fallback: i32,
    ) -> (i32, f32, u32) {
        let cands: Vec<i32> = self.candidates.iter().map(|&g| g as i32).collect();
        let mut flags = 0;
        if accum.count == 0 {
            flags |= GAMMA_EMPTY;
        }
        if accum.flags != 0 {
            flags |= GAMMA_FLAGGED_ROWS;
        }
        if flags != 0 {
            return (fallback, f32::NAN, flags);
        }
        let n = accum.count as f32;
        let base = [
            accum.entropy_sum / n,
            accum.confidence_sum / n,
            accum.entropy_max,
            accum.confidence_min,
        ];
        let cost = self.cost_table();
        match gamma_mlp::decide(weights, base, code, &cands, cost.as_deref()) {
            Some((c, t)) => (cands[c], t, 0),
            None => (fallback, f32::NAN, GAMMA_NONFINITE),
        }
    }

    /// Kernel parameters for a batch (addresses supplied by the caller).
    pub(crate) fn params(
        &self,
        batch: usize,
        code: f32,
        fallback: i32,
        ptrs: GammaPtrs,
    ) -> GammaMlpParams {
        let mut candidates = [0i32; MAX_CANDIDATES];
        for (c, &g) in candidates.iter_mut().zip(&self.candidates) {
            *c = g as i32;
        }
        GammaMlpParams {
            weights: ptrs.weights,
            accum: ptrs.accum,
            compression: ptrs.compression,
            cost: ptrs.cost,
            gammas_out: ptrs.gammas_out,
            expected_out: ptrs.expected_out,
            flags_out: ptrs.flags_out,
            candidates,
            n_candidates: self.candidates.len() as u32,
            batch: batch as u32,
            fallback_gamma: fallback,
            compression_code: code,
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct GammaPtrs {
    pub weights: *const MlpWeights,
    pub accum: *const FeatureAccum,
    pub compression: *const f32,
    pub cost: *const f32,
    pub gammas_out: *mut i32,
    pub flags_out: *mut u32,
    pub expected_out: *mut f32,
}

/// Reads `path` as JSON of a `what` (e.g. "a cost model"), saying which file was not one.
pub(crate) fn load_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    serde_json::from_str(&s)
        .map_err(|e| Error::Other(format!("{}: not {what}: {e}", path.display())))
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    std::fs::write(path, s + "\n").map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// The per-step predictor shipped with speckv, used by `--policy speckv` / `speckv-cost` without
/// `--controller`: `speckv train --steps results/qwen/{fp16,int8,nf4,gguf}/steps.csv --out
/// host/controller/default_controller.json` (the Qwen2.5-Coder 0.5B → 1.5B traces of every regime;
/// the compression code is one of its inputs).
pub const DEFAULT_CONTROLLER_JSON: &str = include_str!("default_controller.json");

impl Mlp {
    /// The shipped per-step predictor ([`DEFAULT_CONTROLLER_JSON`]).
    pub fn shipped() -> Result<Mlp> {
        let m: Mlp = serde_json::from_str(DEFAULT_CONTROLLER_JSON)
            .map_err(|e| Error::Other(format!("the shipped controller is not valid: {e}")))?;
        m.check()?;
        Ok(m)
    }
}

//! Speculative decoding of a real model on the CPU backend with a γ policy choosing each step's
//! draft length live: draft statistics (`softmax_stats`: entropy, confidence, sampled token) per
//! drafted token, one target pass over the pending token and the γ drafts (M = γ + 1), batched
//! verification (`verify`, B = 1), KV caches rolled back to the accepted prefix.
//!
//! Invariant between steps: both caches hold every committed token except the newest one (the
//! "pending" token), which the next step feeds first; the draft cache may also lag by the drafts
//! it proposed but never fed (the last one of a fully accepted step), kept in a backlog, and by
//! the tokens of steps in which it drafted nothing (`auto`'s plain steps, γ = 0). It catches up on
//! at most [`GenConfig::draft_catch_up`] of them: the older ones it never sees, and its positions
//! trail the target's by as many (`skipped`).

pub mod batch;
pub mod calibrate;
pub mod device;
pub mod pair;
mod policy_files;
pub mod profile;
mod speculative;

pub use policy_files::{policy_from_name, PolicyFiles};
pub use speculative::{speculative, speculative_on, speculative_traced};

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::controller::hazard::HazardModel;
use crate::controller::records::Compression;
use crate::controller::{Controller, CostModel};
use crate::error::{Error, Result};
use crate::model::{CpuPass, Model, Pass};
use crate::stats::{Accumulate, StatsOptions};

/// How γ is chosen each step.
#[derive(Clone, Debug)]
pub enum Policy {
    Fixed(u32),
    /// γ drafts on every `period`-th step (the first included), plain steps between: what a
    /// draft that catches up after plain steps costs, and what its catch-up window
    /// ([`GenConfig::draft_catch_up`]) saves, measured with nothing else changing.
    Every {
        period: u32,
        gamma: u32,
    },
    /// The MLP on the previous step's draft features (lagged: causal).
    SpecKv(Box<Controller>),
    /// Draft while the drafted token's top-1 probability is at least p, up to γmax; a draft below
    /// p is discarded (llama.cpp's `--draft-p-min`).
    Confidence(f32),
    /// HF transformers' default assisted generation: draft until the drafted token's probability
    /// falls below p, that draft kept (its `ConfidenceCriteria` stops after the token it judged),
    /// up to γmax.
    HfThreshold(f32),
    /// HF's schedule: start at 4, +2 after a fully accepted step, −1 otherwise.
    Heuristic,
    /// Per-token stopping by the hazard model under costs measured while decoding
    /// ([`crate::controller::hazard`]), up to γmax.
    Auto(Box<Auto>),
    /// AdaEDL's rule: stop before a draft whose entropy-based lower bound on its acceptance,
    /// 1 − √(κ·H), is below λ (H the draft's entropy in nats), up to γmax.
    AdaEdl {
        lambda: f32,
        kappa: f32,
    },
}

/// The `auto` policy's model and the prior its online costs start from.
#[derive(Clone, Debug)]
pub struct Auto {
    pub model: HazardModel,
    pub prior: CostModel,
    /// The plain-step gate on (`auto`) or off (`auto-nogate`: every step drafts, the stopping
    /// rule alone decides).
    pub gate: bool,
}

impl Auto {
    /// The shipped hazard model, costs starting from [`CostModel::assumed`].
    pub fn shipped() -> Result<Auto> {
        Ok(Auto {
            model: HazardModel::default_model()?,
            prior: CostModel::assumed(),
            gate: true,
        })
    }
}

impl Policy {
    /// γ is chosen before drafting (`fixed:N`, `speckv`, `heuristic`): no per-token decision.
    pub fn up_front(&self) -> bool {
        matches!(
            self,
            Policy::Fixed(_) | Policy::Every { .. } | Policy::SpecKv(_) | Policy::Heuristic
        )
    }

    /// `fixed:N`, `every:N:G` (G drafts every N-th step, plain steps between), `confidence:P`
    /// (llama.cpp's `--draft-p-min P`), `hf-dynamic` (HF transformers' assistant confidence
    /// threshold 0.4, the judged draft kept), `heuristic` (HF's +2/−1 schedule), `adaedl[:λ[:κ]]`,
    /// `auto` (the shipped hazard model); `speckv` and `speckv-cost` need a controller.
    pub fn parse(s: &str, controller: Option<Controller>) -> Result<Policy> {
        let bad = || {
            Error::Other(format!(
                "policy {s:?}: expected fixed:N, every:N:G (N ≥ 1), auto, auto-nogate, speckv, \
                 speckv-cost, confidence:P, hf-dynamic, heuristic or adaedl[:LAMBDA[:KAPPA]]"
            ))
        };
        if s == "auto" || s == "auto-nogate" {
            return Ok(Policy::Auto(Box::new(Auto {
                gate: s == "auto",
                ..Auto::shipped()?
            })));
        }
        if s == "hf-dynamic" {
            return Ok(Policy::HfThreshold(0.4));
        }
        if s == "adaedl" || s.starts_with("adaedl:") {
            let mut it = s.split(':').skip(1);
            let mut num = |d: f32| -> Result<f32> {
                match it.next() {
                    None => Ok(d),
                    Some(v) => v
                        .parse::<f32>()
                        .ok()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(bad),
                }
            };
            let (lambda, kappa) = (num(ADAEDL_LAMBDA)?, num(ADAEDL_KAPPA)?);
            if it.next().is_some() || lambda > 1.0 {
                return Err(bad());
            }
            return Ok(Policy::AdaEdl { lambda, kappa });
        }
        match s.split_once(':') {
            Some(("fixed", n)) => n.parse().map(Policy::Fixed).map_err(|_| bad()),
            Some(("every", rest)) => {
                let (n, g) = rest.split_once(':').ok_or_else(bad)?;
                match (n.parse::<u32>(), g.parse::<u32>()) {
                    (Ok(period @ 1..), Ok(gamma)) => Ok(Policy::Every { period, gamma }),
                    _ => Err(bad()),
                }
            }
            Some(("confidence", p)) => {
                let p: f32 = p.parse().map_err(|_| bad())?;
                if (0.0..=1.0).contains(&p) {
                    Ok(Policy::Confidence(p))
                } else {
                    Err(bad())
                }
            }
            None if s == "heuristic" => Ok(Policy::Heuristic),
            None if s == "speckv" || s == "speckv-cost" => controller
                .map(|c| Policy::SpecKv(Box::new(c)))
                .ok_or_else(|| {
                    Error::Other(format!(
                        "policy {s} needs --controller MODEL.json (from `speckv train`)"
                    ))
                }),
            _ => Err(bad()),
        }
    }
}

/// AdaEDL's defaults here: λ = 0.5 and κ = 0.5 (stop when 1 − √(H/2) < ½, i.e. H > ½ nat). Ours,
/// not the paper's tuned values; `adaedl:λ:κ` sets both.
pub const ADAEDL_LAMBDA: f32 = 0.5;
pub const ADAEDL_KAPPA: f32 = 0.5;

/// The draft: another model, or the target itself with some layers skipped.
pub enum Draft<'a> {
    Model(&'a Model),
    SkipLayers(Vec<bool>),
}

impl Draft<'_> {
    /// The draft's CPU pass: its own model, or `target` running only the kept layers.
    pub fn cpu_pass<'b>(&'b self, target: &'b Model) -> CpuPass<'b> {
        match self {
            Draft::Model(m) => CpuPass::new(m, None),
            Draft::SkipLayers(mask) => CpuPass::new(target, Some(mask.as_slice())),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub seed: u64,
    pub gamma_max: u32,
    pub compression: Compression,
    /// The most committed tokens the draft is fed before a step's first draft (the pending token
    /// included) after steps in which it drafted nothing; it never sees the older ones. `None`:
    /// all of them. Bounds what a step that speculates after a run of plain steps costs: on a
    /// CPU, catching up costs the draft's share of a pass per token skipped.
    pub draft_catch_up: Option<usize>,
}

impl GenConfig {
    /// The configuration's own limits: a catch-up window holds the pending token at least.
    pub(super) fn check_catch_up(&self) -> Result<()> {
        if self.draft_catch_up == Some(0) {
            return Err(Error::Empty {
                what: "the draft's catch-up window (--draft-catch-up)",
            });
        }
        Ok(())
    }
}

pub use crate::controller::replay::DRAFT_CATCH_UP;

/// Cuts a draft's backlog (the committed tokens it has yet to see, oldest first, the pending one
/// last) to the newest `window` of them. Returns how many it dropped: tokens the draft never sees.
pub(super) fn catch_up(backlog: &mut Vec<u32>, window: Option<usize>) -> usize {
    let drop = window.map_or(0, |w| backlog.len().saturating_sub(w));
    backlog.drain(..drop);
    drop
}

#[derive(Clone, Debug, Serialize)]
pub struct GenStats {
    pub tokens: Vec<u32>,
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub acceptance_rate: f64,
    pub mean_gamma: f64,
    pub gamma_histogram: BTreeMap<u32, usize>,
    /// Tokens fed to the draft after the prefill: its drafts, and what it caught up on after
    /// steps in which it drafted nothing.
    pub draft_tokens: usize,
    /// Wall time of the whole call, prefill included.
    pub seconds: f64,
    /// Of which the prompt's prefill.
    pub prefill_seconds: f64,
    /// Tokens per second of the decoding phase (prefill excluded, as llama.cpp's peer measures).
    pub tokens_per_second: f64,
}

/// What one speculation step did, for traces (`speckv profile`).
#[derive(Clone, Debug)]
pub struct StepTrace {
    /// Committed tokens (prompt included) before the step.
    pub position: usize,
    /// Per drafted token: entropy (nats) and top-1 probability of the draft distribution.
    pub entropy: Vec<f32>,
    pub confidence: Vec<f32>,
    /// Drafted tokens γ and accepted k.
    pub gamma: u32,
    pub accepted: u32,
    /// Tokens γ' = 0..=γ would have produced with the same random numbers (min(k, γ') + 1).
    pub counterfactual: Vec<u32>,
    /// Wall time of verification (one target pass over γ + 1 positions and the accept/reject).
    pub verify_seconds: f64,
    /// The draft's passes and their wall time (statistics included), its first feed apart (what
    /// `auto`'s costs learn from), and the tokens fed to the draft in the step (its catch-up
    /// included).
    pub draft: crate::controller::hazard::DraftTime,
    pub draft_tokens: usize,
    /// Tokens the step emitted (accepted drafts and the bonus token), before any stop token is
    /// cut.
    pub emitted: Vec<u32>,
    /// `auto` only: the hazard model's inputs for each draft it decided on — the kept drafts,
    /// then the one it stopped before, if any (empty for other policies).
    pub stop_features: Vec<[f64; crate::controller::mlp::INPUTS]>,
}

pub use crate::model::pass::argmax;

/// Plain decoding of the target (no draft): the reference speculative decoding must equal in
/// greedy mode. Sampling uses the same Gumbel-max stream as the kernels (`softmax_stats`).
pub fn plain(target: &Model, prompt: &[u32], stop: &[u32], cfg: &GenConfig) -> Result<GenStats> {
    plain_streamed(target, prompt, stop, cfg, &mut |_| {})
}

/// [`plain`], calling `on_token` with each token as it is decoded.
pub fn plain_streamed(
    target: &Model,
    prompt: &[u32],
    stop: &[u32],
    cfg: &GenConfig,
    on_token: &mut (dyn FnMut(u32) + Send),
) -> Result<GenStats> {
    plain_on(&mut CpuPass::new(target, None), prompt, stop, cfg, on_token)
}

/// [`plain_streamed`] on any pass (CPU, CUDA, the emulator).
pub fn plain_on(
    pass: &mut (dyn Pass + Send),
    prompt: &[u32],
    stop: &[u32],
    cfg: &GenConfig,
    on_token: &mut (dyn FnMut(u32) + Send),
) -> Result<GenStats> {
    // The loop runs on a thread of the pool: the products' parallel jobs then go to that thread's
    // own queue, not the pool's injector queue (which allocates), and it works on them itself.
    rayon::scope(|_| plain_loop(pass, prompt, stop, cfg, on_token))
}

fn plain_loop(
    pass: &mut (dyn Pass + Send),
    prompt: &[u32],
    stop: &[u32],
    cfg: &GenConfig,
    on_token: &mut (dyn FnMut(u32) + Send),
) -> Result<GenStats> {
    if prompt.is_empty() {
        return Err(Error::Empty { what: "prompt" });
    }
    let start = Instant::now();
    pass.reserve(prompt.len() + cfg.max_tokens + 1)?;
    let opts = |step: usize| StatsOptions {
        temperature: cfg.temperature,
        sample: cfg.temperature != 0.0,
        seed: cfg.seed,
        step: step as u64,
        accumulate: Accumulate::No,
    };
    let mut next = pass.next_token(prompt, &opts(0))?;
    let prefill = start.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(cfg.max_tokens);
    for step in 0..cfg.max_tokens {
        if stop.contains(&next) {
            break;
        }
        on_token(next);
        out.push(next);
        if out.len() == cfg.max_tokens {
            break;
        }
        next = pass.next_token(&[next], &opts(step + 1))?;
    }
    let s = start.elapsed().as_secs_f64();
    Ok(GenStats {
        steps: out.len(),
        drafted: 0,
        accepted: 0,
        acceptance_rate: 0.0,
        mean_gamma: 0.0,
        gamma_histogram: BTreeMap::new(),
        draft_tokens: 0,
        seconds: s,
        prefill_seconds: prefill,
        tokens_per_second: out.len() as f64 / (s - prefill).max(1e-9),
        tokens: out,
    })
}

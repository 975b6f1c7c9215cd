//! `speckv profile`: full-information traces of real speculative decoding.
//!
//! Every step drafts γmax tokens and verifies all of them. With the same random numbers, the first
//! γ' ≤ γmax drafts and the accept/reject decisions on them are exactly those a step at γ' would
//! have made, so one traced step yields the measured outcome of every γ' = 1..=γmax: min(k, γ') + 1
//! tokens. The CSV holds one row per (step, γ'), in the paper's schema (γ' in `gamma`, the features
//! over the first γ' drafts — the *prefix* features a step at γ' would have recorded), plus the
//! trace's own columns: `trace_gamma_max`, `trace_accepted`, the previous step's features (`lag_*`,
//! causal: what a live controller has when it picks γ), the position, the prompt, and the measured
//! draft and verification times of the traced step. `speckv train` reads every row; `speckv
//! evaluate` scores each step once, on its γmax row, where every γ' ≤ γmax is measured.
//!
//! A companion cost model (`*.cost.json`, the `CostModel` of `speckv-cost` and `evaluate --cost`)
//! holds measured per-token draft time and verification time at each γ.

use std::time::Instant;

use serde::Deserialize;

use crate::controller::records::Compression;
use crate::controller::CostModel;
use crate::decode::{Draft, StepTrace, DRAFT_CATCH_UP};
use crate::error::{Error, Result};
use crate::model::{CpuPass, Model, Pass};

/// One prompt of a prompt set (`prompts/prompts.jsonl`: `{"category": …, "prompt": …}`).
#[derive(Clone, Debug, Deserialize)]
pub struct Prompt {
    #[serde(default = "default_category")]
    pub category: String,
    pub prompt: String,
}

fn default_category() -> String {
    "prompt".to_string()
}

/// Reads a JSON-lines prompt file; every line must hold a non-empty `prompt`.
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<Prompt>> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in s.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Prompt = serde_json::from_str(line).map_err(|e| {
            Error::Other(format!(
                "{} line {}: expected {{\"category\": …, \"prompt\": …}}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        if p.prompt.trim().is_empty() {
            return Err(Error::Other(format!(
                "{} line {}: empty prompt",
                path.display(),
                i + 1
            )));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::Empty {
            what: "prompt file",
        });
    }
    Ok(out)
}

pub use crate::controller::records::TraceRow;

/// (mean entropy, mean confidence, max entropy, min confidence) over the first `n` drafts.
fn prefix_features(s: &StepTrace, n: usize) -> [f64; 4] {
    let e = &s.entropy[..n];
    let c = &s.confidence[..n];
    let k = n.max(1) as f64;
    [
        e.iter().map(|&x| x as f64).sum::<f64>() / k,
        c.iter().map(|&x| x as f64).sum::<f64>() / k,
        e.iter().fold(0.0f64, |m, &x| m.max(x as f64)),
        c.iter().fold(1.0f64, |m, &x| m.min(x as f64)),
    ]
}

/// The rows of one prompt's traced steps (each step at γ' = 1..=its γ).
pub fn trace_rows(
    steps: &[StepTrace],
    compression: Compression,
    task: &str,
    run: u32,
    prompt: usize,
) -> Result<Vec<TraceRow>> {
    let mut rows = Vec::new();
    let mut lag: Option<([f64; 4], u32)> = None;
    for (i, s) in steps.iter().enumerate() {
        let g = s.gamma as usize;
        if s.entropy.len() != g || s.confidence.len() != g || s.counterfactual.len() != g + 1 {
            return Err(Error::Other(format!(
                "trace step {i}: γ = {g} but {} entropies, {} confidences, {} counterfactuals",
                s.entropy.len(),
                s.confidence.len(),
                s.counterfactual.len()
            )));
        }
        for gp in 1..=g {
            let f = prefix_features(s, gp);
            let acc = s.accepted.min(gp as u32);
            debug_assert_eq!(s.counterfactual[gp], acc + 1);
            rows.push(TraceRow {
                run,
                compression,
                gamma: gp as u32,
                task: task.to_string(),
                step: i as u32,
                accepted: acc,
                acceptance_rate: acc as f64 / gp as f64,
                tokens_produced: acc + 1,
                mean_draft_entropy: f[0],
                mean_draft_confidence: f[1],
                max_draft_entropy: f[2],
                min_draft_confidence: f[3],
                prompt,
                position: s.position,
                trace_gamma_max: s.gamma,
                trace_accepted: s.accepted,
                lag_mean_draft_entropy: lag.map(|l| l.0[0]),
                lag_mean_draft_confidence: lag.map(|l| l.0[1]),
                lag_max_draft_entropy: lag.map(|l| l.0[2]),
                lag_min_draft_confidence: lag.map(|l| l.0[3]),
                lag_accepted: lag.map(|l| l.1),
                draft_entropy: Some(s.entropy[gp - 1] as f64),
                draft_confidence: Some(s.confidence[gp - 1] as f64),
                draft_ms: s.draft.seconds * 1e3,
                verify_ms: s.verify_seconds * 1e3,
            });
        }
        if g > 0 {
            lag = Some((prefix_features(s, g), s.accepted));
        }
    }
    Ok(rows)
}

/// Measures the step cost model on `context` (a prompt and its continuation): the draft's time
/// per token (M = 1), a draft pass feeding n = 1..=[`DRAFT_CATCH_UP`] tokens (a step's first pass:
/// the pending token, a draft a fully accepted step left unseen, a catch-up after plain steps)
/// and the target's verification time at γ = 0..=γmax (M = γ + 1), each the minimum of `reps`
/// runs, the caches rolled back after each. Milliseconds. The passes hold the context and
/// γmax + 1 (target) or [`DRAFT_CATCH_UP`] (draft) positions more.
pub fn measure_costs(
    target: &Model,
    draft: &Draft<'_>,
    context: &[u32],
    gamma_max: u32,
    reps: usize,
) -> Result<CostModel> {
    let mut tpass = CpuPass::new(target, None);
    let mut dpass = draft.cpu_pass(target);
    measure_costs_on(&mut tpass, &mut dpass, context, gamma_max, reps)
}

/// [`measure_costs`] on any target and draft passes (emptied first). A pass's time includes
/// reading its logits back to the host, as the decode loop does.
pub fn measure_costs_on(
    tpass: &mut dyn Pass,
    dpass: &mut dyn Pass,
    context: &[u32],
    gamma_max: u32,
    reps: usize,
) -> Result<CostModel> {
    if context.len() < 2 || reps == 0 {
        return Err(Error::Other(
            "measuring costs needs a context of at least 2 tokens and reps ≥ 1".to_string(),
        ));
    }
    tpass.truncate(0);
    dpass.truncate(0);
    let fill: Vec<u32> = context
        .iter()
        .cycle()
        .take((gamma_max as usize + 1).max(DRAFT_CATCH_UP))
        .copied()
        .collect();
    tpass.run(context, 1)?;
    let base = tpass.len();
    let mut verify_ms = Vec::new();
    for g in 0..=gamma_max as usize {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            tpass.run(&fill[..g + 1], g + 1)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            tpass.truncate(base);
        }
        verify_ms.push(best);
    }
    dpass.run(context, 1)?;
    let dbase = dpass.len();
    // A feed of n tokens keeps one row of logits, as a step's first draft pass does.
    let mut draft_feed_ms = Vec::with_capacity(DRAFT_CATCH_UP);
    for n in 1..=DRAFT_CATCH_UP {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            dpass.run(&fill[..n], 1)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            dpass.truncate(dbase);
        }
        draft_feed_ms.push(best);
    }
    Ok(CostModel {
        draft_ms_per_token: draft_feed_ms[0],
        verify_ms,
        draft_feed_ms,
        source: format!(
            "measured by speckv profile: draft M = 1, draft feeds of 1..={DRAFT_CATCH_UP} tokens \
             and target M = γ + 1 at context {}, min of {reps}",
            context.len()
        ),
    })
}

/// The mean of several measured cost models (one per prompt).
pub fn mean_costs(models: &[CostModel]) -> Result<CostModel> {
    let first = models.first().ok_or(Error::Empty {
        what: "cost models",
    })?;
    let n = models.len() as f64;
    let len = first.verify_ms.len();
    let feeds = first.draft_feed_ms.len();
    if models
        .iter()
        .any(|m| m.verify_ms.len() != len || m.draft_feed_ms.len() != feeds)
    {
        return Err(Error::Other(
            "cost models of different γ ranges or draft feeds".to_string(),
        ));
    }
    let mean = |f: &dyn Fn(&CostModel) -> f64| models.iter().map(f).sum::<f64>() / n;
    Ok(CostModel {
        draft_ms_per_token: mean(&|m| m.draft_ms_per_token),
        verify_ms: (0..len).map(|i| mean(&|m| m.verify_ms[i])).collect(),
        draft_feed_ms: (0..feeds).map(|i| mean(&|m| m.draft_feed_ms[i])).collect(),
        source: format!("mean over {} prompts; {}", models.len(), first.source),
    })
}

pub use crate::controller::replay::{
    fixed_tokens_per_second, heuristic_tokens_per_second, oracle_tokens_per_second, TracedStep,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::hazard::DraftTime;

    fn step(gamma: u32, k: u32) -> StepTrace {
        StepTrace {
            position: 10,
            entropy: (0..gamma).map(|i| i as f32).collect(),
            confidence: (0..gamma).map(|i| 1.0 - 0.1 * i as f32).collect(),
            gamma,
            accepted: k,
            counterfactual: (0..=gamma).map(|g| k.min(g) + 1).collect(),
            verify_seconds: 0.02,
            draft: DraftTime::steady(gamma as usize, 0.01),
            draft_tokens: 0,
            emitted: vec![1; k as usize + 1],
            stop_features: Vec::new(),
        }
    }

    #[test]
    fn rows_expand_every_prefix_with_lagged_features() {
        let rows = trace_rows(&[step(3, 1), step(3, 3)], Compression::Int8, "code", 2, 7).unwrap();
        assert_eq!(rows.len(), 6);
        let acc: Vec<u32> = rows.iter().map(|r| r.accepted).collect();
        assert_eq!(acc, [1, 1, 1, 1, 2, 3]);
        assert_eq!(rows[1].mean_draft_entropy, 0.5);
        assert_eq!(rows[2].max_draft_entropy, 2.0);
        assert!((rows[2].min_draft_confidence - 0.8).abs() < 1e-6);
        assert!(rows[0].lag_accepted.is_none());
        assert_eq!(rows[3].lag_accepted, Some(1));
        assert_eq!(rows[3].lag_mean_draft_entropy, Some(1.0));
        assert!(rows.iter().all(|r| r.tokens_produced == r.accepted + 1));
    }

    #[test]
    fn malformed_step_is_an_error() {
        let mut s = step(3, 1);
        s.entropy.pop();
        assert!(trace_rows(&[s], Compression::Fp16, "x", 0, 0).is_err());
    }
}

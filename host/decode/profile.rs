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
use crate::controller::replay::DraftLag;
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

/// A traced step: its γmax, the drafts accepted at γmax, and whether it is its prompt's first.
pub type TracedStep = (u32, u32, bool);

/// A traced step replayed at γ ≥ 1 drafts (`accepted` of its γmax accepted), the draft lagging
/// by `lag` before it: its tokens, its time and the lag after it.
fn replayed_step(
    cost: &CostModel,
    gamma: u32,
    accepted: u32,
    lag: DraftLag,
) -> (f64, f64, DraftLag) {
    let g = gamma as usize;
    let k = accepted.min(gamma);
    let time = cost.draft_phase(g, lag.first_feed()) + cost.verify(gamma);
    let mut next = lag;
    next.after_step(g, g, k as usize);
    ((k + 1) as f64, time, next)
}

/// What the draft has yet to see when a prompt's decoding starts (the decode loop's default
/// catch-up window).
fn fresh_lag() -> DraftLag {
    DraftLag::new(Some(DRAFT_CATCH_UP))
}

/// Oracle throughput from traces under a cost model: tokens per second when every step takes the
/// γ' (1..=γmax) that maximises the run's total tokens per total time. A step's time depends on
/// the step before it (a fully accepted step leaves its last draft for the next step's first
/// pass to feed, [`DraftLag`]), so the best choice for a given λ is a dynamic programme over
/// that lag; the choice that maximises a ratio of sums is found by Dinkelbach's iteration: pick
/// the choices maximising tokens − λ·time, set λ to the resulting ratio, repeat until it stops
/// growing.
pub fn oracle_tokens_per_second(steps: &[TracedStep], cost: &CostModel) -> Option<f64> {
    if steps.is_empty() || steps.iter().any(|s| s.0 == 0) {
        return None;
    }
    let mut lambda = 0.0f64;
    for _ in 0..100 {
        // The best (tokens − λ·time, tokens, time) so far for each lag the next step meets.
        let mut paths: Vec<(DraftLag, f64, f64, f64)> = vec![(fresh_lag(), 0.0, 0.0, 0.0)];
        for (i, &(gmax, k, first)) in steps.iter().enumerate() {
            if first && i > 0 {
                let best = *paths.iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
                paths = vec![(fresh_lag(), best.1, best.2, best.3)];
            }
            let mut next: Vec<(DraftLag, f64, f64, f64)> = Vec::with_capacity(2);
            for &(lag, v, tok, time) in &paths {
                for g in 1..=gmax {
                    let (t, ms, after) = replayed_step(cost, g, k, lag);
                    let cand = (after, v + t - lambda * ms, tok + t, time + ms);
                    match next.iter_mut().find(|n| n.0 == after) {
                        Some(n) if n.1 >= cand.1 => {}
                        Some(n) => *n = cand,
                        None => next.push(cand),
                    }
                }
            }
            paths = next;
        }
        let best = paths.iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
        let next = best.2 / best.3;
        if next <= lambda * (1.0 + 1e-12) {
            return Some(next.max(lambda) * 1e3);
        }
        lambda = next;
    }
    Some(lambda * 1e3)
}

/// Tokens per second of a fixed γ on traced steps (γ ≤ each step's γmax) under a cost model.
pub fn fixed_tokens_per_second(steps: &[TracedStep], gamma: u32, cost: &CostModel) -> Option<f64> {
    if steps.is_empty() || gamma == 0 || steps.iter().any(|&(gmax, ..)| gamma > gmax) {
        return None;
    }
    let (mut tok, mut time, mut lag) = (0.0f64, 0.0f64, fresh_lag());
    for &(_, k, first) in steps {
        if first {
            lag = fresh_lag();
        }
        let (t, ms, after) = replayed_step(cost, gamma, k, lag);
        (tok, time, lag) = (tok + t, time + ms, after);
    }
    Some(tok / time * 1e3)
}

/// HF's heuristic schedule replayed on traced steps: γ starts at 4 on each prompt, +2 after a
/// fully accepted step, −1 (at least 1) otherwise, at most γmax; a traced step at γ yields
/// min(k, γ) + 1 tokens at γ's cost (steps are replayed where they were traced, as for
/// [`fixed_tokens_per_second`]).
pub fn heuristic_tokens_per_second(steps: &[TracedStep], cost: &CostModel) -> Option<f64> {
    if steps.is_empty() {
        return None;
    }
    let (mut tok, mut time, mut g, mut lag) = (0.0f64, 0.0f64, 4u32, fresh_lag());
    for &(gmax, k, first) in steps {
        if first {
            (g, lag) = (4, fresh_lag());
        }
        let gamma = g.min(gmax).max(1);
        let (t, ms, after) = replayed_step(cost, gamma, k, lag);
        (tok, time, lag) = (tok + t, time + ms, after);
        g = if k >= gamma {
            (gamma + 2).min(gmax)
        } else {
            gamma.saturating_sub(1).max(1)
        };
    }
    Some(tok / time * 1e3)
}

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

    /// Every γ per step (1..=4) of `steps`, its tokens and time charged as the decode loop
    /// pays them: a step's first draft pass feeds 2 tokens after a fully accepted step, 1 after
    /// a prompt's start or a partly accepted step.
    fn exhaustive_best(steps: &[TracedStep], cost: &CostModel) -> f64 {
        let mut best = 0.0f64;
        for code in 0..4usize.pow(steps.len() as u32) {
            let (mut tok, mut time, mut feed) = (0.0, 0.0, 1usize);
            for (i, &(_, k, first)) in steps.iter().enumerate() {
                let g = (code / 4usize.pow(i as u32) % 4) as u32 + 1;
                if first {
                    feed = 1;
                }
                tok += (k.min(g) + 1) as f64;
                time += cost.draft_feed(feed) + (g - 1) as f64 * cost.draft_ms_per_token;
                time += cost.verify(g);
                feed = if k >= g { 2 } else { 1 };
            }
            best = best.max(tok / time * 1e3);
        }
        best
    }

    #[test]
    fn oracle_beats_or_ties_every_fixed_gamma() {
        let flat = CostModel {
            draft_ms_per_token: 1.0,
            verify_ms: vec![3.0, 3.1, 3.2, 3.3, 3.4],
            draft_feed_ms: Vec::new(),
            source: String::new(),
        };
        // A 2-token first feed as dear as 3 one-token passes: after a fully accepted step the
        // next step costs 2 more, so the oracle's best choice depends on the step before.
        let fed = CostModel {
            draft_feed_ms: vec![1.0, 3.0, 4.0],
            ..flat.clone()
        };
        let steps = [
            (4, 0, true),
            (4, 4, false),
            (4, 1, false),
            (4, 4, false),
            (4, 4, true),
            (4, 2, false),
        ];
        for cost in [&flat, &fed] {
            let o = oracle_tokens_per_second(&steps, cost).unwrap();
            for g in 1..=4 {
                let f = fixed_tokens_per_second(&steps, g, cost).unwrap();
                assert!(o >= f - 1e-9, "γ={g}: {f} > oracle {o}");
            }
            // All-rejected steps: the oracle takes γ = 1 on them, which no fixed γ > 1 does.
            let f4 = fixed_tokens_per_second(&steps, 4, cost).unwrap();
            assert!(o > f4);
            assert!(fixed_tokens_per_second(&steps, 5, cost).is_none());
            assert!(fixed_tokens_per_second(&steps, 0, cost).is_none());
            let best = exhaustive_best(&steps, cost);
            assert!((o - best).abs() < 1e-9, "oracle {o} vs exhaustive {best}");
        }
        // The dear feed is charged: fixed γ = 4 accepts steps 2, 4 and 5 fully, and pays it on
        // steps 3 and 6 (step 5 starts a prompt: a fresh draft has nothing left unseen).
        let f_flat = fixed_tokens_per_second(&steps, 4, &flat).unwrap();
        let f_fed = fixed_tokens_per_second(&steps, 4, &fed).unwrap();
        let tok = (1 + 5 + 2 + 5 + 5 + 3) as f64;
        assert!((f_flat - tok / (6.0 * 7.4) * 1e3).abs() < 1e-9, "{f_flat}");
        assert!(
            (f_fed - tok / (6.0 * 7.4 + 2.0 * 2.0) * 1e3).abs() < 1e-9,
            "{f_fed}"
        );
        let (o_flat, o_fed) = (
            oracle_tokens_per_second(&steps, &flat).unwrap(),
            oracle_tokens_per_second(&steps, &fed).unwrap(),
        );
        assert!(o_fed < o_flat, "{o_fed} vs {o_flat}");
    }

    #[test]
    fn draft_feeds_are_measured_values_then_a_line() {
        let c = CostModel {
            draft_ms_per_token: 2.0,
            verify_ms: vec![10.0],
            draft_feed_ms: vec![2.0, 3.0, 5.0],
            source: String::new(),
        };
        assert_eq!(
            (1..=5).map(|n| c.draft_feed(n)).collect::<Vec<_>>(),
            [2.0, 3.0, 5.0, 7.0, 9.0]
        );
        assert_eq!(c.draft_feed(0), 2.0);
        assert_eq!(c.draft_phase(0, 4), 0.0);
        assert_eq!(c.draft_phase(3, 2), 3.0 + 2.0 * 2.0);
        // A falling line does not fall below the last measured feed.
        let falling = CostModel {
            draft_feed_ms: vec![4.0, 3.0],
            ..c.clone()
        };
        assert_eq!(falling.draft_feed(6), 3.0);
        // Not measured: every pass costs a token's.
        let none = CostModel {
            draft_feed_ms: Vec::new(),
            ..c.clone()
        };
        assert_eq!(none.draft_phase(3, 8), 6.0);
        let bad = CostModel {
            draft_feed_ms: vec![1.0, 0.0],
            ..c
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn heuristic_replay_follows_the_schedule_and_restarts_per_prompt() {
        let cost = CostModel {
            draft_ms_per_token: 1.0,
            verify_ms: (0..=8).map(|g| 10.0 + g as f64).collect(),
            draft_feed_ms: Vec::new(),
            source: String::new(),
        };
        // Prompt 1: full accept at γ 4 (→ 6), at 6 (→ 8), then 2 of 8 accepted (→ 7). Prompt 2
        // starts again at 4: full accept (→ 6), then two rejections (6 → 5 → 4).
        let steps = [
            (8, 8, true),
            (8, 8, false),
            (8, 2, false),
            (8, 8, true),
            (8, 0, false),
            (8, 0, false),
        ];
        let gammas = [4u32, 6, 8, 4, 6, 5];
        let tok: f64 = [5.0, 7.0, 3.0, 5.0, 1.0, 1.0].iter().sum();
        let time: f64 = gammas.iter().map(|&g| cost.step(g)).sum();
        let got = heuristic_tokens_per_second(&steps, &cost).unwrap();
        assert!((got - tok / time * 1e3).abs() < 1e-9, "{got}");
        assert!(heuristic_tokens_per_second(&[], &cost).is_none());
        // A 2-token first feed 0.5 dearer: paid on steps 2 and 3 (after full steps 1 and 2) and
        // 5 (after step 4), not on step 4 (a prompt's first).
        let fed = CostModel {
            draft_feed_ms: vec![1.0, 1.5],
            ..cost
        };
        let got = heuristic_tokens_per_second(&steps, &fed).unwrap();
        assert!((got - tok / (time + 1.5) * 1e3).abs() < 1e-9, "{got}");
    }
}

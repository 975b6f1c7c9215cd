//! The `auto` policy replayed on full-information traces (`speckv profile`: every step drafted
//! γmax tokens, each draft's entropy and confidence recorded with the step's accepted count), under
//! a fixed cost model: what `auto` would have emitted and spent on the very steps the trace oracle
//! and the fixed-γ sweep are computed on. The whole policy runs — the stopping rule, the online
//! calibration and the plain-step gate, restarted for every prompt as `generate` restarts them —
//! with the costs held at the model's (no timing noise). HF's default schedule, its heuristic,
//! the fixed-γ sweep and the oracle are replayed here too, every step charged as the decode loop
//! pays it: its first draft pass feeds what the draft has yet to see ([`DraftLag`]).

use std::collections::BTreeMap;

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::controller::hazard::{AutoState, DraftTime, HazardModel};
use crate::controller::hazard_training::{draft_values, trace_steps};
use crate::controller::records::TraceRow;
use crate::controller::CostModel;
use crate::error::{Error, Result};

/// The command line's catch-up window (`--draft-catch-up`): 8 tokens a sequence, so a batch of 8
/// catches up in at most 4 passes of 16 rows however long it decoded plain. Measured on this
/// project's CPU (README, "The draft's catch-up window"): it halves what `auto`'s batched probes
/// feed the draft at 128 tokens and cuts it to about a quarter at 256; where drafts are mostly
/// accepted (the Qwen pair, B = 4) acceptance with it was no lower than without, while a window of
/// 2 lowered it.
pub const DRAFT_CATCH_UP: usize = 8;

/// What the draft has yet to be fed before a step's first draft, as the decode loop keeps it
/// (`decode::speculative`'s backlog): the pending token; the last draft of a fully accepted step
/// whose drafting stopped on it (so never fed it); the tokens of plain steps; at most `window` of
/// them (the catch-up window). The replays charge a step's first draft pass this many tokens
/// ([`CostModel::draft_feed`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftLag {
    unseen: usize,
    window: Option<usize>,
}

impl DraftLag {
    /// After the prompt's prefill: the pending token alone.
    pub fn new(window: Option<usize>) -> DraftLag {
        DraftLag { unseen: 1, window }
    }

    /// Tokens the next step's first draft pass feeds.
    pub fn first_feed(&self) -> usize {
        self.window
            .map_or(self.unseen, |w| self.unseen.min(w.max(1)))
    }

    /// After a step of `passes` draft passes (0: a plain step) that verified `gamma` drafts, of
    /// which `accepted` were accepted. A step drafting γ tokens made γ passes, or γ + 1 when its
    /// rule computed a draft past the last one it kept (that pass fed the last kept draft:
    /// [`draft_keep`]'s `last_fed`).
    pub fn after_step(&mut self, passes: usize, gamma: usize, accepted: usize) {
        self.unseen = if passes == 0 {
            self.first_feed() + 1
        } else if gamma == 0 {
            1
        } else {
            1 + usize::from(draft_keep(accepted.min(gamma), gamma, passes > gamma).1)
        };
    }
}

/// After a step of `g ≥ 1` drafts with `k` accepted, the drafts the draft's cache keeps past the
/// pending token, and whether the last draft (accepted, but never fed: `last_fed` false) goes to
/// the backlog. Drafting g tokens fed the draft x_0..x_{g-2} — and x_{g-1} too when a per-token
/// stop fed it — after the pending token. The decode loops truncate the draft's cache by it and
/// [`DraftLag`] counts the backlog by it: one rule for both.
pub fn draft_keep(k: usize, g: usize, last_fed: bool) -> (usize, bool) {
    let keep = if k == g && last_fed { g } else { k.min(g - 1) };
    (keep, k == g && !last_fed)
}

/// What the replay produced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Replay {
    pub tokens_per_second: f64,
    pub mean_gamma: f64,
    /// Steps the gate made plain.
    pub plain_steps: usize,
    pub steps: usize,
}

/// Replays `auto` with `model` on trace rows (grouped by run, prompt and step, in file order).
/// Tokens per second use `cost`'s milliseconds: a step of n draft passes that verifies γ costs
/// its draft phase (the first pass feeding what the draft has yet to see, [`DraftLag`] with the
/// command line's window, the others a token each) + verify(γ); a plain step verify(0). `auto`
/// measures the draft on those passes as it does live ([`DraftTime::measured`]).
pub fn auto_on_traces(rows: &[TraceRow], model: &HazardModel, cost: &CostModel) -> Result<Replay> {
    auto_replay(rows, model, cost, true)
}

/// [`auto_on_traces`] with the plain-step gate off: every step drafts, and the stopping rule alone
/// decides (it may still discard a step's first draft). Against [`auto_on_traces`] it measures
/// what the gate's plain steps gain or lose.
pub fn auto_without_gate_on_traces(
    rows: &[TraceRow],
    model: &HazardModel,
    cost: &CostModel,
) -> Result<Replay> {
    auto_replay(rows, model, cost, false)
}

fn auto_replay(
    rows: &[TraceRow],
    model: &HazardModel,
    cost: &CostModel,
    gate: bool,
) -> Result<Replay> {
    let prompts = prompt_steps(rows)?;
    let (mut tokens, mut ms, mut gammas) = (0.0f64, 0.0f64, 0usize);
    let (mut plain, mut steps) = (0usize, 0usize);
    for step_rows in prompts.values() {
        let mut auto = AutoState::new(model, cost.clone());
        auto.gate_off = !gate;
        let mut lag = DraftLag::new(Some(DRAFT_CATCH_UP));
        for step in step_rows {
            let gmax = step.len();
            let accepted = step[0].trace_accepted as usize;
            let compression = step[0].compression;
            let (costs, g_allowed, mut rule) = auto.begin_step(gmax);
            let mut accum = FeatureAccum::EMPTY;
            let (mut gamma, mut forwards) = (0usize, 0usize);
            for n in 0..g_allowed {
                let (e, c) = draft_values(step, n);
                let st = RowStats {
                    entropy: e as f32,
                    confidence: c as f32,
                    ..Default::default()
                };
                accum.push(st.entropy, st.confidence, 0);
                forwards += 1;
                let d = rule.decide(&auto.weights, &accum, &st, compression, &costs, g_allowed);
                auto.record(&d);
                gamma += d.keep as usize;
                if !d.more {
                    break;
                }
            }
            let first = lag.first_feed();
            let draft_ms = cost.draft_phase(forwards, first);
            let verify_ms = cost.verify(gamma as u32);
            let draft = DraftTime {
                passes: forwards,
                seconds: draft_ms,
                first_passes: forwards.min(1),
                first_seconds: cost.draft_phase(forwards.min(1), first),
                first_tokens: first,
            };
            auto.end_step(&draft, gamma, verify_ms, accepted.min(gamma));
            lag.after_step(forwards, gamma, accepted.min(gamma));
            tokens += (accepted.min(gamma) + 1) as f64;
            ms += draft_ms + verify_ms;
            gammas += gamma;
            plain += (g_allowed == 0) as usize;
            steps += 1;
        }
    }
    Ok(Replay {
        tokens_per_second: tokens / ms * 1e3,
        mean_gamma: gammas as f64 / steps as f64,
        plain_steps: plain,
        steps,
    })
}

/// HF transformers' default assisted-generation schedule (`num_assistant_tokens` 20, schedule
/// `constant`, `assistant_confidence_threshold` 0.4) replayed on trace rows under `cost`: a step
/// drafts until a draft's probability falls below `threshold` — that draft included, as HF's
/// `ConfidenceCriteria` stops after the token it judges — and at most the trace's γmax (HF allows
/// 20). HF also re-fits the threshold online (an ROC cost over past drafts, when scikit-learn is
/// installed); the replay holds it fixed. Steps cost as in [`auto_on_traces`].
pub fn threshold_on_traces(rows: &[TraceRow], cost: &CostModel, threshold: f64) -> Result<Replay> {
    confidence_stop_on_traces(rows, cost, threshold, true)
}

/// llama.cpp's `--draft-p-min P` rule (`--policy confidence:P`) replayed on trace rows under
/// `cost`: a step drafts until a draft's probability falls below `p_min`, that draft discarded
/// (its pass spent: a first draft below it makes the step verify none), at most the trace's γmax.
/// Steps cost as in [`auto_on_traces`]. Swept over `p_min` it is the best such rule in hindsight:
/// one parameter tuned on the very steps it is scored on, a bar a causal policy should reach.
pub fn p_min_on_traces(rows: &[TraceRow], cost: &CostModel, p_min: f64) -> Result<Replay> {
    confidence_stop_on_traces(rows, cost, p_min, false)
}

/// Drafts until a draft's probability is below `threshold`, keeping that draft (`keep_judged`,
/// HF) or not (llama.cpp).
fn confidence_stop_on_traces(
    rows: &[TraceRow],
    cost: &CostModel,
    threshold: f64,
    keep_judged: bool,
) -> Result<Replay> {
    let prompts = prompt_steps(rows)?;
    let (mut tokens, mut ms, mut gammas, mut steps) = (0.0f64, 0.0f64, 0usize, 0usize);
    for step_rows in prompts.values() {
        let mut lag = DraftLag::new(Some(DRAFT_CATCH_UP));
        for step in step_rows {
            let gmax = step.len();
            let below = (0..gmax).find(|&n| draft_values(step, n).1 < threshold);
            // Passes made, and drafts verified.
            let (passes, gamma) = match below {
                Some(n) => (n + 1, n + usize::from(keep_judged)),
                None => (gmax, gmax),
            };
            let accepted = (step[0].trace_accepted as usize).min(gamma);
            tokens += (accepted + 1) as f64;
            ms += cost.draft_phase(passes, lag.first_feed()) + cost.verify(gamma as u32);
            lag.after_step(passes, gamma, accepted);
            gammas += gamma;
            steps += 1;
        }
    }
    Ok(Replay {
        tokens_per_second: tokens / ms * 1e3,
        mean_gamma: gammas as f64 / steps as f64,
        plain_steps: 0,
        steps,
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

/// Each (run, prompt)'s trace steps in order, a step its rows γ = 1..=γmax.
type PromptSteps<'a> = BTreeMap<(u32, usize), Vec<&'a [TraceRow]>>;

/// Trace steps (each its rows γ = 1..=γmax) per (run, prompt), in order; an error for a step
/// missing rows, or for no step at all.
fn prompt_steps(rows: &[TraceRow]) -> Result<PromptSteps<'_>> {
    let mut prompts = PromptSteps::new();
    for step in trace_steps(rows) {
        let r = &step[0];
        if step.len() as u32 != r.trace_gamma_max {
            return Err(Error::Other(format!(
                "trace rows of run {} prompt {} step {}: {} rows for γmax {} (a full-information \
                 trace lists every drafted position)",
                r.run,
                r.prompt,
                r.step,
                step.len(),
                r.trace_gamma_max
            )));
        }
        prompts.entry((r.run, r.prompt)).or_default().push(step);
    }
    if prompts.is_empty() {
        return Err(Error::Empty {
            what: "trace rows (no step to replay)",
        });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

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

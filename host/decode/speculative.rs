//! The speculative loop: draft up to γ tokens (the policy may stop earlier, per token), verify them
//! in one target pass, commit the accepted ones and the bonus token, roll both caches back.

use std::time::Instant;

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::controller::hazard::{AutoState, DraftTime, StopRule};
use crate::controller::replay::draft_keep;
use crate::decode::{catch_up, Draft, GenConfig, GenStats, Policy, StepTrace};
use crate::error::{Error, Result};
use crate::model::{CpuPass, DraftRun, Model, Pass};
use crate::stats::{Accumulate, StatsOptions};
use crate::verify::{VerifyOutput, VerifyStep};

/// Speculative decoding of `prompt` with `policy`.
pub fn speculative(
    target: &Model,
    draft: &Draft<'_>,
    prompt: &[u32],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
) -> Result<GenStats> {
    speculative_traced(target, draft, prompt, stop, policy, cfg, &mut |_| {})
}

/// [`speculative`], calling `on_step` after every speculation step.
pub fn speculative_traced(
    target: &Model,
    draft: &Draft<'_>,
    prompt: &[u32],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&StepTrace) + Send),
) -> Result<GenStats> {
    let mut tpass = CpuPass::new(target, None);
    let mut dpass = draft.cpu_pass(target);
    speculative_on(&mut tpass, &mut dpass, prompt, stop, policy, cfg, on_step)
}

/// [`speculative_traced`] on any target and draft passes (CPU, CUDA, the emulator).
pub fn speculative_on(
    tpass: &mut (dyn Pass + Send),
    dpass: &mut (dyn Pass + Send),
    prompt: &[u32],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&StepTrace) + Send),
) -> Result<GenStats> {
    // On a pool thread, as `plain_streamed`.
    rayon::scope(|_| speculative_loop(tpass, dpass, prompt, stop, policy, cfg, on_step))
}

fn speculative_loop(
    tpass: &mut (dyn Pass + Send),
    dpass: &mut (dyn Pass + Send),
    prompt: &[u32],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&StepTrace) + Send),
) -> Result<GenStats> {
    if prompt.is_empty() {
        return Err(Error::Empty { what: "prompt" });
    }
    cfg.check_catch_up()?;
    if cfg.gamma_max == 0 || cfg.gamma_max as usize > crate::weights::gemv::MAX_M - 1 {
        return Err(Error::Other(format!(
            "γmax must be 1..={}",
            crate::weights::gemv::MAX_M - 1
        )));
    }
    let v = tpass.cfg().vocab;
    if dpass.cfg().vocab != v {
        return Err(Error::Other(format!(
            "draft vocabulary {} differs from the target's {v}",
            dpass.cfg().vocab
        )));
    }
    let start = Instant::now();
    let room = prompt.len() + cfg.max_tokens + cfg.gamma_max as usize + 2;
    tpass.reserve(room)?;
    dpass.reserve(room)?;
    // Prefill all but the last prompt token; it becomes the pending token.
    let (head, last) = prompt.split_at(prompt.len() - 1);
    if !head.is_empty() {
        tpass.run(head, 1)?;
        dpass.run(head, 1)?;
    }
    let prefill = start.elapsed().as_secs_f64();
    let mut pending = last[0];
    // Every buffer of the loop, sized for its largest step here: a step allocates nothing.
    let greedy = cfg.temperature == 0.0;
    let gm = cfg.gamma_max as usize;
    let mut backlog: Vec<u32> = Vec::with_capacity(room);
    let mut feed: Vec<u32> = Vec::with_capacity(room);
    let mut out: Vec<u32> = Vec::with_capacity(cfg.max_tokens);
    let mut xs: Vec<u32> = Vec::with_capacity(gm);
    // Draft rows are kept only when sampling (verification then needs the draft's distribution).
    let mut qrows: Vec<f32> = Vec::with_capacity(if greedy { 0 } else { gm * v });
    let mut tin: Vec<u32> = Vec::with_capacity(gm + 1);
    let mut tokens: Vec<i32> = Vec::with_capacity(gm);
    let mut vout = VerifyOutput::new(1, gm);
    let mut run = DraftRun::with_capacity(gm, if greedy { 0 } else { gm * v });
    let mut trace = StepTrace {
        position: 0,
        entropy: Vec::with_capacity(gm),
        confidence: Vec::with_capacity(gm),
        gamma: 0,
        accepted: 0,
        counterfactual: Vec::with_capacity(gm + 1),
        verify_seconds: 0.0,
        draft: DraftTime::default(),
        draft_tokens: 0,
        emitted: Vec::with_capacity(gm + 1),
        stop_features: Vec::with_capacity(gm + 1),
    };
    // `auto`: its model with the step costs it measures while decoding.
    let mut auto = match policy {
        Policy::Auto(a) => {
            let mut s = AutoState::new(&a.model, a.prior.clone());
            s.gate_off = !a.gate;
            Some(s)
        }
        _ => None,
    };
    let mut hist = [0usize; crate::weights::gemv::MAX_M];
    let (mut steps, mut drafted, mut accepted_total) = (0usize, 0usize, 0usize);
    let mut draft_tokens = 0usize;
    // Committed tokens the draft never saw (its catch-up window): its cache trails by as many.
    let mut skipped = 0usize;
    let mut prev_accum: Option<FeatureAccum> = None;
    let mut heuristic_gamma = 4u32;
    let mut rng_step = 0u64;
    'outer: while out.len() < cfg.max_tokens {
        let gmax = step_gamma(policy, steps, prev_accum.as_ref(), heuristic_gamma, cfg);
        // Draft up to gmax tokens.
        let t_draft = Instant::now();
        trace.entropy.clear();
        trace.confidence.clear();
        xs.clear();
        qrows.clear();
        let mut accum = [FeatureAccum::EMPTY];
        let mut fed = false;
        let mut forwards = 0usize;
        // The step's first feed and the tokens fed to the draft (catch-up included).
        let (mut first_passes, mut first_seconds, mut first_tokens) = (0usize, 0f64, 0usize);
        let draft_tokens_before = draft_tokens;
        // `auto`: the gate may make this a plain step; the rule carries the calibration.
        let (costs, gmax, mut rule) = match auto.as_mut() {
            Some(a) => {
                let (c, g, r) = a.begin_step(gmax as usize);
                (Some(c), g as u32, r)
            }
            None => (None, gmax, StopRule::new()),
        };
        trace.stop_features.clear();
        feed.clear();
        backlog.push(pending);
        skipped += catch_up(&mut backlog, cfg.draft_catch_up);
        feed.append(&mut backlog);
        // A γ chosen before drafting needs no per-token decision: the pass runs the whole phase
        // (on CUDA enqueued at once, each token fed on the device, one wait).
        let up_front = policy.up_front();
        if up_front && gmax > 0 {
            let o = StatsOptions {
                temperature: cfg.temperature,
                sample: !greedy,
                seed: crate::philox::derive(cfg.seed, crate::philox::PURPOSE_DRAFT, 0),
                step: rng_step,
                accumulate: Accumulate::Reset,
            };
            dpass.draft_run(&feed, gmax as usize, &o, !greedy, &mut run)?;
            draft_tokens += feed.len() + run.tokens.len().saturating_sub(1);
            first_tokens = feed.len(); // one phase: its first pass is not timed apart
            rng_step += gmax as u64;
            fed = true;
            forwards = run.tokens.len();
            accum[0] = run.accum;
            xs.extend_from_slice(&run.tokens);
            trace.entropy.extend(run.stats.iter().map(|s| s.entropy));
            trace
                .confidence
                .extend(run.stats.iter().map(|s| s.confidence));
            qrows.extend_from_slice(&run.rows);
        }
        while !up_front && (xs.len() as u32) < gmax {
            let o = StatsOptions {
                temperature: cfg.temperature,
                sample: !greedy,
                seed: crate::philox::derive(cfg.seed, crate::philox::PURPOSE_DRAFT, 0),
                step: rng_step,
                accumulate: if xs.is_empty() {
                    Accumulate::Reset
                } else {
                    Accumulate::Add
                },
            };
            rng_step += 1;
            // The statistics are computed where the logits are, and `auto`'s stopping rule
            // decides there too (on a device pass, in the statistics kernel's epilogue); the row
            // comes back only when sampling (verification then needs the draft's distribution).
            let mut ds = match (auto.as_ref(), costs.as_ref()) {
                (Some(a), Some(c)) => {
                    Some(rule.draft_stop(&a.weights, cfg.compression, c, gmax as usize))
                }
                _ => None,
            };
            let t_pass = Instant::now();
            let (st, q) = dpass.run_stats(&feed, &o, &mut accum, !greedy, ds.as_mut())?;
            if forwards == 0 {
                (first_passes, first_tokens) = (1, feed.len());
                first_seconds = t_pass.elapsed().as_secs_f64();
            }
            draft_tokens += feed.len();
            let after = ds.map(|d| d.state);
            fed = true;
            forwards += 1;
            if st.flags != 0 {
                return Err(Error::NonFiniteLogits {
                    step: rng_step as usize,
                    what: format!("draft logits flagged {:#x}", st.flags),
                });
            }
            // Per-token stopping: keep this draft? draft the next? What was fed stays in the
            // draft's cache: before the first draft it is committed (the backlog and the pending
            // token), so the draft need not see it again; after a draft the cache is cut back to
            // the accepted tokens below, as for any step.
            let (keep, more) = match (token_verdict(policy, &st, greedy), auto.as_mut(), after) {
                (Some(v), ..) => v,
                (None, Some(a), Some(after)) => {
                    let d = rule.observe(&a.weights, &accum[0], &st, cfg.compression, after);
                    a.record(&d);
                    trace.stop_features.push(d.features);
                    (d.keep, d.more)
                }
                _ => (true, true),
            };
            if !keep {
                break;
            }
            let x = if greedy {
                st.argmax as u32
            } else {
                st.sampled as u32
            };
            xs.push(x);
            trace.entropy.push(st.entropy);
            trace.confidence.push(st.confidence);
            if let Some(q) = q {
                qrows.extend_from_slice(q);
            }
            feed.clear();
            feed.push(x);
            if !more {
                break; // x is verified but not fed: the draft sees it next step, as at γmax
            }
        }
        let g = xs.len();
        if !fed {
            backlog.extend_from_slice(&feed); // nothing fed: the draft has yet to see these
        }
        let draft_seconds = t_draft.elapsed().as_secs_f64();
        let draft_time = DraftTime {
            passes: forwards,
            seconds: draft_seconds,
            first_passes,
            first_seconds,
            first_tokens,
        };
        // Verify: target over [pending, x_0..x_{g-1}] → g + 1 rows.
        let t_verify = Instant::now();
        let before = tpass.len();
        tin.clear();
        tin.push(pending);
        tin.extend_from_slice(&xs);
        tokens.clear();
        tokens.extend(xs.iter().map(|&x| x as i32));
        let vs = VerifyStep {
            draft_tokens: &tokens,
            draft_rows: (!greedy).then_some(&qrows[..]),
            temperature: cfg.temperature,
            seed: cfg.seed,
            step: steps as u64,
        };
        // Verified where the target's logits are; only the verdict comes back.
        tpass.run_verify(&tin, &vs, &mut vout)?;
        let o = &vout;
        if o.flags[0] != 0 {
            return Err(Error::NonFiniteLogits {
                step: steps,
                what: format!(
                    "target or draft rows flagged by verification ({:#x})",
                    o.flags[0]
                ),
            });
        }
        let verify_seconds = t_verify.elapsed().as_secs_f64();
        let k = o.accepted[0] as usize;
        if let Some(a) = auto.as_mut() {
            a.end_step(&draft_time, g, verify_seconds, k);
        }
        trace.position = prompt.len() + out.len();
        trace.gamma = g as u32;
        trace.accepted = k as u32;
        trace.counterfactual.clear();
        trace
            .counterfactual
            .extend(o.counterfactual[..=g].iter().map(|&c| c as u32));
        trace.draft = draft_time;
        trace.draft_tokens = draft_tokens - draft_tokens_before;
        trace.verify_seconds = verify_seconds;
        trace.emitted.clear();
        trace.emitted.extend(o.tokens(0).iter().map(|&t| t as u32));
        on_step(&trace);
        steps += 1;
        drafted += g;
        accepted_total += k;
        hist[g] += 1;
        // Target cache: pending + the k accepted drafts.
        tpass.truncate(before + 1 + k);
        // Draft cache: after drafting g ≥ 1 tokens it holds C + g entries (…, pending, x_0..x_{g-2})
        // — C + g + 1 when a confidence stop fed x_{g-1} too — with C the committed tokens less
        // the `skipped` ones it never saw. Keep the committed ones; a fully accepted step whose
        // x_{g-1} was never fed leaves it in the backlog. (g = 0: the backlog already holds what
        // the draft has not seen.)
        if g > 0 {
            let (keep, unseen) = draft_keep(k, g, dpass.len() + skipped == before + 1 + g);
            dpass.truncate(before + 1 + keep - skipped);
            backlog.clear();
            if unseen {
                backlog.push(xs[g - 1]);
            }
        }
        let emitted = &trace.emitted;
        for (i, &t) in emitted.iter().enumerate() {
            if stop.contains(&t) {
                break 'outer;
            }
            out.push(t);
            if out.len() == cfg.max_tokens {
                break 'outer;
            }
            if i + 1 == emitted.len() {
                pending = t;
            }
        }
        heuristic_gamma = next_heuristic(heuristic_gamma, g, k, cfg.gamma_max);
        prev_accum = Some(accum[0]);
    }
    let s = start.elapsed().as_secs_f64();
    Ok(GenStats {
        steps,
        drafted,
        accepted: accepted_total,
        acceptance_rate: accepted_total as f64 / drafted.max(1) as f64,
        mean_gamma: drafted as f64 / steps.max(1) as f64,
        gamma_histogram: (0u32..).zip(hist).filter(|&(_, n)| n > 0).collect(),
        draft_tokens,
        seconds: s,
        prefill_seconds: prefill,
        tokens_per_second: out.len() as f64 / (s - prefill).max(1e-9),
        tokens: out,
    })
}

/// The most drafts of step `step` (0 the first): the policy's γ when it is chosen up front
/// (`speckv` on the previous step's draft features, lagged: causal; 4 before any), γmax for the
/// per-token rules.
pub(super) fn step_gamma(
    policy: &Policy,
    step: usize,
    prev_accum: Option<&FeatureAccum>,
    heuristic_gamma: u32,
    cfg: &GenConfig,
) -> u32 {
    match policy {
        Policy::Fixed(n) => (*n).min(cfg.gamma_max),
        Policy::Every { period, gamma } => {
            if step.is_multiple_of((*period).max(1) as usize) {
                (*gamma).min(cfg.gamma_max)
            } else {
                0
            }
        }
        Policy::SpecKv(c) => match prev_accum {
            Some(a) if a.count > 0 => {
                let n = a.count as f64;
                let base = [
                    a.entropy_sum as f64 / n,
                    a.confidence_sum as f64 / n,
                    a.entropy_max as f64,
                    a.confidence_min as f64,
                ];
                c.decide(base, cfg.compression).gamma.min(cfg.gamma_max)
            }
            _ => 4.min(cfg.gamma_max),
        },
        Policy::Confidence(_)
        | Policy::HfThreshold(_)
        | Policy::Auto(_)
        | Policy::AdaEdl { .. } => cfg.gamma_max,
        Policy::Heuristic => heuristic_gamma.min(cfg.gamma_max),
    }
}

/// A per-token rule's verdict on a draft, from its statistics: (keep it, draft the next); `None`
/// for the policies that decide otherwise (γ up front, or `auto`'s stopping rule).
pub(super) fn token_verdict(policy: &Policy, st: &RowStats, greedy: bool) -> Option<(bool, bool)> {
    match policy {
        Policy::Confidence(p) => Some((st.confidence >= *p, st.confidence >= *p)),
        Policy::HfThreshold(p) => {
            // HF judges the probability of the token it drew.
            let prob = if greedy {
                st.confidence
            } else {
                st.sampled_prob
            };
            Some((true, prob >= *p))
        }
        Policy::AdaEdl { lambda, kappa } => {
            let ok = 1.0 - (kappa * st.entropy.max(0.0)).sqrt() >= *lambda;
            Some((ok, ok))
        }
        _ => None,
    }
}

/// HF's schedule after a step of `g` drafts with `k` accepted: +2 after a fully accepted step,
/// −1 otherwise, within 1..=γmax.
pub(super) fn next_heuristic(h: u32, g: usize, k: usize, gamma_max: u32) -> u32 {
    if k == g && g > 0 {
        (h + 2).min(gamma_max)
    } else {
        h.saturating_sub(1).max(1)
    }
}

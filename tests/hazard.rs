//! Per-token stopping (`controller::hazard`): training examples from traces, the stopping rule
//! against its closed form, the online costs, and the policies' names.

mod common;

use speckv::controller::hazard::{self, AutoState, DraftTime, HazardModel, OnlineCost, StopRule};
use speckv::controller::hazard_training;
use speckv::controller::mlp::INPUTS;
use speckv::controller::records::{Compression, TraceRow};
use speckv::controller::CostModel;
use speckv::decode::profile::trace_rows;
use speckv::decode::Policy;
use speckv_kernels::params::{FeatureAccum, RowStats};

/// A model whose hazard is `h` whatever the features.
fn constant(h: f64) -> HazardModel {
    common::constant_hazard(h)
}

use common::trace_step as step;

#[test]
fn examples_are_the_drafts_reached_labelled_by_acceptance() {
    let steps = [
        step(&[0.5, 1.0, 2.0, 0.25], &[0.9, 0.6, 0.3, 0.8], 2),
        step(&[0.125, 3.0], &[0.95, 0.2], 0),
        step(&[0.75, 0.5], &[0.7, 0.9], 2),
    ];
    let rows = trace_rows(&steps, Compression::Nf4, "code", 4, 1).unwrap();
    let ex = hazard_training::examples(&rows).unwrap();
    // Step 0 reaches drafts 0, 1, 2 (accepted 2: labels 1, 1, 0); step 1 draft 0 (label 0); step 2
    // both drafts (labels 1, 1).
    let labels: Vec<f64> = ex.iter().map(|e| e.y).collect();
    assert_eq!(labels, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    assert!(ex.iter().all(|e| e.group == 4));
    // Draft 2 of step 0: its own values, the prefix mean entropy and min confidence, NF4, j = 2.
    let x = ex[2].x;
    assert_eq!(x[0], 2.0);
    assert_eq!(x[1], 0.3f32 as f64);
    // The prefix mean as the rule computes it: the f32 accumulator's sum over the count.
    assert_eq!(x[2], ((0.5f32 + 1.0 + 2.0) / 3.0) as f64);
    assert_eq!(x[3], 0.3f32 as f64);
    assert_eq!(x[4], Compression::Nf4.code());
    assert_eq!(x[5], 2.0);
    // Traces written before the per-draft columns give the same features from the prefix means.
    let old: Vec<_> = rows
        .iter()
        .cloned()
        .map(|mut r| {
            r.draft_entropy = None;
            r.draft_confidence = None;
            r
        })
        .collect();
    for (a, b) in hazard_training::examples(&old).unwrap().iter().zip(&ex) {
        for (u, v) in a.x.iter().zip(&b.x) {
            assert!((u - v).abs() < 1e-6, "{:?} vs {:?}", a.x, b.x);
        }
        assert_eq!(a.y, b.y);
    }
    // Rows out of order are an error, not a silent mislabelling.
    let mut shuffled = rows.clone();
    shuffled.swap(0, 1);
    assert!(hazard_training::examples(&shuffled).is_err());
    assert!(hazard_training::examples(&[]).is_err());
}

/// Expected tokens of a step verifying `g` drafts under constant hazard `h`.
fn tokens(h: f64, g: usize) -> f64 {
    1.0 + (1..=g).map(|i| h.powi(i as i32)).sum::<f64>()
}

/// The γ a constant hazard `h` should end with, worked out in f64 from the rule's accounting: at
/// draft j (j + 1 passes spent) discard it (γ = j), keep it and stop (γ = j + 1), or draft on to
/// some γ ≥ j + 2 (γ passes).
fn expected_gamma(h: f64, gmax: usize, draft: f64, verify: &dyn Fn(usize) -> f64) -> usize {
    for j in 0..gmax {
        let spent = (j + 1) as f64 * draft;
        let discard = tokens(h, j) / (spent + verify(j));
        let stop = tokens(h, j + 1) / (spent + verify(j + 1));
        let on = (j + 2..=gmax)
            .map(|g| tokens(h, g) / (g as f64 * draft + verify(g)))
            .fold(f64::NEG_INFINITY, f64::max);
        if on <= discard.max(stop) {
            return if stop > discard { j + 1 } else { j };
        }
    }
    gmax
}

#[test]
fn the_rule_stops_where_the_rate_stops_growing() {
    let gmax = 8;
    let mut seen = std::collections::BTreeSet::new();
    for &(h, draft, slope) in &[
        (0.9, 0.05, 0.02),
        (0.6, 0.3, 0.1),
        (0.3, 0.3, 0.4),
        (0.95, 0.01, 0.0),
        (0.05, 0.5, 0.5),
        (0.5, 0.2, 0.05),
        (0.7, 0.1, 0.3),
    ] {
        let prior = CostModel {
            draft_ms_per_token: draft,
            verify_ms: (0..=gmax).map(|g| 1.0 + slope * g as f64).collect(),
            draft_feed_ms: Vec::new(),
            source: "test".into(),
        };
        let verify = |g: usize| 1.0 + slope * g as f64;
        let costs = OnlineCost::new(prior, 0.2).step_costs(gmax);
        let weights = constant(h).weights();
        let mut rule = StopRule::new();
        let mut accum = FeatureAccum::EMPTY;
        let mut kept = 0;
        loop {
            accum.push(1.0, 0.5, 0);
            let row = RowStats {
                entropy: 1.0,
                confidence: 0.5,
                ..Default::default()
            };
            let d = rule.decide(&weights, &accum, &row, Compression::Fp16, &costs, gmax);
            assert_eq!(d.hazard, h as f32 as f64, "the rule computes in f32");
            assert_eq!(d.features[5], kept as f64);
            assert!(d.keep || !d.more, "drafting on keeps the draft");
            kept += d.keep as usize;
            if !d.more {
                break;
            }
        }
        assert_eq!(rule.state.kept as usize, kept);
        assert_eq!(rule.state.stopped, 1);
        // With a constant hazard the lookahead is exact.
        assert_eq!(kept, expected_gamma(h, gmax, draft, &verify), "h {h}");
        seen.insert(kept);
        if h >= 0.9 {
            assert_eq!(kept, gmax, "h {h}: cheap drafts, likely accepted");
        }
        if h <= 0.05 {
            assert_eq!(kept, 0, "h {h}: drafts that fail");
        }
    }
    assert!(seen.len() >= 3, "the cases end at different γ: {seen:?}");
}

#[test]
fn online_costs_follow_measurements_and_keep_the_prior_shape() {
    let prior = CostModel {
        draft_ms_per_token: 0.5,
        verify_ms: vec![1.0, 1.5, 2.0, 2.5],
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let mut c = OnlineCost::new(prior.clone(), 0.5);
    assert_eq!((c.draft(), c.verify(2)), (0.5, 2.0));
    c.observe(3, 0.3, 2, 4.0);
    assert!((c.draft() - 0.1).abs() < 1e-12);
    assert_eq!(c.verify(2), 4.0);
    // γ = 1 not seen: the prior's shape scaled to the nearest γ measured (2): 4 · 1.5 / 2.
    assert_eq!(c.verify(1), 3.0);
    c.observe(1, 0.3, 2, 6.0);
    assert!((c.draft() - 0.2).abs() < 1e-12, "EMA with α = ½");
    assert_eq!(c.verify(2), 5.0);
    // Non-finite or zero times are not measurements.
    c.observe(1, f64::NAN, 2, 0.0);
    assert!((c.draft() - 0.2).abs() < 1e-12);
    assert_eq!(c.verify(2), 5.0);
    // The rule's costs: a draft pass and the verification at γ ≤ γmax.
    let t = c.step_costs(2);
    assert_eq!(t.draft, c.draft() as f32);
    assert_eq!(t.verify[..3], [0, 1, 2].map(|g| c.verify(g) as f32));
    assert!(t.verify[3..].iter().all(|x| x.is_infinite()), "{t:?}");

    // Plain steps first (a verification of γ = 0, no draft pass): the draft's prior time is
    // scaled as the prior's one-pass verification compares with the measured one, so the two
    // stay in the same units (1 ms in the prior, 0.04 s measured: the 0.5 ms draft is 0.02 s).
    let mut c = OnlineCost::new(prior, 0.5);
    c.observe(0, 0.0, 0, 0.04);
    assert!((c.draft() - 0.02).abs() < 1e-12, "{}", c.draft());
    assert!((c.verify(2) - 0.08).abs() < 1e-12, "{}", c.verify(2));
    // Once a draft pass is measured, it is what counts.
    c.observe(2, 0.01, 1, 0.05);
    assert!((c.draft() - 0.005).abs() < 1e-12, "{}", c.draft());
}

/// A first feed that catches the draft up on tokens of plain steps is the price of returning from
/// them, not a draft pass: the draft's cost learns from the step's other passes only, so a probe
/// after plain steps does not make every later draft look dearer. A steady first feed (the
/// pending token, a draft left unseen) and a phase not timed apart count whole.
#[test]
fn the_drafts_cost_leaves_out_a_catch_up_feed() {
    let time = |passes, seconds, first_seconds, first_tokens| DraftTime {
        passes,
        seconds,
        first_passes: 1,
        first_seconds,
        first_tokens,
    };
    let steady = time(3, 0.3, 0.1, 1);
    assert_eq!(steady.measured(), (3, 0.3));
    // After a fully accepted step the first pass feeds 2 tokens: dearer, and recurring, so in.
    assert_eq!(hazard::STEADY_FEED, 2);
    assert_eq!(time(3, 0.37, 0.17, 2).measured(), (3, 0.37));
    // After plain steps: the first pass fed 9 tokens in 0.5 s, then two drafts at 0.1 s each.
    let probe = time(3, 0.7, 0.5, 9);
    let (n, s) = probe.measured();
    assert!(n == 2 && (s - 0.2).abs() < 1e-12, "{n} {s}");
    // Only the catch-up pass ran (its draft kept, or discarded): nothing to learn from.
    let only = time(1, 0.5, 0.5, 9);
    assert_eq!(only.measured(), (0, 0.0));
    let phase = DraftTime {
        first_passes: 0,
        ..probe
    };
    assert_eq!(phase.measured(), (3, 0.7));
    assert_eq!(DraftTime::steady(4, 0.4).measured(), (4, 0.4));
    // `auto`'s costs: the draft stays at 0.1 s a pass through both probes.
    let mut a = AutoState::new(&constant(0.8), CostModel::assumed());
    a.end_step(&steady, 3, 1.0, 2);
    for d in [&only, &probe] {
        a.end_step(d, 2, 1.0, 1);
        assert!((a.cost.draft() - 0.1).abs() < 1e-12, "{}", a.cost.draft());
    }
    // Counted whole, the catch-up pass would have raised it.
    a.end_step(&phase, 2, 1.0, 1);
    assert!(a.cost.draft() > 0.11, "{}", a.cost.draft());
}

/// Under the assumed prior, once its first hazards are known, `auto` takes one plain step to
/// measure what a plain step costs, and gates on that. The assumed shape (verification 2 % dearer
/// a position, a GPU's) scales a CPU-like verification of one draft to a plain step a third
/// dearer than it is, and drafts that lose to plain steps look like a win. A measured prior's
/// shape is trusted: no such step.
#[test]
fn auto_measures_a_plain_step_under_the_assumed_prior() {
    let first_step = |prior: CostModel| {
        let mut a = AutoState::new(&constant(0.7), prior);
        let (_, g, _) = a.begin_step(3);
        assert_eq!(g, 3, "nothing known: it speculates");
        a.gate.observe_first(0.7);
        a.end_step(&DraftTime::steady(1, 0.05), 1, 0.13, 1);
        a
    };
    let mut a = first_step(CostModel::assumed());
    // The prior's guess: a plain step 0.13 / 1.02 = 0.127 s, so drafting looks better.
    assert!(hazard::speculate_batch(&[0.7], &a.cost.step_costs(3), 3));
    let (_, g, _) = a.begin_step(3);
    assert_eq!(g, 0, "a plain step to measure it");
    a.end_step(&DraftTime::default(), 0, 0.095, 0);
    // Measured: 10.5 plain tokens/s against 1.7 tokens in 0.18 s at γ = 1 (and less above).
    assert!(!hazard::speculate_batch(&[0.7], &a.cost.step_costs(3), 3));
    let gates: Vec<usize> = (0..6).map(|_| a.begin_step(3).1).collect();
    assert_eq!(
        gates,
        [0, 0, 0, 3, 0, 0],
        "plain steps, then the probe schedule"
    );
    // A measured prior whose plain step is dear: speculating wins, and no plain step is taken.
    let measured = CostModel {
        draft_ms_per_token: 50.0,
        verify_ms: vec![300.0, 130.0, 135.0, 140.0],
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let mut a = first_step(measured);
    assert_eq!(a.begin_step(3).1, 3);
}

#[test]
fn the_shipped_model_loads_and_predicts_probabilities() {
    let m = HazardModel::default_model().unwrap();
    assert!(m.source.contains("train --hazard"), "{}", m.source);
    for x in [
        [0.1, 0.95, 0.1, 0.95, 0.0, 0.0],
        [3.0, 0.2, 2.0, 0.2, 2.0, 5.0],
    ] {
        let h = m.hazard(&x);
        assert!((0.001..=0.999).contains(&h), "{h}");
    }
    // Confident drafts are likelier to be accepted than uncertain ones.
    assert!(
        m.hazard(&[0.05, 0.98, 0.05, 0.98, 1.0, 1.0]) > m.hazard(&[3.0, 0.15, 3.0, 0.15, 1.0, 1.0])
    );
    assert_eq!(
        m.hazard(&[f64::NAN; INPUTS]),
        0.001f32 as f64,
        "NaN features fail closed"
    );
}

#[test]
fn policy_names_parse_and_bad_ones_are_errors() {
    assert!(matches!(Policy::parse("auto", None), Ok(Policy::Auto(_))));
    assert!(matches!(
        Policy::parse("hf-dynamic", None),
        Ok(Policy::HfThreshold(p)) if p == 0.4
    ));
    match Policy::parse("adaedl:0.3:2", None) {
        Ok(Policy::AdaEdl { lambda, kappa }) => assert_eq!((lambda, kappa), (0.3, 2.0)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Policy::parse("adaedl", None),
        Ok(Policy::AdaEdl { .. })
    ));
    assert!(matches!(
        Policy::parse("every:4:3", None),
        Ok(Policy::Every {
            period: 4,
            gamma: 3
        })
    ));
    for bad in [
        "every:0:3",
        "every:4",
        "every:4:x",
        "every:-1:3",
        "adaedl:2",
        "adaedl:x",
        "adaedl:0.5:-1",
        "adaedl:0.1:0.2:0.3",
        "auto:1",
        "hf",
    ] {
        let e = Policy::parse(bad, None).unwrap_err().to_string();
        assert!(e.contains("expected"), "{bad}: {e}");
    }
}

#[test]
fn calibration_pulls_the_hazard_to_the_acceptance_seen() {
    use speckv::controller::hazard::{Calibration, MAX_LOG_ODDS_SCALE};
    // The model says 0.9; drafts are accepted half the time (a fixed pseudo-random sequence).
    let model = 0.9f64;
    let calibrated = |k: f64| k * model / (1.0 - model + k * model);
    let mut c = Calibration::new(0.1);
    let mut state = 12345u64;
    for _ in 0..400 {
        let k = c.odds_scale() as f64;
        let h = [calibrated(k); 3];
        let mut accepted = 0;
        while accepted < 3 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (state >> 33) & 1 == 0 {
                break;
            }
            accepted += 1;
        }
        c.observe(&h, accepted);
    }
    let h = calibrated(c.odds_scale() as f64);
    assert!((h - 0.5).abs() < 0.1, "calibrated hazard {h}");
    // Every draft accepted: the scale grows, up to its bound.
    let mut c = Calibration::new(0.5);
    for _ in 0..100 {
        c.observe(&[0.5, 0.5], 2);
    }
    assert_eq!(c.odds_scale(), (MAX_LOG_ODDS_SCALE.exp()) as f32);
    // Only drafts reached are outcomes: after a rejection at 0, draft 1 teaches nothing.
    let mut a = Calibration::new(0.1);
    let mut b = Calibration::new(0.1);
    a.observe(&[0.5, 0.9], 0);
    b.observe(&[0.5], 0);
    assert_eq!(a.odds_scale(), b.odds_scale());
    assert!(a.odds_scale() < 1.0);
}

#[test]
fn the_gate_takes_plain_steps_when_speculation_cannot_pay_and_probes() {
    use speckv::controller::hazard::{PlainGate, MAX_PROBE_EVERY, PROBE_EVERY};
    let gmax = 6;
    let prior = CostModel {
        draft_ms_per_token: 0.4,
        verify_ms: (0..=gmax).map(|g| 1.0 + 0.3 * g as f64).collect(),
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let cost = OnlineCost::new(prior, 0.2);
    let costs = cost.step_costs(gmax);
    let mut gate = PlainGate::default();
    assert!(gate.speculate(&costs, gmax), "nothing seen yet");
    // First drafts rarely accepted: expensive drafts cannot pay. A probe after PROBE_EVERY plain
    // steps, and each probe the comparison still rejects doubles the wait, up to MAX_PROBE_EVERY.
    gate.observe_first(0.1);
    let waits = [4, 8, 16, 32, 64, 64];
    assert_eq!(PROBE_EVERY, waits[0]);
    assert_eq!(MAX_PROBE_EVERY, waits[4]);
    let pattern: Vec<bool> = (0..waits.iter().map(|w| w + 1).sum())
        .map(|_| gate.speculate(&costs, gmax))
        .collect();
    let want: Vec<bool> = waits
        .iter()
        .flat_map(|&w| (0..=w).map(move |i| i == w))
        .collect();
    assert_eq!(pattern, want);
    // A step the comparison accepts resets the wait (the hazards are moving averages).
    (0..20).for_each(|_| gate.observe_first(0.95));
    assert!(gate.speculate(&costs, gmax));
    (0..20).for_each(|_| gate.observe_first(0.1));
    let again: Vec<bool> = (0..2 * (PROBE_EVERY + 1))
        .map(|_| gate.speculate(&costs, gmax))
        .collect();
    let want: Vec<bool> = [4, 8]
        .iter()
        .flat_map(|&w| (0..=w).map(move |i| i == w))
        .take(2 * (PROBE_EVERY + 1))
        .collect();
    assert_eq!(again, want);
    // Likely accepted: 1 + 0.95 + … tokens for 1 + 0.7 per draft beats 1 token per 1.0.
    let mut gate = PlainGate::default();
    gate.observe_first(0.95);
    assert!((0..10).all(|_| gate.speculate(&costs, gmax)));
    // γmax 0: never.
    assert!(!gate.speculate(&cost.step_costs(0), 0));
    // Drafts that cost as much as a target pass, and a verification that grows as fast: even
    // drafts all accepted (2 tokens for 1 + 2 at γ = 1) lose to plain steps, so the gate never
    // probes, whatever hazard it last saw.
    let dear = OnlineCost::new(
        CostModel {
            draft_ms_per_token: 1.0,
            verify_ms: (0..=gmax).map(|g| 1.0 + g as f64).collect(),
            draft_feed_ms: Vec::new(),
            source: "test".into(),
        },
        0.2,
    )
    .step_costs(gmax);
    assert!(!speckv::controller::hazard::speculation_could_pay(
        1, &dear, gmax
    ));
    assert!(speckv::controller::hazard::speculation_could_pay(
        1, &costs, gmax
    ));
    for h in [0.1, 0.95] {
        let mut gate = PlainGate::default();
        gate.observe_first(h);
        assert!(
            (0..4 * PROBE_EVERY).all(|_| !gate.speculate(&dear, gmax)),
            "h {h}"
        );
        // Once the costs say drafts could pay, the gate speculates at once: for h = 0.1 that is
        // the overdue probe.
        assert!(gate.speculate(&costs, gmax), "h {h}");
    }
}

#[test]
fn speckv_policies_use_the_shipped_predictor_without_a_controller() {
    use speckv::decode::policy_from_name;
    for name in ["speckv", "speckv-cost"] {
        match policy_from_name(name, &Default::default()) {
            Ok(Some(Policy::SpecKv(c))) => {
                assert_eq!(c.mlp, speckv::controller::mlp::Mlp::shipped().unwrap());
                assert_eq!(c.cost_table().is_some(), name == "speckv-cost");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // The shipped predictor's compression input matters: same features, other regime.
    let m = speckv::controller::mlp::Mlp::shipped().unwrap();
    let x = |code: f64| [1.0, 0.6, 2.5, 0.3, code, 4.0];
    assert_ne!(m.predict(&x(0.0)), m.predict(&x(2.0)));
}

#[test]
fn auto_replayed_on_traces_counts_its_drafts_and_plain_steps() {
    use speckv::controller::replay::{auto_on_traces, auto_without_gate_on_traces};
    let gmax = 4usize;
    let cost = CostModel {
        draft_ms_per_token: 10.0,
        verify_ms: (0..=gmax).map(|g| 50.0 + 5.0 * g as f64).collect(),
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let full = |accepted: u32| step(&[0.5; 4], &[0.8; 4], accepted);
    // Every draft accepted and a confident model: γmax every step, at the closed-form rate.
    let steps: Vec<_> = (0..6).map(|_| full(4)).collect();
    let rows = trace_rows(&steps, Compression::Int8, "code", 0, 3).unwrap();
    let r = auto_on_traces(&rows, &constant(0.99), &cost).unwrap();
    assert_eq!((r.steps, r.plain_steps, r.mean_gamma), (6, 0, 4.0));
    let want = 5.0 / (4.0 * 10.0 + 70.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // A hopeless model: the first step pays one draft and discards it, then the gate makes plain
    // steps, probing once after PROBE_EVERY of them.
    let steps: Vec<_> = (0..7).map(|_| full(0)).collect();
    let rows = trace_rows(&steps, Compression::Int8, "code", 0, 3).unwrap();
    let r = auto_on_traces(&rows, &constant(0.01), &cost).unwrap();
    assert_eq!((r.steps, r.plain_steps, r.mean_gamma), (7, 5, 0.0), "{r:?}");
    // 7 tokens; 2 drafts paid (first step and the probe), 7 verifications of γ = 0.
    let want = 7.0 / (2.0 * 10.0 + 7.0 * 50.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // The gate off: every step drafts its first token and the rule discards it — 7 drafts paid,
    // no plain step. With the confident model it changes nothing (the gate never closed).
    let r = auto_without_gate_on_traces(&rows, &constant(0.01), &cost).unwrap();
    assert_eq!((r.steps, r.plain_steps, r.mean_gamma), (7, 0, 0.0), "{r:?}");
    let want = 7.0 / (7.0 * 10.0 + 7.0 * 50.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    let confident = trace_rows(
        &(0..6).map(|_| full(4)).collect::<Vec<_>>(),
        Compression::Int8,
        "code",
        0,
        3,
    )
    .unwrap();
    assert_eq!(
        auto_without_gate_on_traces(&confident, &constant(0.99), &cost).unwrap(),
        auto_on_traces(&confident, &constant(0.99), &cost).unwrap()
    );
    // With the draft's feeds measured (2 tokens 25 ms, so 5 tokens 70 ms on their line), each
    // first pass is charged what the draft had yet to see: the probe catches up on the 4 plain
    // steps and the pending token.
    let fed = CostModel {
        draft_feed_ms: vec![10.0, 25.0],
        ..cost.clone()
    };
    let r = auto_on_traces(&rows, &constant(0.01), &fed).unwrap();
    assert_eq!((r.steps, r.plain_steps), (7, 5), "{r:?}");
    let want = 7.0 / (10.0 + 70.0 + 7.0 * 50.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // All accepted: every step after the first feeds the draft its predecessor's last draft too.
    let steps: Vec<_> = (0..6).map(|_| full(4)).collect();
    let all = trace_rows(&steps, Compression::Int8, "code", 0, 3).unwrap();
    let r = auto_on_traces(&all, &constant(0.99), &fed).unwrap();
    assert_eq!((r.steps, r.plain_steps, r.mean_gamma), (6, 0, 4.0));
    let want = 30.0 / (6.0 * 110.0 + 5.0 * 15.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // Only full-information traces can be replayed.
    let partial = rows[..3].to_vec();
    let e = auto_on_traces(&partial, &constant(0.5), &cost).unwrap_err();
    assert!(e.to_string().contains("full-information"), "{e}");
    assert!(auto_on_traces(&[], &constant(0.5), &cost).is_err());
}

/// The confidence rules' case: draft 10 ms a pass, verification 50 + 5γ ms, and three traced
/// steps of γmax 4 — the third draft below 0.4 (2 accepted), none below (all 4 accepted), the
/// first below (none accepted).
fn confidence_case() -> (CostModel, Vec<TraceRow>) {
    let cost = CostModel {
        draft_ms_per_token: 10.0,
        verify_ms: (0..=4).map(|g| 50.0 + 5.0 * g as f64).collect(),
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let steps = [
        step(&[0.5; 4], &[0.9, 0.6, 0.3, 0.8], 2),
        step(&[0.5; 4], &[0.9, 0.9, 0.9, 0.9], 4),
        step(&[0.5; 4], &[0.2, 0.9, 0.9, 0.9], 0),
    ];
    (
        cost,
        trace_rows(&steps, Compression::Fp16, "code", 0, 3).unwrap(),
    )
}

#[test]
fn hf_default_schedule_replayed_keeps_the_draft_below_the_threshold() {
    use speckv::controller::replay::threshold_on_traces;
    // Step 1: the third draft falls below 0.4, so γ = 3 (HF stops after the token it judged);
    // 2 accepted → 3 tokens. Step 2: never below → γmax = 4; 4 accepted → 5 tokens. Step 3: the
    // first draft is below → γ = 1; 0 accepted → 1 token.
    let (cost, rows) = confidence_case();
    let r = threshold_on_traces(&rows, &cost, 0.4).unwrap();
    assert_eq!((r.steps, r.plain_steps), (3, 0));
    assert!((r.mean_gamma - 8.0 / 3.0).abs() < 1e-12, "{r:?}");
    let ms = (3.0 * 10.0 + 65.0) + (4.0 * 10.0 + 70.0) + (10.0 + 55.0);
    let want = (3.0 + 5.0 + 1.0) / ms * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // A 2-token feed 15 ms dearer than one: paid by step 3 alone, after step 2's 4 of 4.
    let fed = CostModel {
        draft_feed_ms: vec![10.0, 25.0],
        ..cost.clone()
    };
    let r = threshold_on_traces(&rows, &fed, 0.4).unwrap();
    let want = (3.0 + 5.0 + 1.0) / (ms + 15.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // A threshold of 0 never stops early: fixed γmax.
    let r = threshold_on_traces(&rows, &cost, 0.0).unwrap();
    assert_eq!(r.mean_gamma, 4.0);
    assert!(threshold_on_traces(&[], &cost, 0.4).is_err());
}

#[test]
fn llama_cpp_p_min_replayed_discards_the_draft_below_it() {
    use speckv::controller::replay::{p_min_on_traces, threshold_on_traces};
    // Step 1: the third draft is below 0.4 and discarded, its pass spent: 3 passes, γ = 2, 2
    // accepted → 3 tokens (the pass fed the second draft: no backlog). Step 2: never below: 4
    // passes, γ = 4, all accepted → 5 tokens, the fourth left unseen. Step 3: the first draft is
    // below: 1 pass feeding 2 tokens, γ = 0 → 1 token.
    let (cost, rows) = confidence_case();
    let r = p_min_on_traces(&rows, &cost, 0.4).unwrap();
    assert_eq!((r.steps, r.plain_steps), (3, 0));
    assert!((r.mean_gamma - 2.0).abs() < 1e-12, "{r:?}");
    let ms = (3.0 * 10.0 + 60.0) + (4.0 * 10.0 + 70.0) + (10.0 + 50.0);
    let want = (3.0 + 5.0 + 1.0) / ms * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // Step 3's pass feeds step 2's unseen draft too: a 2-token feed 15 ms dearer.
    let fed = CostModel {
        draft_feed_ms: vec![10.0, 25.0],
        ..cost.clone()
    };
    let r = p_min_on_traces(&rows, &fed, 0.4).unwrap();
    let want = (3.0 + 5.0 + 1.0) / (ms + 15.0) * 1e3;
    assert!((r.tokens_per_second - want).abs() < 1e-9, "{r:?}");
    // P = 0 never stops early (HF's rule at 0 alike); above every probability each step spends
    // one pass and verifies nothing.
    let never = p_min_on_traces(&rows, &cost, 0.0).unwrap();
    assert_eq!(never, threshold_on_traces(&rows, &cost, 0.0).unwrap());
    let always = p_min_on_traces(&rows, &cost, 1.01).unwrap();
    assert_eq!(always.mean_gamma, 0.0);
    assert!((always.tokens_per_second - 3.0 / (3.0 * 60.0) * 1e3).abs() < 1e-9);
    assert!(p_min_on_traces(&[], &cost, 0.4).is_err());
}

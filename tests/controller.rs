//! The γ controller: predictor training and loading, the seed's simulation, each policy's rule and
//! the honest evaluator's counterfactual arithmetic on hand-made records, and the `gamma_mlp` kernel
//! on the emulator against the CPU MLP.

mod common;

use std::io::Write;

use rand::{Rng, SeedableRng};
use speckv::controller::evaluate::{self, EvalConfig};
use speckv::controller::mlp::{self, Mlp, TrainConfig};
use speckv::controller::records::{self, Compression, StepRecord};
use speckv::controller::simulate;
use speckv::controller::{Controller, CostModel, PAPER_CANDIDATES};
use speckv::FeatureAccum;

fn rec(
    run: u32,
    comp: Compression,
    gamma: u32,
    step: u32,
    accepted: u32,
    min_conf: f64,
    max_ent: f64,
) -> StepRecord {
    StepRecord {
        run,
        compression: comp,
        gamma,
        task: "code".to_string(),
        step,
        accepted,
        acceptance_rate: accepted as f64 / gamma as f64,
        tokens_produced: accepted + 1,
        mean_draft_entropy: max_ent * 0.6,
        mean_draft_confidence: (min_conf + 1.0) / 2.0,
        max_draft_entropy: max_ent,
        min_draft_confidence: min_conf,
        trace_gamma_max: None,
    }
}

/// Seeded synthetic records where acceptance rises with confidence, across 4 runs.
fn synthetic(n_per_run: usize, seed: u64) -> Vec<StepRecord> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::new();
    for run in 0..4 {
        for step in 0..n_per_run {
            let comp = Compression::ALL[step % 3];
            let gamma = [2, 4, 6, 8][step % 4];
            let conf: f64 = rng.gen_range(0.2..1.0);
            let p_acc = (conf * conf).min(0.99);
            let mut k = 0;
            while k < gamma && rng.gen_bool(p_acc) {
                k += 1;
            }
            v.push(rec(
                run,
                comp,
                gamma,
                step as u32,
                k,
                conf * rng.gen_range(0.7..1.0),
                (1.0 - conf) * 4.0,
            ));
        }
    }
    v
}

fn honest<'a>(r: &'a evaluate::EvalReport, name: &str) -> &'a evaluate::HonestPolicy {
    r.honest.get(name).unwrap_or_else(|| {
        panic!(
            "no honest policy {name}: {:?}",
            r.honest.keys().collect::<Vec<_>>()
        )
    })
}

fn quick_cfg() -> EvalConfig {
    EvalConfig {
        resamples: 200,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// predictor

#[test]
fn training_is_deterministic_for_a_seed() {
    let data = synthetic(120, 1);
    let (tr, va, te) = mlp::split_by_run(&data).unwrap();
    assert_eq!(
        (tr.clone(), va.clone(), te.clone()),
        (vec![0, 1], vec![2], vec![3])
    );
    let cfg = TrainConfig {
        seed: 7,
        ..Default::default()
    };
    let (a, ra) = mlp::train(&data, &tr, &va, &te, cfg).unwrap();
    let (b, _) = mlp::train(&data, &tr, &va, &te, cfg).unwrap();
    assert_eq!(a, b, "same seed, same weights");
    let (c, _) = mlp::train(&data, &tr, &va, &te, TrainConfig { seed: 8, ..cfg }).unwrap();
    assert_ne!(a, c, "another seed, other weights");
    // It learned something: acceptance rises with confidence in this data.
    let t = ra.test.unwrap();
    assert!(t.corr > 0.3, "test correlation {}", t.corr);
    assert!(ra.best_epoch >= 1 && ra.best_epoch <= ra.epochs_run);
}

#[test]
fn one_run_is_not_enough_to_train() {
    let data: Vec<StepRecord> = synthetic(50, 2)
        .into_iter()
        .filter(|r| r.run == 0)
        .collect();
    assert!(mlp::split_by_run(&data)
        .unwrap_err()
        .to_string()
        .contains("two prompt runs"));
}

/// A hand-checkable model: ReLU(x0 − 1) from unit 0 into the output with weight 0.5, bias 0.1.
fn tiny_model() -> Mlp {
    let mut m = Mlp {
        w1: [[0.0; 16]; 6],
        b1: [0.0; 16],
        w2: [[0.0; 1]; 16],
        b2: [0.1],
        feature_mean: [0.0; 6],
        feature_std: [1.0; 6],
    };
    m.w1[0][0] = 1.0;
    m.b1[0] = -1.0;
    m.w2[0][0] = 0.5;
    m.w1[5][3] = 0.25; // γ into unit 3
    m.w2[3][0] = -0.1;
    m
}

#[test]
fn weights_load_from_the_papers_layout_as_json_and_npz() {
    let dir = std::env::temp_dir().join(format!("speckv-mlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = tiny_model();
    // JSON in the paper's layout, without standardisation: W1 6×16, b1 16, W2 16×1, b2 1.
    let json = serde_json::json!({"W1": m.w1, "b1": m.b1, "W2": m.w2, "b2": m.b2});
    let jp = dir.join("paper.json");
    std::fs::write(&jp, json.to_string()).unwrap();
    let a = Mlp::load(&jp).unwrap();
    assert_eq!(a, m);
    // x0 = 3, γ = 4: unit 0 = 2 → 1.0; unit 3 = 1 → −0.1; plus 0.1 → 1.0.
    assert!((a.predict(&[3.0, 0.0, 0.0, 0.0, 0.0, 4.0]) - 1.0).abs() < 1e-12);
    // .npz with f32 arrays, W2 as 16 × 1 and b2 as a 1-vector.
    let np = dir.join("paper.npz");
    {
        use npyz::WriterBuilder;
        let mut npz = npyz::npz::NpzWriter::create(&np).unwrap();
        let mut put = |name: &str, shape: &[u64], data: Vec<f32>| {
            let mut w = npz
                .array(name, Default::default())
                .unwrap()
                .default_dtype()
                .shape(shape)
                .begin_nd()
                .unwrap();
            w.extend(data).unwrap();
            w.finish().unwrap();
        };
        put(
            "W1",
            &[6, 16],
            m.w1.iter().flatten().map(|&v| v as f32).collect(),
        );
        put("b1", &[16], m.b1.iter().map(|&v| v as f32).collect());
        put(
            "W2",
            &[16, 1],
            m.w2.iter().flatten().map(|&v| v as f32).collect(),
        );
        put("b2", &[1], vec![m.b2[0] as f32]);
    }
    let b = Mlp::load(&np).unwrap();
    for (x, y) in [
        [3.0, 0.0, 0.0, 0.0, 0.0, 4.0],
        [0.5, 1.0, 2.0, 0.1, 2.0, 8.0],
    ]
    .iter()
    .map(|x| (a.predict(x), b.predict(x)))
    {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    // Malformed input: a clear error.
    std::fs::write(&jp, r#"{"W1": [[1.0]], "b1": [], "W2": [], "b2": [0]}"#).unwrap();
    assert!(Mlp::load(&jp)
        .unwrap_err()
        .to_string()
        .contains("paper's layout"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn saved_models_round_trip() {
    let data = synthetic(60, 3);
    let (tr, va, te) = mlp::split_by_run(&data).unwrap();
    let (m, _) = mlp::train(&data, &tr, &va, &te, TrainConfig::default()).unwrap();
    let p = std::env::temp_dir().join(format!("speckv-model-{}.json", std::process::id()));
    m.save(&p).unwrap();
    assert_eq!(Mlp::load(&p).unwrap(), m);
    let _ = std::fs::remove_file(&p);
}

// ---------------------------------------------------------------------------------------------
// the seed's simulation

#[test]
fn simulate_pins_what_the_formula_gives_for_the_seed_table() {
    let rows = simulate::table(&simulate::seed_alpha(), true);
    let row = |c: &str| rows.iter().find(|r| r.compression == c).unwrap();
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    assert_eq!(r2(row("FP16").expected[&4]), 2.99);
    assert_eq!(r2(row("FP16").expected[&8]), 2.80);
    assert_eq!(r2(row("FP16").expected[&1]), 1.82);
    assert_eq!(r2(row("INT8").expected[&4]), 2.57);
    assert_eq!(r2(row("NF4").expected[&2]), 2.12);
    assert_eq!(
        (
            row("FP16").best_gamma,
            row("INT8").best_gamma,
            row("NF4").best_gamma
        ),
        (4, 4, 2)
    );
    // The note printed 3.13 / 3.47 and best γ = 8: the differences are reported.
    assert!(row("FP16")
        .differs_from_note
        .iter()
        .any(|d| d.contains("3.13") && d.contains("2.99")));
    assert!(row("NF4")
        .differs_from_note
        .iter()
        .any(|d| d.contains("best γ")));
    assert_eq!(simulate::expected_tokens(1.0, 4), 5.0);
}

// ---------------------------------------------------------------------------------------------
// policies and the honest evaluator on hand-made records

#[test]
fn honest_counterfactual_arithmetic() {
    let train = synthetic(40, 4);
    // r1: measured at γ=4, rejected after 1 → any γ' is known: min(1, γ') + 1.
    // r2: measured at γ=4, all 4 accepted → γ' ≤ 4 known, γ' > 4 unknown (between 5 and γ'+1).
    let test = vec![
        rec(3, Compression::Fp16, 4, 0, 1, 0.9, 0.5),
        rec(3, Compression::Fp16, 4, 1, 4, 0.9, 0.5),
    ];
    let r = evaluate::evaluate(
        &train,
        &test,
        Some((tiny_model(), "tiny".into())),
        &quick_cfg(),
    )
    .unwrap();
    let f2 = honest(&r, "fixed2");
    assert_eq!(
        (f2.tokens_per_step, f2.coverage),
        (Some((2.0 + 3.0) / 2.0), 1.0)
    );
    let f4 = honest(&r, "fixed4");
    assert_eq!(
        (f4.tokens_per_step, f4.coverage),
        (Some((2.0 + 5.0) / 2.0), 1.0)
    );
    let f6 = honest(&r, "fixed6");
    assert_eq!((f6.tokens_per_step, f6.coverage), (Some(2.0), 0.5));
    assert_eq!((f6.lower, f6.upper), ((2.0 + 5.0) / 2.0, (2.0 + 7.0) / 2.0));
    let f8 = honest(&r, "fixed8");
    assert_eq!((f8.lower, f8.upper), ((2.0 + 5.0) / 2.0, (2.0 + 9.0) / 2.0));
    // Oracle drafts exactly to the first rejection: γ = k, always known.
    let o = honest(&r, "oracle");
    assert_eq!((o.tokens_per_step, o.coverage), (Some(3.5), 1.0));
    assert_eq!(
        o.gamma_histogram["fp16"],
        [(1, 1), (4, 1)].into_iter().collect()
    );
    // Paired with fixed-4 on common rows.
    assert_eq!(f6.vs_fixed4_common_rows, Some((1, 0.0)));
    // tokens per time under the cost model, over known rows.
    let c = CostModel::assumed();
    let want = (2.0 + 3.0) / (2.0 * c.step(2));
    assert!((f2.tokens_per_time.unwrap() - want).abs() < 1e-12);
}

#[test]
fn stop_rules_are_known_only_when_every_stopping_point_agrees() {
    let train = synthetic(40, 5);
    // Confidence rule at p = 0.5:
    // a: min conf 0.3 < p, k = 0 → it stopped somewhere in 0..=3; every such γ gives 1 token: known.
    // b: min conf 0.3 < p, k = 2 → γ in 0..=3 gives 1..3 tokens: unknown.
    // c: min conf 0.9 ≥ p, measured at γ=8 with k = 5 → drafts 8: known, 6 tokens.
    let test = vec![
        rec(3, Compression::Int8, 4, 0, 0, 0.3, 0.1),
        rec(3, Compression::Int8, 4, 1, 2, 0.3, 0.1),
        rec(3, Compression::Int8, 8, 2, 5, 0.9, 0.1),
    ];
    let r = evaluate::evaluate(
        &train,
        &test,
        Some((tiny_model(), "tiny".into())),
        &quick_cfg(),
    )
    .unwrap();
    let c = honest(&r, "confidence_0.5");
    assert_eq!(c.coverage, 2.0 / 3.0);
    assert_eq!(c.tokens_per_step, Some((1.0 + 6.0) / 2.0));
    assert!(
        c.tokens_per_time.is_none(),
        "a range of γ has no single step time"
    );
}

#[test]
fn hf_heuristic_follows_its_schedule_on_a_trajectory() {
    let train = synthetic(40, 6);
    // One run measured at γ=8 with k = 8, 8, 3, 8: the schedule picks 4 (5 tokens, full → 6),
    // 6 (7, full → 8), 8 (4, not full → 7), 7 (8 tokens).
    let test: Vec<StepRecord> = [8, 8, 3, 8]
        .iter()
        .enumerate()
        .map(|(s, &k)| rec(3, Compression::Nf4, 8, s as u32, k, 0.9, 0.1))
        .collect();
    let r = evaluate::evaluate(
        &train,
        &test,
        Some((tiny_model(), "tiny".into())),
        &quick_cfg(),
    )
    .unwrap();
    let h = honest(&r, "hf_heuristic");
    assert_eq!(h.coverage, 1.0);
    assert_eq!(h.tokens_per_step, Some((5.0 + 7.0 + 4.0 + 8.0) / 4.0));
}

#[test]
fn lagged_features_come_from_the_previous_step_of_the_same_run() {
    let train = synthetic(40, 7);
    // tiny_model: â = 0.1 + 0.5·max(0, x0 − 1) − 0.025·γ with x0 = mean entropy = 0.6·max entropy.
    // Low entropy (x0 = 0.06) → γ = 2 (1.1 tokens); high entropy (x0 = 3) → γ = 8 (8.2 tokens).
    // Steps low, high, low: same-step features choose 2, 8, 2; lagged ones choose the first-step
    // fallback 4, then 2 (from step 0), then 8 (from step 1).
    let ent = [0.1, 5.0, 0.1];
    let test: Vec<StepRecord> = (0..3)
        .map(|s| rec(3, Compression::Fp16, 8, s, 2, 0.9, ent[s as usize]))
        .collect();
    let r = evaluate::evaluate(
        &train,
        &test,
        Some((tiny_model(), "tiny".into())),
        &quick_cfg(),
    )
    .unwrap();
    let hist = |name: &str| -> Vec<(u32, usize)> {
        honest(&r, name).gamma_histogram["fp16"]
            .iter()
            .map(|(g, n)| (*g, *n))
            .collect()
    };
    assert_eq!(hist("speckv"), vec![(2, 2), (8, 1)]);
    assert_eq!(hist("speckv_lagged"), vec![(2, 1), (4, 1), (8, 1)]);
    // Outcomes: k = 2 at γ_m = 8, so γ' gives min(2, γ') + 1 tokens: same-step 3, 3, 3; lagged 3, 3,
    // 3 — equal here, so compare the choices, which the histograms pin down.
    assert_eq!(honest(&r, "speckv").coverage, 1.0);
    assert_eq!(honest(&r, "speckv_lagged").coverage, 1.0);
}

#[test]
fn paper_method_values_and_paired_intervals() {
    let data = synthetic(200, 8);
    let (train, test): (Vec<_>, Vec<_>) = data.into_iter().partition(|r| r.run < 3);
    let r = evaluate::evaluate(
        &train,
        &test,
        None,
        &EvalConfig {
            resamples: 500,
            ..Default::default()
        },
    )
    .unwrap();
    for name in [
        "fixed2",
        "fixed4",
        "fixed6",
        "fixed8",
        "fixed_best",
        "task_oracle",
        "speckv",
        "speckv_cost",
        "oracle",
    ] {
        let p = &r.policies[name];
        assert!(
            p.ci95[0] <= p.tokens_per_step && p.tokens_per_step <= p.ci95[1],
            "{name}: {p:?}"
        );
        assert!(
            r.honest.contains_key(name),
            "{name} missing from the honest method"
        );
    }
    // Each paired interval of (policy − fixed4) holds its point difference and has width (the
    // resamples differ), and acceptance in this data makes γ = 8 rows produce more tokens per step
    // than γ = 2 rows.
    for name in ["fixed2", "fixed8", "speckv", "oracle"] {
        let d = r.policies[name].tokens_per_step - r.policies["fixed4"].tokens_per_step;
        let ci = r.policies[name].diff_vs_fixed4_ci95;
        assert!(
            ci[0] <= d && d <= ci[1] && ci[0] < ci[1],
            "{name}: {d} vs {ci:?}"
        );
    }
    assert!(r.policies["fixed8"].tokens_per_step > r.policies["fixed2"].tokens_per_step + 0.5);
    // fixed4 under the paper method is the mean measured tokens of γ=4 rows, by compression.
    let mean = |c: Compression| {
        let v: Vec<f64> = test
            .iter()
            .filter(|x| x.gamma == 4 && x.compression == c)
            .map(|x| x.tokens_produced as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let want = Compression::ALL.iter().map(|&c| mean(c)).sum::<f64>() / 3.0;
    assert!((r.policies["fixed4"].tokens_per_step - want).abs() < 1e-12);
    assert!(r.predictor.test_corr.is_finite());
}

#[test]
fn cost_aware_controller_prefers_cheaper_steps() {
    // A model predicting acceptance 0.9 everywhere: tokens/step favour γ = 8; with drafting as
    // expensive as verification, tokens per unit time favour a small γ.
    let mut m = Mlp {
        w1: [[0.0; 16]; 6],
        b1: [0.0; 16],
        w2: [[0.0; 1]; 16],
        b2: [0.9],
        feature_mean: [0.0; 6],
        feature_std: [1.0; 6],
    };
    m.b2 = [0.9];
    let plain = Controller::new(m.clone(), &PAPER_CANDIDATES, None).unwrap();
    assert_eq!(
        plain.decide([1.0, 0.5, 2.0, 0.3], Compression::Fp16).gamma,
        8
    );
    let cost = CostModel {
        draft_ms_per_token: 5.0,
        verify_ms: vec![1.0],
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    let c = Controller::new(m, &PAPER_CANDIDATES, Some(cost)).unwrap();
    let d = c.decide([1.0, 0.5, 2.0, 0.3], Compression::Fp16);
    // (0.9γ + 1) / (5γ + 1): γ=2 → 2.8/11 = 0.2545 beats γ=4 → 4.6/21 = 0.219.
    assert_eq!(d.gamma, 2);
    assert!((d.expected_tokens - 2.8).abs() < 1e-12);
    assert!(Controller::new(tiny_model(), &[], None).is_err());
    assert!(Controller::new(tiny_model(), &[0, 2], None).is_err());
}

// ---------------------------------------------------------------------------------------------
// the in-kernel decision

/// An f64 MLP written from the weights alone (not the host's `Mlp::predict`, not the kernel's
/// `gamma_mlp::predict`): the scores of every candidate.
fn independent_scores(
    m: &Mlp,
    x: [f64; 4],
    code: f64,
    cands: &[u32],
    cost: Option<&CostModel>,
) -> Vec<(f64, f64)> {
    cands
        .iter()
        .map(|&g| {
            let raw = [x[0], x[1], x[2], x[3], code, g as f64];
            let mut y = m.b2[0];
            for j in 0..16 {
                let mut h = m.b1[j];
                for (i, r) in raw.iter().enumerate() {
                    h += (r - m.feature_mean[i]) / m.feature_std[i] * m.w1[i][j];
                }
                y += h.max(0.0) * m.w2[j][0];
            }
            let tokens = y.clamp(0.0, 1.0) * g as f64 + 1.0;
            let score = match cost {
                Some(c) => tokens / c.step(g),
                None => tokens,
            };
            (score, tokens)
        })
        .collect()
}

#[test]
fn emulator_gamma_mlp_matches_an_independent_f64_mlp() {
    let data = synthetic(100, 9);
    let (tr, va, te) = mlp::split_by_run(&data).unwrap();
    let (m, _) = mlp::train(&data, &tr, &va, &te, TrainConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let mut accum: Vec<FeatureAccum> = (0..300)
        .map(|_| {
            let n = rng.gen_range(1..9u32);
            let me: f32 = rng.gen_range(0.0..3.0);
            let mc: f32 = rng.gen_range(0.2..1.0);
            FeatureAccum {
                count: n,
                flags: 0,
                entropy_sum: me * n as f32,
                entropy_max: me * 1.5,
                confidence_sum: mc * n as f32,
                confidence_min: mc * 0.8,
            }
        })
        .collect();
    accum[5].count = 0; // empty → fallback
    accum[6].flags = speckv::ROW_NONFINITE; // flagged rows → fallback
    accum[7].entropy_sum = f32::NAN; // a NaN feature → fallback, flagged
    accum[8].confidence_min = f32::INFINITY; // an infinite feature → fallback, flagged
    let mut compared = 0;
    let mut near_ties = 0;
    for cost in [None, Some(CostModel::assumed())] {
        let c = Controller::new(m.clone(), &PAPER_CANDIDATES, cost.clone()).unwrap();
        let w = c.mlp.to_f32();
        for code in [0.0f32, 1.0, 2.0] {
            let (g, e, f) =
                speckv::backend::emulate::gamma_mlp(&c, &w, &accum, code, 3, 64).unwrap();
            assert_eq!(
                (&g[5..9], &f[5..9]),
                (
                    &[3, 3, 3, 3][..],
                    &[
                        speckv::GAMMA_EMPTY,
                        speckv::GAMMA_FLAGGED_ROWS,
                        speckv::GAMMA_NONFINITE,
                        speckv::GAMMA_NONFINITE
                    ][..]
                ),
                "fallback γ and flags for empty, flagged and non-finite accumulators"
            );
            assert!(e[5..9].iter().all(|v| v.is_nan()));
            for (i, a) in accum.iter().enumerate() {
                if (5..9).contains(&i) {
                    continue;
                }
                assert_eq!(f[i], 0, "sequence {i} fell back");
                let n = a.count as f64;
                let x = [
                    a.entropy_sum as f64 / n,
                    a.confidence_sum as f64 / n,
                    a.entropy_max as f64,
                    a.confidence_min as f64,
                ];
                let scores =
                    independent_scores(&m, x, code as f64, &PAPER_CANDIDATES, cost.as_ref());
                let best = (0..scores.len())
                    .max_by(|&p, &q| scores[p].0.total_cmp(&scores[q].0).then(q.cmp(&p)))
                    .unwrap();
                let mut sorted: Vec<f64> = scores.iter().map(|s| s.0).collect();
                sorted.sort_by(|p, q| q.total_cmp(p));
                if sorted[0] - sorted[1] < 1e-4 * sorted[0].abs().max(1.0) {
                    near_ties += 1; // f32 may break a near-tie the other way
                    continue;
                }
                compared += 1;
                assert_eq!(
                    g[i], PAPER_CANDIDATES[best] as i32,
                    "sequence {i}: {scores:?}"
                );
                assert!(
                    common::close(e[i] as f64, scores[best].1, 1e-5, 1e-5),
                    "sequence {i}: {} vs {}",
                    e[i],
                    scores[best].1
                );
                // The host's f32 twin of the kernel (used by the CPU backend and the C ABI) agrees.
                assert_eq!(c.decide_f32(&w, a, code, 3).0, g[i]);
            }
        }
    }
    // The comparison covered nearly everything; clamping makes exact ties common only in the
    // saturated corners.
    assert!(
        compared > 1200,
        "compared {compared}, near ties {near_ties}"
    );
}

#[test]
fn host_decision_falls_back_on_non_finite_features() {
    let c = Controller::new(tiny_model(), &PAPER_CANDIDATES, None).unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let d = c.decide([bad, 0.5, 1.0, 0.3], Compression::Fp16);
        assert_eq!(d.gamma, 2, "the smallest candidate");
        assert_eq!(d.flags, speckv::GAMMA_NONFINITE);
        assert!(d.expected_tokens.is_nan());
    }
    let ok = c.decide([3.0 / 0.6, 0.5, 5.0, 0.3], Compression::Fp16);
    assert_eq!((ok.gamma, ok.flags), (8, 0));
}

#[test]
fn emulator_gamma_mlp_feeds_verify_through_memory() {
    // The γ the kernel writes is what verification reads: accumulators → gammas → verify.
    let m = tiny_model();
    let c = Controller::new(m, &[1, 2, 3], None).unwrap();
    let w = c.mlp.to_f32();
    let accum = vec![
        FeatureAccum {
            count: 2,
            flags: 0,
            entropy_sum: 6.0,
            entropy_max: 3.0,
            confidence_sum: 1.0,
            confidence_min: 0.4
        };
        2
    ];
    let (g, _, f) = speckv::backend::emulate::gamma_mlp(&c, &w, &accum, 0.0, 1, 32).unwrap();
    assert_eq!(f, vec![0, 0]);
    assert!(g.iter().all(|&x| (1..=3).contains(&x)));
    let vocab = 5;
    let gmax = 3;
    let target = vec![0.0f32; 2 * (gmax + 1) * vocab];
    let draft = vec![0.0f32; 2 * gmax * vocab];
    let v = speckv::VerifyBatch {
        target: speckv::LogitsData::F32(&target),
        target_stride: vocab,
        draft: speckv::DraftDist::Logits {
            data: speckv::LogitsData::F32(&draft),
            temperature: &[1.0, 1.0],
        },
        draft_stride: vocab,
        draft_tokens: &[0, 1, 2, 0, 1, 2],
        gammas: &g,
        target_temperature: &[1.0, 1.0],
        batch: 2,
        gamma_max: gmax,
        vocab,
        seed: 0,
        step: 0,
    };
    let o = speckv::backend::emulate::verify(&v, 32).unwrap();
    // p = q (uniform): every drafted token is accepted, so each sequence accepted exactly its γ.
    assert_eq!(o.accepted, g);
}

// ---------------------------------------------------------------------------------------------
// files and commands

#[test]
fn records_are_read_with_extra_columns_and_checked() {
    let csv = "extra,run,compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence\n\
               x,0,fp16,4,code,0,2,0.5,3,1.0,0.7,2.0,0.4\n";
    let r = records::read_records_from(csv.as_bytes(), "t").unwrap();
    assert_eq!(r[0].accepted, 2);
    let bad = csv.replace(",2,0.5,3,", ",5,0.5,6,");
    assert!(records::read_records_from(bad.as_bytes(), "t")
        .unwrap_err()
        .to_string()
        .contains("exceeds gamma"));
    let bad = csv.replace("fp16", "fp8");
    assert!(records::read_records_from(bad.as_bytes(), "t").is_err());
}

#[test]
fn evaluate_cli_json_has_the_documented_keys() {
    let dir = std::env::temp_dir().join(format!("speckv-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("steps.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "run,compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence").unwrap();
    for r in synthetic(80, 11) {
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.run,
            r.compression.name(),
            r.gamma,
            r.task,
            r.step,
            r.accepted,
            r.acceptance_rate,
            r.tokens_produced,
            r.mean_draft_entropy,
            r.mean_draft_confidence,
            r.max_draft_entropy,
            r.min_draft_confidence
        )
        .unwrap();
    }
    drop(f);
    let p = path.to_str().unwrap();
    let png = dir.join("eval.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args([
            "evaluate",
            "--train",
            p,
            "--train-runs",
            "0,1,2",
            "--test",
            p,
            "--test-runs",
            "3",
            "--resamples",
            "300",
            "--json",
            "--plot",
            png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["predictor"]["test_mse"].as_f64().is_some());
    assert!(v["predictor"]["test_corr"].as_f64().is_some());
    for name in [
        "fixed2",
        "fixed4",
        "fixed6",
        "fixed8",
        "fixed_best",
        "task_oracle",
        "speckv",
        "speckv_cost",
        "oracle",
    ] {
        assert!(
            v["policies"][name]["tokens_per_step"].as_f64().is_some(),
            "policies.{name}"
        );
        assert_eq!(
            v["policies"][name]["ci95"].as_array().map(|a| a.len()),
            Some(2),
            "policies.{name}.ci95"
        );
        assert!(
            v["honest"][name]["coverage"].as_f64().is_some(),
            "honest.{name}.coverage"
        );
        assert!(
            v["honest"][name].get("tokens_per_step").is_some(),
            "honest.{name}.tokens_per_step"
        );
    }
    let png_bytes = std::fs::read(&png).unwrap();
    assert_eq!(&png_bytes[..4], b"\x89PNG");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn simulate_and_overhead_commands_run() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let s = run(&["simulate"]);
    assert!(s.contains("2.99") && s.contains("note printed 3.13"), "{s}");
    let j: serde_json::Value =
        serde_json::from_str(&run(&["--backend", "cpu", "bench", "overhead", "--json"])).unwrap();
    assert!(j["cpu_us_per_decision"].as_f64().unwrap() > 0.0);
    assert!(j.get("gpu_us_per_batch").is_some());
    assert_eq!(j["paper_ms"], 0.336);
}

/// `gamma_mlp` on the device against the emulator (the same source): flags bit for bit, predicted
/// tokens per step to f32 rounding, γ equal except at near-ties of the predicted tokens (the GPU
/// computes with its own FMA contraction). Skipped without a CUDA device.
#[test]
fn cuda_gamma_mlp_matches_the_emulator() {
    let Some(cuda) = common::cuda() else { return };
    let data = synthetic(100, 19);
    let (tr, va, te) = mlp::split_by_run(&data).unwrap();
    let (m, _) = mlp::train(&data, &tr, &va, &te, TrainConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut accum: Vec<FeatureAccum> = (0..1000)
        .map(|_| {
            let n = rng.gen_range(1..9u32);
            let me: f32 = rng.gen_range(0.0..3.0);
            let mc: f32 = rng.gen_range(0.2..1.0);
            FeatureAccum {
                count: n,
                flags: 0,
                entropy_sum: me * n as f32,
                entropy_max: me * 1.5,
                confidence_sum: mc * n as f32,
                confidence_min: mc * 0.8,
            }
        })
        .collect();
    accum[1].count = 0;
    accum[2].flags = speckv::ROW_NONFINITE;
    accum[3].entropy_sum = f32::NAN;
    for cost in [None, Some(CostModel::assumed())] {
        let c = Controller::new(m.clone(), &PAPER_CANDIDATES, cost).unwrap();
        let w = c.mlp.to_f32();
        let dc = cuda.upload_controller(&c).unwrap();
        for code in [0.0f32, 2.0] {
            let (ge, ee, fe) =
                speckv::backend::emulate::gamma_mlp(&c, &w, &accum, code, 3, 64).unwrap();
            let (gc, ec, fc) = cuda.gamma_mlp(&dc, &accum, code, 3).unwrap();
            assert_eq!(fc, fe, "flags");
            let mut differ = 0;
            for i in 0..accum.len() {
                if fe[i] != 0 {
                    assert_eq!(gc[i], 3);
                    assert!(ec[i].is_nan());
                    continue;
                }
                assert!(
                    common::close(ec[i] as f64, ee[i] as f64, 1e-4, 1e-5),
                    "{i}: {} vs {}",
                    ec[i],
                    ee[i]
                );
                if gc[i] != ge[i] {
                    differ += 1;
                }
            }
            assert!(
                differ <= accum.len() / 100,
                "{differ} γ differ beyond near-ties"
            );
        }
    }
}

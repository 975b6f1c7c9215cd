//! `auto` over a batch (`controller::batch_auto`): the batch's stopping rule against a float64
//! reference, a batch of one against the single sequence's `auto` decision by decision, and the
//! free ride a batched step gives a sequence.

mod common;

use rand::{Rng, SeedableRng};
use speckv::controller::batch_auto::{batch_prior, decide_batch, speculate_batch, BatchAuto};
use speckv::controller::hazard::{AutoState, DraftTime, HazardModel};
use speckv::controller::records::Compression;
use speckv::controller::CostModel;
use speckv_kernels::params::{FeatureAccum, RowStats, StepCosts, StopState, STOP_TIMES};

/// Expected tokens of a step verifying `g` drafts of a sequence whose drafts 0..=j had hazards
/// `h` (drafts after j taken at h[j]): 1 + Σ_{m<g} Π_{k≤m} h_k.
fn expected(h: &[f64], g: usize) -> f64 {
    let (mut a, mut e) = (1.0, 1.0);
    for m in 0..g {
        a *= h[m.min(h.len() - 1)];
        e += a;
    }
    e
}

/// The batch's rule in float64 from the hazard histories: (keep, more), and the smallest relative
/// gap between two rates it compared (a near tie may go either way in f32).
fn reference(
    hist: &[Vec<f64>],
    j: usize,
    gamma_max: usize,
    draft: f64,
    verify: &dyn Fn(usize) -> f64,
) -> (bool, bool, f64) {
    let tokens = |g: usize| hist.iter().map(|h| expected(h, g)).sum::<f64>();
    let spent = (j + 1) as f64 * draft;
    let discard = tokens(j) / (spent + verify(j));
    let stop_after = tokens(j + 1) / (spent + verify(j + 1));
    let best = discard.max(stop_after);
    let gap = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs());
    let mut closest = gap(discard, stop_after);
    let mut more = false;
    for g in j + 2..=gamma_max {
        let r = tokens(g) / (g as f64 * draft + verify(g));
        closest = closest.min(gap(r, best));
        if r > best {
            more = true;
            break;
        }
    }
    let keep = j < gamma_max && (more || stop_after > discard);
    (keep, more && j + 1 < gamma_max, closest)
}

/// Each sequence's state before draft j, from its hazards of drafts 0..j.
fn states(hist: &[Vec<f64>], j: usize) -> Vec<StopState> {
    hist.iter()
        .map(|h| {
            let mut s = StopState::START;
            for &x in &h[..j] {
                s.survive *= x as f32;
                s.expected += s.survive;
                s.kept += 1;
            }
            s
        })
        .collect()
}

fn costs(draft: f32, slope: f32) -> StepCosts {
    let mut verify = [f32::INFINITY; STOP_TIMES];
    for (g, v) in verify.iter_mut().enumerate() {
        *v = 1.0 + slope * g as f32;
    }
    StepCosts { draft, verify }
}

#[test]
fn the_batch_rule_matches_the_float64_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut compared, mut ties, mut kept, mut more) = (0, 0, 0, 0);
    for case in 0..3000 {
        let n = 1 + case % 8;
        let gamma_max = rng.gen_range(1..=8usize);
        let j = rng.gen_range(0..=gamma_max);
        let c = costs(rng.gen_range(0.01..0.4), rng.gen_range(0.0..0.2));
        let hist: Vec<Vec<f64>> = (0..n)
            .map(|_| {
                // A confident or an unsure sequence; hazards as the rule sees them: f32 values
                // within the model's clamp.
                let level: f64 = if rng.gen_bool(0.7) {
                    rng.gen_range(0.7..0.999)
                } else {
                    rng.gen_range(0.001..0.7)
                };
                let jitter = |x: f64| (level + x).clamp(0.001, 0.999) as f32 as f64;
                (0..=j)
                    .map(|_| jitter(rng.gen_range(-0.05..0.05)))
                    .collect()
            })
            .collect();
        let mut st = states(&hist, j);
        let hs: Vec<f32> = hist.iter().map(|h| h[j] as f32).collect();
        let v = |g: u32| c.verify[g as usize];
        let got = decide_batch(&mut st, &hs, j as u32, gamma_max as u32, c.draft, v);
        let vf = |g: usize| c.verify[g] as f64;
        let (keep, m, gap) = reference(&hist, j, gamma_max, c.draft as f64, &vf);
        if gap < 1e-4 {
            ties += 1;
            continue;
        }
        compared += 1;
        assert_eq!(
            (got.keep, got.more),
            (keep, m),
            "case {case}: {hist:?} j {j}"
        );
        kept += keep as usize;
        more += m as usize;
        // Every state moves as the batch decided.
        for (s, h) in st.iter().zip(&hist) {
            assert_eq!(s.kept, j as u32 + keep as u32, "case {case}");
            assert_eq!(s.stopped, (!m) as u32, "case {case}");
            if keep {
                let want = expected(h, j + 1);
                assert!(
                    (s.expected as f64 - want).abs() < 1e-4 * want,
                    "case {case}"
                );
            }
        }
    }
    assert!(compared > 2800, "{compared} compared, {ties} near ties");
    // Both ways of every decision were taken.
    assert!(
        kept > 300 && kept + 300 < compared,
        "{kept} kept of {compared}"
    );
    assert!(
        more > 300 && more + 300 < compared,
        "{more} drafted on of {compared}"
    );
}

#[test]
fn two_equal_sequences_decide_as_one() {
    // Doubling every sum is exact in f32: the rates double, the comparisons stay.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..2000 {
        let gamma_max = rng.gen_range(1..=8u32);
        let j = rng.gen_range(0..=gamma_max);
        let c = costs(rng.gen_range(0.01..0.8), rng.gen_range(0.0..0.3));
        let hist: Vec<f64> = (0..=j)
            .map(|_| rng.gen_range(0.001f32..0.999) as f64)
            .collect();
        let h = hist[j as usize] as f32;
        let v = |g: u32| c.verify[g as usize];
        let mut one = states(std::slice::from_ref(&hist), j as usize);
        let mut two = states(&[hist.clone(), hist.clone()], j as usize);
        let a = decide_batch(&mut one, &[h], j, gamma_max, c.draft, v);
        let b = decide_batch(&mut two, &[h, h], j, gamma_max, c.draft, v);
        assert_eq!(a, b, "{hist:?}");
        assert_eq!(one[0], two[0]);
        assert_eq!(two[0], two[1]);
    }
}

#[test]
fn a_sequence_drafts_on_while_the_batch_does() {
    // Alone, a sequence whose draft is likely rejected stops; in a batch with one whose drafts are
    // likely accepted, the batch drafts on and it keeps drafting too (its rows are computed anyway).
    let c = costs(0.1, 0.02);
    let v = |g: u32| c.verify[g as usize];
    let mut low = [StopState::START];
    let alone = decide_batch(&mut low, &[0.05], 0, 6, c.draft, v);
    assert!(!alone.more, "{alone:?}");
    let mut high = [StopState::START];
    assert!(decide_batch(&mut high, &[0.95], 0, 6, c.draft, v).more);
    let mut both = [StopState::START; 2];
    let together = decide_batch(&mut both, &[0.95, 0.05], 0, 6, c.draft, v);
    assert_eq!((together.keep, together.more), (true, true));
    assert_eq!(both[1].kept, 1);
    assert_eq!(both[1].stopped, 0);
    assert!((both[1].expected - 1.05).abs() < 1e-6);
    // The gate sums too: three confident sequences speculate where none would alone at h = 0.3.
    let gate = costs(0.5, 0.02);
    assert!(!speculate_batch(&[0.3], &gate, 4));
    assert!(speculate_batch(&[0.3, 0.95, 0.95, 0.95], &gate, 4));
    assert!(
        !speculate_batch(&[0.95], &gate, 0),
        "γmax 0 never speculates"
    );
}

#[test]
fn the_batch_prior_scales_one_sequences_costs_by_rows() {
    let prior = CostModel::assumed();
    let one = batch_prior(&prior, 1);
    assert_eq!(one.verify_ms[..], prior.verify_ms[..16]);
    assert_eq!(one.draft_ms_per_token, prior.draft_ms_per_token);
    let four = batch_prior(&prior, 4);
    // γ drafts for 4 sequences: 4 · (γ + 1) rows, the prior's verification at 4γ + 3.
    assert_eq!(four.verify_ms.len(), 4);
    for (g, &v) in four.verify_ms.iter().enumerate() {
        assert_eq!(v, prior.verify((4 * g + 3) as u32), "γ {g}");
    }
    let scale = prior.verify(3) / prior.verify(0);
    assert!((four.draft_ms_per_token - prior.draft_ms_per_token * scale).abs() < 1e-12);
    assert!(four.source.contains("4 sequences"));
    let model = HazardModel::default_model().unwrap();
    for bad in [0, 17] {
        let e = BatchAuto::new(&model, &prior, bad).unwrap_err();
        assert!(e.to_string().contains("1 to 16"), "{e}");
    }
}

#[test]
fn a_batch_of_one_decides_as_auto_does() {
    // The same draws through `AutoState` (the single-sequence loop's state) and a `BatchAuto` of
    // one: the gate, every keep / draft-on verdict and the calibration agree at every step.
    let model = HazardModel::default_model().unwrap();
    let prior = CostModel::assumed();
    let mut single = AutoState::new(&model, prior.clone());
    let mut batch = BatchAuto::new(&model, &prior, 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let comp = Compression::Int8;
    let (mut plain, mut dropped, mut stopped, mut full) = (0, 0, 0, 0);
    for step in 0..600 {
        // Regimes of 100 steps: cheap or dear drafts, confident or unsure ones.
        let dear = (step / 100) % 2 == 1;
        let unsure = (step / 200) % 2 == 1;
        let gm = 1 + step % 8;
        let (costs, g1, mut rule) = single.begin_step(gm);
        let g2 = batch.begin_step(gm, &[true]);
        assert_eq!(g1, g2, "step {step}: the gate");
        plain += (g1 == 0) as usize;
        let mut accum = FeatureAccum::EMPTY;
        let mut kept = 0;
        for _ in 0..g1 {
            let row = RowStats {
                entropy: rng.gen_range(0.0..if unsure { 6.0 } else { 1.0 }),
                confidence: rng.gen_range(if unsure { 0.05 } else { 0.6 }..1.0),
                ..RowStats::default()
            };
            accum.push(row.entropy, row.confidence, 0);
            let d = rule.decide(&single.weights, &accum, &row, comp, &costs, g1);
            single.record(&d);
            let v = batch.decide([(0, &accum, &row)], comp);
            assert_eq!(
                (v.keep, v.more),
                (d.keep, d.more),
                "step {step}, draft {kept}"
            );
            kept += d.keep as usize;
            if !d.keep {
                dropped += 1;
                break;
            }
            if !d.more {
                stopped += (kept < g1) as usize;
                full += (kept == g1) as usize;
                break;
            }
        }
        let accepted = rng.gen_range(0..=kept);
        let ds = if dear { 0.8 } else { 0.05 } * rng.gen_range(0.9..1.1) * kept.max(1) as f64;
        let vs = 1.0 + 0.02 * kept as f64 * rng.gen_range(0.9..1.1);
        let draft = DraftTime::steady(kept.max(1), ds);
        single.end_step(&draft, kept, vs, accepted);
        batch.end_step(&draft, kept, vs, [(0, accepted)]);
        assert_eq!(
            batch.odds_scale(0),
            Some(single.calibration.odds_scale()),
            "step {step}"
        );
    }
    // Every branch was taken: plain steps, a draft discarded, a stop before γmax, γmax reached.
    assert!(
        plain > 10 && dropped > 10 && stopped > 10 && full > 10,
        "plain {plain}, discarded {dropped}, stopped {stopped}, full {full}"
    );
}

/// Forty steps of a batch of four whose drafts all have hazard `h`, under costs as on a CPU:
/// every row of a pass costs `ROW`, on top of `fixed` per pass, so a plain step (4 rows) costs
/// far less than a verification of 3 drafts each (16 rows). The gate of each step and the drafts
/// it kept, and the batch's state after; `gate_off` as `auto-nogate` sets it.
fn forty_cpu_steps(h: f64, fixed: f64, gate_off: bool) -> (Vec<usize>, Vec<usize>, BatchAuto) {
    const ROW: f64 = 0.05;
    let model = common::constant_hazard(h);
    let mut batch = BatchAuto::new(&model, &CostModel::assumed(), 4).unwrap();
    batch.gate_off = gate_off;
    let draft_pass = 0.02;
    let verify = |g: usize| fixed + ROW * (4 * (g + 1)) as f64;
    let (mut gates, mut gammas) = (Vec::new(), Vec::new());
    for step in 0..40 {
        if step == 1 && h == 0.8 {
            // Before the plain step, the costs the prior guesses make speculating look better.
            assert!(speculate_batch(&[0.8; 4], &batch.cost.step_costs(3), 3));
        }
        let g = batch.begin_step(3, &[true; 4]);
        let mut accum = [FeatureAccum::EMPTY; 4];
        let rowstats = RowStats {
            entropy: 0.5,
            confidence: 0.9,
            ..RowStats::default()
        };
        let mut kept = 0;
        for _ in 0..g {
            for a in &mut accum {
                a.push(0.5, 0.9, 0);
            }
            let v = batch.decide((0..4).map(|i| (i, &accum[i], &rowstats)), Compression::Fp16);
            kept += v.keep as usize;
            if !v.more {
                break;
            }
        }
        let forwards = if g > 0 { kept.max(1) } else { 0 };
        let accepted = (0..4).map(|i| (i, kept.min(2)));
        let draft = DraftTime::steady(forwards, forwards as f64 * draft_pass);
        batch.end_step(&draft, kept, verify(kept), accepted);
        gates.push(g);
        gammas.push(kept);
    }
    (gates, gammas, batch)
}

#[test]
fn a_batch_measures_a_plain_step_before_trusting_the_prior() {
    // Per-row costs only: even drafts all accepted (16 tokens for 3 draft passes and 16 rows)
    // lose to plain steps (4 tokens for 4 rows). The prior, scaled from one sequence, guesses far
    // less; the batch takes one plain step to measure it, then stays plain and never probes: no
    // hazard a probe could measure would change that.
    let (gates, gammas, batch) = forty_cpu_steps(0.8, 0.0, false);
    assert!(
        gammas[0] > 0,
        "{gammas:?}: the first step speculates (no hazards yet)"
    );
    assert_eq!(gates[1], 0, "{gates:?}: the second measures a plain step");
    assert!(batch.cost.measured(0));
    assert_eq!(gates[1..], [0; 39], "{gates:?}");
    // With a cost per pass as well, drafts all accepted would win, so the batch probes while its
    // hazards say plain: each probe drafts one token and discards it, and each lost probe doubles
    // the wait for the next (4, 8, 16 plain steps).
    let (gates, gammas, batch) = forty_cpu_steps(0.5, 0.1, false);
    assert!(
        gates[0] > 0,
        "{gates:?}: the first step speculates (no hazards yet)"
    );
    assert!(batch.cost.measured(0));
    let probes: Vec<usize> = (1..40).filter(|&s| gates[s] > 0).collect();
    assert_eq!(probes, [5, 14, 31], "{gates:?}");
    assert_eq!(gammas[1..], [0; 39], "{gammas:?}");
    // The gate off (`auto-nogate`): no plain step (so none measured), every step drafts, and the
    // rule alone decides how many drafts each keeps.
    let (gates, _, batch) = forty_cpu_steps(0.5, 0.1, true);
    assert_eq!(gates, [3; 40], "{gates:?}");
    assert!(!batch.cost.measured(0));
    // A batch of one keeps `auto`'s own gate: no plain step to measure (see the test above).
    let model = common::constant_hazard(0.8);
    let mut one = BatchAuto::new(&model, &CostModel::assumed(), 1).unwrap();
    assert_eq!(one.begin_step(3, &[true]), 3);
}

#[test]
fn a_batch_reads_its_costs_off_the_line_through_what_it_measured() {
    use speckv::controller::hazard::OnlineCost;
    let prior = CostModel::assumed();
    let mut c = OnlineCost::new(prior.clone(), 1.0);
    // One γ measured: the prior's shape scaled to it, as `verify`.
    c.observe(1, 0.1, 4, 3.0);
    for g in 0..8 {
        assert_eq!(c.verify_linear(g), c.verify(g), "γ {g}");
    }
    // Two: between them on the line, above them along it, below them as `verify`.
    c.observe(1, 0.1, 2, 2.0);
    assert_eq!(c.verify_linear(3), 2.5);
    assert_eq!(c.verify_linear(4), 3.0);
    assert_eq!(c.verify_linear(8), 5.0);
    assert_eq!(c.verify_linear(1), c.verify(1));
    c.observe(1, 0.1, 0, 1.0);
    assert_eq!(c.verify_linear(1), 1.5);
    // A noisy measurement that falls with γ: never below the largest measured γ's time above it.
    c.observe(1, 0.1, 4, 1.8);
    assert_eq!(c.verify_linear(6), 1.8);
    let s = c.step_costs_linear(6);
    assert_eq!(s.verify[1], 1.5);
    assert_eq!(s.verify[7], f32::INFINITY, "beyond γmax");
    assert_eq!(s.draft, c.step_costs(6).draft);
}

#[test]
fn a_sequence_named_again_or_out_of_range_is_not_counted() {
    // Twenty entries for a batch of two: one sequence named over and over, one past the batch.
    let model = HazardModel::default_model().unwrap();
    let prior = CostModel::assumed();
    let (mut a, mut b) = (
        BatchAuto::new(&model, &prior, 2).unwrap(),
        BatchAuto::new(&model, &prior, 2).unwrap(),
    );
    assert_eq!(a.begin_step(8, &[true, true]), 8);
    assert_eq!(b.begin_step(8, &[true, true]), 8);
    let mut acc = FeatureAccum::EMPTY;
    let row = RowStats {
        entropy: 0.05,
        confidence: 0.99,
        ..RowStats::default()
    };
    for pass in 0..8 {
        acc.push(row.entropy, row.confidence, 0);
        let va = a.decide([(0, &acc, &row), (1, &acc, &row)], Compression::Fp16);
        let many = (0..20).map(|k| (if k == 19 { 7 } else { k % 2 }, &acc, &row));
        assert_eq!(b.decide(many, Compression::Fp16), va, "pass {pass}");
        if !va.more {
            break;
        }
    }
}

/// A batch of several measures a plain step whatever its prior (scaled from one sequence's, its
/// shape is a guess at passes of B to 16 rows); a batch of one trusts a measured prior, as a
/// single sequence does, and measures a plain step only under the assumed one.
#[test]
fn a_batch_of_several_measures_a_plain_step_whatever_its_prior() {
    let measured = CostModel {
        draft_ms_per_token: 10.0,
        verify_ms: (0..=8).map(|g| 50.0 + 5.0 * g as f64).collect(),
        draft_feed_ms: Vec::new(),
        source: "test".into(),
    };
    for (seqs, prior, want) in [
        (4, &measured, 0),
        (1, &measured, 3),
        (1, &CostModel::assumed(), 0),
    ] {
        let mut b = BatchAuto::new(&common::constant_hazard(0.9), prior, seqs).unwrap();
        let active = vec![true; seqs];
        assert_eq!(b.begin_step(3, &active), 3, "nothing known: it speculates");
        let mut accum = vec![FeatureAccum::EMPTY; seqs];
        for a in &mut accum {
            a.push(0.5, 0.9, 0);
        }
        let rs = RowStats {
            entropy: 0.5,
            confidence: 0.9,
            ..RowStats::default()
        };
        b.decide((0..seqs).map(|i| (i, &accum[i], &rs)), Compression::Fp16);
        b.end_step(
            &DraftTime::steady(1, 10.0),
            1,
            55.0,
            (0..seqs).map(|i| (i, 1)),
        );
        let g = b.begin_step(3, &active);
        assert_eq!(g, want, "{seqs} sequences, prior {}", prior.source);
    }
}

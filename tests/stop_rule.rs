//! Per-token stopping (`speckv_kernels::stop_rule`) fused into `softmax_stats_v2`'s epilogue
//! (`STATS_STOP`), on the emulator with its sanitizer and several schedules, against the CPU's
//! `controller::hazard::StopRule` fed the same row statistics: the same features, hazards,
//! decisions, γ_b and states, bit for bit. Then the rule's own contract: stopped sequences stay
//! put, γmax ends a step, flagged rows fail closed.

mod common;

use speckv::backend::emulate::{Emulator, StatsV2Output, Stop};
use speckv::controller::hazard::{HazardModel, OnlineCost, StopRule};
use speckv::controller::records::Compression;
use speckv::controller::CostModel;
use speckv::{Accumulate, FeatureAccum, Logits, LogitsData, StatsOptions};
use speckv_kernels::params::{MlpWeights, StepCosts, StopState, STOP_TIMES};
use speckv_kernels::softmax_stats::{plan_v2, shared_bytes_v2, PlanV2};

/// Logits of `rows` sequences, sequence b at its own scale (confident to flat drafts).
fn batch_logits(rows: usize, vocab: usize, position: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|b| {
            let scale = 0.3 + 1.4 * b as f32;
            common::normal_logits(vocab, scale, (100 * b + position) as u64)
        })
        .collect()
}

fn opts(position: usize) -> StatsOptions {
    common::draft_opts(3, position)
}

/// Plans with one and with many blocks per row, at the smallest and the largest block size.
fn plans(rows: usize, vocab: usize) -> Vec<PlanV2> {
    let mut out = Vec::new();
    for sms in [1, 7, 132] {
        let p = plan_v2(rows as u32, vocab as u32, 4, sms);
        for block in [p.block, 32, 1024] {
            out.push(PlanV2 {
                block,
                shared_bytes: shared_bytes_v2(block),
                ..p
            });
        }
    }
    assert!(out.iter().any(|p| p.splits == 1) && out.iter().any(|p| p.splits > 1));
    out
}

/// One launch of `softmax_stats_v2` with `STATS_STOP` on some backend.
type StopLaunch<'a> =
    &'a dyn Fn(&Logits<'_>, &StatsOptions, &mut [FeatureAccum], Stop<'_>) -> StatsV2Output;

/// Drafts γmax positions for every sequence on the emulator (the CPU rule fed each launch's row
/// statistics alongside) and returns the final (γ_b, states) after checking every launch.
#[allow(clippy::too_many_arguments)]
fn run_step(
    weights: &MlpWeights,
    costs: &StepCosts,
    gamma_max: usize,
    rows: usize,
    vocab: usize,
    plan: &PlanV2,
    poison: Option<(usize, usize)>,
    odds_scale: f32,
) -> (Vec<i32>, Vec<StopState>) {
    let emu = Emulator::new(plan.block);
    let launch = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        emu.softmax_stats_v2_stop(l, o, a, plan, s).unwrap()
    };
    run_step_on(
        &launch, weights, costs, gamma_max, rows, vocab, poison, odds_scale, true,
    )
}

/// [`run_step`] on any backend; `exact`: the launch's f32 arithmetic is the host's (the
/// emulator), so states match bit for bit — on a GPU, decisions must match and the running
/// expectations agree to rounding.
#[allow(clippy::too_many_arguments)]
fn run_step_on(
    launch: StopLaunch<'_>,
    weights: &MlpWeights,
    costs: &StepCosts,
    gamma_max: usize,
    rows: usize,
    vocab: usize,
    poison: Option<(usize, usize)>,
    odds_scale: f32,
    exact: bool,
) -> (Vec<i32>, Vec<StopState>) {
    let mut state = vec![StopState::START; rows];
    let mut accum = vec![FeatureAccum::EMPTY; rows];
    let mut cpu = vec![StopRule::calibrated(odds_scale); rows];
    let mut cpu_accum = vec![FeatureAccum::EMPTY; rows];
    let mut cpu_done = vec![false; rows];
    let mut gammas = vec![0i32; rows];
    for j in 0..gamma_max {
        let mut x = batch_logits(rows, vocab, j);
        if let Some((b, at)) = poison {
            if at == j {
                x[b * vocab + 5] = f32::NAN;
            }
        }
        let l = Logits::dense(LogitsData::F32(&x), vocab).unwrap();
        let stop = Stop {
            weights,
            state: &state,
            costs: *costs,
            gamma_max: gamma_max as u32,
            compression_code: Compression::Int8.code() as f32,
            odds_scale,
            odds_scales: None,
            lockstep: false,
        };
        let before = (accum.clone(), state.clone());
        let r = launch(&l, &opts(j), &mut accum, stop);
        let new_state = r.stop_state.clone().unwrap();
        let g = r.gammas.clone().unwrap();
        let mut stopped_now = 0;
        for b in 0..rows {
            let st = r.stats[b];
            if cpu_done[b] {
                // A stopped sequence: its accumulator, state and γ_b stay as they were.
                assert_eq!(accum[b], before.0[b], "row {b} pos {j}");
                assert_eq!(new_state[b], before.1[b], "row {b} pos {j}");
                assert_eq!(g[b], gammas[b]);
                continue;
            }
            cpu_accum[b].push(st.entropy, st.confidence, st.flags);
            let d = cpu[b].decide(
                weights,
                &cpu_accum[b],
                &st,
                Compression::Int8,
                costs,
                gamma_max,
            );
            if exact {
                assert_eq!(
                    bytemuck::bytes_of(&accum[b]),
                    bytemuck::bytes_of(&cpu_accum[b]),
                    "row {b} pos {j}: accumulators"
                );
                assert_eq!(
                    bytemuck::bytes_of(&new_state[b]),
                    bytemuck::bytes_of(&cpu[b].state),
                    "row {b} pos {j}: the kernel decided {:?}, the CPU {d:?}",
                    new_state[b]
                );
            } else {
                let (k, c) = (new_state[b], cpu[b].state);
                assert_eq!((k.kept, k.stopped), (c.kept, c.stopped), "row {b} pos {j}");
                assert!(common::close(
                    k.expected as f64,
                    c.expected as f64,
                    1e-5,
                    1e-6
                ));
                assert_eq!(accum[b].count, cpu_accum[b].count);
            }
            assert_eq!(g[b] as u32, cpu[b].state.kept, "row {b} pos {j}: γ_b");
            // The hazard of a kept draft is written for the calibration; nothing else is.
            let h = r.hazards.as_ref().unwrap()[b * STOP_TIMES + j];
            if d.keep {
                assert!(
                    if exact {
                        h as f64 == d.hazard
                    } else {
                        common::close(h as f64, d.hazard, 1e-4, 1e-6)
                    },
                    "row {b} pos {j}: hazard {h} vs the CPU rule's {}",
                    d.hazard
                );
            } else {
                assert!(
                    h.is_nan(),
                    "row {b} pos {j}: a discarded draft's hazard written ({h})"
                );
            }
            if cpu[b].state.stopped != 0 {
                cpu_done[b] = true;
                stopped_now += 1;
            }
        }
        assert_eq!(r.stopped_count, Some(stopped_now), "pos {j}");
        state = new_state;
        gammas = g;
    }
    (gammas, state)
}

fn shipped_costs(gamma_max: usize) -> StepCosts {
    OnlineCost::new(CostModel::assumed(), 0.2).step_costs(gamma_max)
}

#[test]
fn emulator_epilogue_decides_as_the_cpu_rule() {
    let model = HazardModel::default_model().unwrap();
    let w = model.weights();
    let (rows, vocab, gmax) = (6, 1500, 7);
    let costs = shipped_costs(gmax);
    let mut outcomes = std::collections::BTreeSet::new();
    for (i, plan) in plans(rows, vocab).iter().enumerate() {
        // As trained, and calibrated online (the model's odds scaled).
        let k = [1.0, 0.6, 1.7][i % 3];
        let (g, s) = run_step(&w, &costs, gmax, rows, vocab, plan, None, k);
        assert!(s.iter().all(|x| x.stopped == 1), "every sequence ends");
        outcomes.extend(g);
    }
    // Flat and confident drafts: the rule both stops early and drafts on here.
    assert!(
        outcomes.len() >= 2 && outcomes.iter().any(|&g| g < gmax as i32),
        "{outcomes:?}"
    );
}

/// A model whose hazard is `h` whatever the features.
fn constant(h: f64) -> MlpWeights {
    common::constant_hazard(h).weights()
}

#[test]
fn gamma_max_ends_the_step_and_flagged_rows_fail_closed() {
    let (rows, vocab, gmax) = (4, 700, 5);
    // Cheap drafts: a near-certain hazard drafts to γmax.
    let mut costs = StepCosts {
        draft: 0.001,
        verify: [f32::INFINITY; STOP_TIMES],
    };
    for (g, t) in costs.verify.iter_mut().enumerate().take(gmax + 1) {
        *t = 1.0 + 0.1 * g as f32;
    }
    let plan = plan_v2(rows as u32, vocab as u32, 4, 7);
    let (g, s) = run_step(&constant(0.99), &costs, gmax, rows, vocab, &plan, None, 1.0);
    assert_eq!(g, vec![gmax as i32; rows]);
    assert!(s.iter().all(|x| x.stopped == 1 && x.kept == gmax as u32));
    // A NaN in sequence 2's third draft: that draft is not kept, the others draft on.
    let (g, _) = run_step(
        &constant(0.99),
        &costs,
        gmax,
        rows,
        vocab,
        &plan,
        Some((2, 2)),
        1.0,
    );
    assert_eq!(g, vec![5, 5, 2, 5]);
    // A hopeless hazard stops before the first draft: γ = 0, a plain step.
    let (g, s) = run_step(&constant(0.01), &costs, gmax, rows, vocab, &plan, None, 1.0);
    assert_eq!(g, vec![0; rows]);
    assert!(s.iter().all(|x| x.stopped == 1 && x.kept == 0));
}

#[test]
fn stop_launches_reject_inconsistent_inputs() {
    let x = batch_logits(2, 64, 0);
    let l = Logits::dense(LogitsData::F32(&x), 64).unwrap();
    let w = constant(0.5);
    let plan = plan_v2(2, 64, 4, 1);
    let emu = Emulator::new(plan.block);
    let mut accum = vec![FeatureAccum::EMPTY; 2];
    let one = [StopState::START];
    let stop = Stop {
        weights: &w,
        state: &one,
        costs: shipped_costs(4),
        gamma_max: 4,
        compression_code: 0.0,
        odds_scale: 1.0,
        odds_scales: None,
        lockstep: false,
    };
    let e = emu
        .softmax_stats_v2_stop(&l, &opts(0), &mut accum, &plan, stop)
        .unwrap_err();
    assert!(e.to_string().contains("1 stop states for 2 rows"), "{e}");
    let two = [StopState::START; 2];
    let e = emu
        .softmax_stats_v2_stop(
            &l,
            &opts(0),
            &mut accum,
            &plan,
            Stop {
                state: &two,
                gamma_max: STOP_TIMES as u32,
                ..stop
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("γmax 16"), "{e}");
    let no_accum = StatsOptions {
        accumulate: Accumulate::No,
        ..opts(0)
    };
    let e = emu
        .softmax_stats_v2_stop(
            &l,
            &no_accum,
            &mut accum,
            &plan,
            Stop {
                state: &two,
                ..stop
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("accumulators"), "{e}");
}

/// The native CPU backend's batched stop (`CpuBackend::softmax_stats_stop`, what the C ABI's CPU
/// contexts run) decides as the CPU rule fed its own row statistics, bit for bit (the same f32
/// rule), stopped sequences left alone; with a poisoned draft the flagged row fails closed as on
/// the emulator; and it refuses what the emulator refuses.
#[test]
fn cpu_backend_decides_as_the_cpu_rule() {
    let cpu = speckv::backend::cpu::CpuBackend::new();
    let launch = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        cpu.softmax_stats_stop(l, o, a, s).unwrap()
    };
    let w = HazardModel::default_model().unwrap().weights();
    let (rows, vocab, gmax) = (6, 1500, 7);
    let costs = shipped_costs(gmax);
    let mut outcomes = std::collections::BTreeSet::new();
    for k in [1.0, 0.6, 1.7] {
        let (g, s) = run_step_on(&launch, &w, &costs, gmax, rows, vocab, None, k, true);
        assert!(s.iter().all(|x| x.stopped == 1), "every sequence ends");
        outcomes.extend(g);
    }
    assert!(outcomes.len() >= 2, "{outcomes:?}");
    // The emulator's NaN case: the poisoned third draft of sequence 2 is not kept.
    let mut cheap = StepCosts {
        draft: 0.001,
        verify: [f32::INFINITY; STOP_TIMES],
    };
    for (g, t) in cheap.verify.iter_mut().enumerate().take(6) {
        *t = 1.0 + 0.1 * g as f32;
    }
    let (g, _) = run_step_on(
        &launch,
        &constant(0.99),
        &cheap,
        5,
        4,
        700,
        Some((2, 2)),
        1.0,
        true,
    );
    assert_eq!(g, vec![5, 5, 2, 5]);

    let x = batch_logits(2, 64, 0);
    let l = Logits::dense(LogitsData::F32(&x), 64).unwrap();
    let mut accum = vec![FeatureAccum::EMPTY; 2];
    let two = [StopState::START; 2];
    let stop = Stop {
        weights: &w,
        state: &two,
        costs: shipped_costs(4),
        gamma_max: 4,
        compression_code: 0.0,
        odds_scale: 1.0,
        odds_scales: None,
        lockstep: false,
    };
    let no_accum = StatsOptions {
        accumulate: Accumulate::No,
        ..opts(0)
    };
    for (o, s, says) in [
        (
            opts(0),
            Stop {
                state: &two[..1],
                ..stop
            },
            "1 stop states for 2 rows",
        ),
        (
            opts(0),
            Stop {
                gamma_max: STOP_TIMES as u32,
                ..stop
            },
            "γmax 16",
        ),
        (no_accum, stop, "accumulators"),
    ] {
        let e = cpu.softmax_stats_stop(&l, &o, &mut accum, s).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
}

/// The epilogue on the device decides as the CPU rule fed the device's own row statistics (the
/// same decisions; expectations to rounding). Skipped without a CUDA device.
#[test]
fn cuda_epilogue_decides_as_the_cpu_rule() {
    let Some(cuda) = common::cuda() else { return };
    let model = HazardModel::default_model().unwrap();
    let w = model.weights();
    let (rows, vocab, gmax) = (24, 32000, 7);
    let costs = shipped_costs(gmax);
    let launch = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        cuda.softmax_stats_stop(l, o, a, s).unwrap()
    };
    for k in [1.0, 0.6] {
        let (g, s) = run_step_on(&launch, &w, &costs, gmax, rows, vocab, None, k, false);
        assert!(s.iter().all(|x| x.stopped == 1));
        assert!(g.iter().any(|&x| x < gmax as i32), "{g:?}");
    }
}

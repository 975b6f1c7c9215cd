//! Per-token stopping in lockstep (`StopParams::lockstep`): `softmax_stats_v2`'s lockstep epilogue
//! on the emulator (sanitizer on, several schedules, rows split across blocks or not) decides as
//! `generate`'s batched rule (`controller::batch_auto::BatchAuto`) fed the same row statistics, and
//! so does the CPU backend (what the C ABI's CPU contexts run) fed its own; a batch of one decides
//! as one sequence alone; a launch after the stop changes nothing; and what the epilogue cannot
//! decide is refused.

mod common;

use speckv::backend::cpu::CpuBackend;
use speckv::backend::emulate::{Emulator, StatsV2Output, Stop};
use speckv::controller::batch_auto::BatchAuto;
use speckv::controller::hazard::{self, HazardModel};
use speckv::controller::records::Compression;
use speckv::controller::CostModel;
use speckv::{FeatureAccum, Logits, LogitsData, StatsOptions};
use speckv_kernels::params::{StepCosts, StopState, LOCKSTEP_MAX_ROWS, STOP_TIMES};
use speckv_kernels::softmax_stats::{plan_v2, shared_bytes_v2, PlanV2};
use speckv_kernels::stop_rule;

/// Drafted position `j`'s logits for `rows` sequences: sequence b is confident (one token far
/// ahead) for its first `b + 1` positions and flat after, so the batch's sum falls as the
/// sequences turn flat.
fn logits(rows: usize, vocab: usize, j: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|b| {
            let mut x = common::normal_logits(vocab, 0.5, (31 * b + j) as u64);
            if j <= b {
                x[(13 * j + b) % vocab] += 12.0;
            }
            x
        })
        .collect()
}

fn opts(j: usize) -> StatsOptions {
    common::draft_opts(5, j)
}

/// Plans with a row split across blocks (as planned for 132 SMs) and with one block per row, at
/// two block sizes.
fn plans(rows: usize, vocab: usize) -> Vec<PlanV2> {
    let split = plan_v2(rows as u32, vocab as u32, 4, 132);
    let whole = PlanV2 {
        splits: 1,
        chunk_vecs: (vocab as u32).div_ceil(4), // f32: four to a 16-byte vector
        grid: rows as u32,
        ..split
    };
    assert!(rows > 6 || split.splits > 1, "{split:?}");
    let mut out = Vec::new();
    for p in [split, whole] {
        for block in [32, 256] {
            out.push(PlanV2 {
                block,
                shared_bytes: shared_bytes_v2(block),
                ..p
            });
        }
    }
    out
}

type Launch<'a> =
    &'a dyn Fn(&Logits<'_>, &StatsOptions, &mut [FeatureAccum], Stop<'_>) -> StatsV2Output;

/// Two lockstep steps of `rows` sequences on `launch`, against `BatchAuto` (gate off) fed the
/// launches' row statistics at every position; returns the first step's final γ (the same for
/// all). The first step weighs the model's odds as trained; between the steps `BatchAuto`
/// calibrates each sequence by its own verified outcomes (sequence i accepts i mod (γ + 1)
/// drafts), and the second step's launches take those scales per row (`Stop::odds_scales`).
fn step_against_batch_auto(launch: Launch<'_>, rows: usize, vocab: usize, gamma_max: usize) -> u32 {
    step_against(launch, rows, vocab, gamma_max, true)
}

/// [`step_against_batch_auto`]; `exact`: the launch's model arithmetic is the host's (the emulator
/// and the CPU), so hazards match bit for bit — on a GPU, to rounding.
fn step_against(
    launch: Launch<'_>,
    rows: usize,
    vocab: usize,
    gamma_max: usize,
    exact: bool,
) -> u32 {
    let model = HazardModel::default_model().unwrap();
    let mut auto = BatchAuto::new(&model, &CostModel::assumed(), rows).unwrap();
    auto.gate_off = true;
    let mut first = None;
    for round in 0..2 {
        let scales: Vec<f32> = (0..rows).map(|i| auto.odds_scale(i).unwrap()).collect();
        if round == 1 && rows > 1 && first > Some(0) {
            assert!(
                scales.iter().any(|&k| k != scales[0]),
                "{rows} rows: the calibrations did not move apart: {scales:?}"
            );
        }
        let kept = lockstep_step(launch, &mut auto, &model, &scales, vocab, gamma_max, exact);
        let at = format!("{rows} rows, step {round}");
        assert!(kept <= gamma_max as u32, "{at}");
        first.get_or_insert(kept);
        let draft = hazard::DraftTime::steady(kept.max(1) as usize, 1e-3);
        auto.end_step(
            &draft,
            kept as usize,
            3e-3,
            (0..rows).map(|i| (i, i % (kept as usize + 1))),
        );
    }
    first.unwrap()
}

/// One step: the launches in lockstep with `scales` per row, checked against `auto.decide` at
/// every position; returns the step's γ.
fn lockstep_step(
    launch: Launch<'_>,
    auto: &mut BatchAuto,
    model: &HazardModel,
    scales: &[f32],
    vocab: usize,
    gamma_max: usize,
    exact: bool,
) -> u32 {
    let rows = scales.len();
    let w = model.weights();
    assert_eq!(auto.begin_step(gamma_max, &vec![true; rows]), gamma_max);
    // The costs `BatchAuto` weighs: its batched prior read off the line (several sequences).
    let costs: StepCosts = if rows > 1 {
        auto.cost.step_costs_linear(gamma_max)
    } else {
        auto.cost.step_costs(gamma_max)
    };
    let mut state = vec![StopState::START; rows];
    let mut accum = vec![FeatureAccum::EMPTY; rows];
    let mut host_accum = vec![FeatureAccum::EMPTY; rows];
    for j in 0..gamma_max {
        let x = logits(rows, vocab, j);
        let l = Logits::dense(LogitsData::F32(&x), vocab).unwrap();
        let stop = Stop {
            weights: &w,
            state: &state,
            costs,
            gamma_max: gamma_max as u32,
            compression_code: Compression::Nf4.code() as f32,
            odds_scale: 1.0,
            odds_scales: Some(scales),
            lockstep: true,
        };
        let r = launch(&l, &opts(j), &mut accum, stop);
        for (a, s) in host_accum.iter_mut().zip(&r.stats) {
            a.push(s.entropy, s.confidence, s.flags);
        }
        assert_eq!(accum, host_accum, "pos {j}: accumulators");
        let verdict = auto.decide(
            (0..rows).map(|i| (i, &host_accum[i], &r.stats[i])),
            Compression::Nf4,
        );
        let at = format!("{rows} rows, pos {j}");
        let st = r.stop_state.clone().unwrap();
        let kept = j as u32 + verdict.keep as u32;
        for (b, s) in st.iter().enumerate() {
            assert_eq!(s.kept, kept, "{at}: sequence {b}");
            assert_eq!(s.stopped, !verdict.more as u32, "{at}: sequence {b}");
            // The hazard each sequence was weighed with: its own features and calibration.
            let h = r.hazards.as_ref().unwrap()[b * STOP_TIMES + j];
            if verdict.keep {
                let x = hazard::token_features(
                    r.stats[b].entropy,
                    r.stats[b].confidence,
                    &host_accum[b],
                    Compression::Nf4,
                    j,
                );
                let want = stop_rule::hazard(&w, &x.map(|v| v as f32), scales[b]);
                if exact {
                    assert_eq!(h, want, "{at}: sequence {b}");
                } else {
                    assert!(
                        common::close(h as f64, want as f64, 1e-4, 1e-6),
                        "{at}: {h} vs {want}"
                    );
                }
            } else {
                assert!(h.is_nan(), "{at}: a discarded draft's hazard written");
            }
        }
        assert_eq!(r.gammas.as_deref(), Some(&vec![kept as i32; rows][..]));
        let stopped = if verdict.more { 0 } else { rows as u32 };
        assert_eq!(r.stopped_count, Some(stopped), "{at}");
        state = st;
        if !verdict.more {
            return kept;
        }
    }
    panic!("the batch did not stop by γmax {gamma_max}");
}

#[test]
fn the_lockstep_epilogue_decides_as_the_batched_rule() {
    let (vocab, gamma_max) = (2000, 8);
    let mut ends = std::collections::BTreeSet::new();
    for rows in [1, 3, 6, LOCKSTEP_MAX_ROWS] {
        for plan in plans(rows, vocab) {
            let emu = Emulator::new(plan.block);
            let on_emu = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
                emu.softmax_stats_v2_stop(l, o, a, &plan, s).unwrap()
            };
            ends.insert((
                rows,
                step_against_batch_auto(&on_emu, rows, vocab, gamma_max),
            ));
        }
    }
    // The plans agree; and the batch's length moves with how many sequences stay confident.
    let gammas: std::collections::BTreeSet<u32> = ends.iter().map(|e| e.1).collect();
    assert_eq!(
        ends.len(),
        4,
        "one γ per batch size whatever the plan: {ends:?}"
    );
    assert!(gammas.len() >= 3, "{ends:?}");
}

/// Every output of a step's launches on `launch`, position by position, until the batch stops.
fn run(
    launch: Launch<'_>,
    rows: usize,
    vocab: usize,
    lockstep: bool,
    odds: f32,
) -> Vec<StatsV2Output> {
    let w = HazardModel::default_model().unwrap().weights();
    let costs = hazard::OnlineCost::new(CostModel::assumed(), 0.2).step_costs(6);
    let mut state = vec![StopState::START; rows];
    let mut accum = vec![FeatureAccum::EMPTY; rows];
    let mut out = Vec::new();
    for j in 0..6 {
        let x = logits(rows, vocab, j);
        let l = Logits::dense(LogitsData::F32(&x), vocab).unwrap();
        let stop = Stop {
            weights: &w,
            state: &state,
            costs,
            gamma_max: 6,
            compression_code: 0.0,
            odds_scale: odds,
            odds_scales: None,
            lockstep,
        };
        let r = launch(&l, &opts(j), &mut accum, stop);
        state = r.stop_state.clone().unwrap();
        out.push(r);
    }
    out
}

fn same(a: &[StatsV2Output], b: &[StatsV2Output]) {
    assert_eq!(a.len(), b.len());
    for (j, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.accum, y.accum, "pos {j}");
        assert_eq!(x.gammas, y.gammas, "pos {j}");
        assert_eq!(x.stop_state, y.stop_state, "pos {j}");
        assert_eq!(x.stopped_count, y.stopped_count, "pos {j}");
        let bits = |h: &Option<Vec<f32>>| {
            h.as_ref()
                .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(bits(&x.hazards), bits(&y.hazards), "pos {j}");
    }
}

/// The CPU backend (what the C ABI's CPU contexts run) decides as the batched rule fed its own
/// row statistics (its arithmetic is not the kernel's, so its statistics differ in the last
/// bits); a launch after the stop changes nothing but the statistics; a batch of one in lockstep
/// is one sequence alone, bit for bit.
#[test]
fn cpu_backend_and_a_batch_of_one_match_the_lockstep_kernel() {
    let cpu = CpuBackend::new();
    let on_cpu = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        cpu.softmax_stats_stop(l, o, a, s).unwrap()
    };
    for rows in [1, 5, LOCKSTEP_MAX_ROWS] {
        step_against_batch_auto(&on_cpu, rows, 900, 8);
    }
    let (_, plan) = speckv::plan::softmax_stats_v2(5, 900, speckv::stats::Dtype::F32, 3);
    let emu = Emulator::new(plan.block);
    let on_emu = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        emu.softmax_stats_v2_stop(l, o, a, &plan, s).unwrap()
    };
    for odds in [0.5, 1.0, 4.0] {
        for k in [
            run(&on_emu, 5, 900, true, odds),
            run(&on_cpu, 5, 900, true, odds),
        ] {
            // A launch after the stop changes nothing but the statistics.
            let last = k.iter().position(|r| r.stopped_count == Some(5)).unwrap();
            for r in &k[last + 1..] {
                assert_eq!(r.stopped_count, Some(0));
                assert_eq!(r.accum, k[last].accum);
                assert_eq!(r.stop_state, k[last].stop_state);
                assert_eq!(r.gammas, k[last].gammas);
            }
        }
        let (_, one) = speckv::plan::softmax_stats_v2(1, 900, speckv::stats::Dtype::F32, 3);
        let emu1 = Emulator::new(one.block);
        let on_emu1 = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
            emu1.softmax_stats_v2_stop(l, o, a, &one, s).unwrap()
        };
        same(
            &run(&on_emu1, 1, 900, true, odds),
            &run(&on_emu1, 1, 900, false, odds),
        );
    }
}

/// More rows than one decision covers, and states a lockstep launch would not have left (without
/// a reset), are refused on every backend that can see them.
#[test]
fn lockstep_launches_refuse_what_they_cannot_decide() {
    let w = HazardModel::default_model().unwrap().weights();
    let costs = hazard::OnlineCost::new(CostModel::assumed(), 0.2).step_costs(4);
    let cpu = CpuBackend::new();
    let rows = LOCKSTEP_MAX_ROWS + 1;
    let x = logits(rows, 64, 0);
    let l = Logits::dense(LogitsData::F32(&x), 64).unwrap();
    let plan = plan_v2(rows as u32, 64, 4, 1);
    let emu = Emulator::new(plan.block);
    let many = vec![StopState::START; rows];
    let stop = Stop {
        weights: &w,
        state: &many,
        costs,
        gamma_max: 4,
        compression_code: 0.0,
        odds_scale: 1.0,
        odds_scales: None,
        lockstep: true,
    };
    let mut accum = vec![FeatureAccum::EMPTY; rows];
    let e = cpu
        .softmax_stats_stop(&l, &opts(0), &mut accum, stop)
        .unwrap_err();
    assert!(e.to_string().contains("17 sequences in lockstep"), "{e}");
    let e = emu
        .softmax_stats_v2_stop(&l, &opts(0), &mut accum, &plan, stop)
        .unwrap_err();
    assert!(e.to_string().contains("at most 16"), "{e}");
    // Without lockstep the same launch is fine.
    assert!(cpu
        .softmax_stats_stop(
            &l,
            &opts(0),
            &mut accum,
            Stop {
                lockstep: false,
                ..stop
            }
        )
        .is_ok());

    let apart = [
        StopState::START,
        StopState {
            kept: 1,
            ..StopState::START
        },
    ];
    let x2 = logits(2, 64, 1);
    let l2 = Logits::dense(LogitsData::F32(&x2), 64).unwrap();
    let mut accum2 = vec![FeatureAccum::EMPTY; 2];
    let s2 = Stop {
        state: &apart,
        ..stop
    };
    let e = cpu
        .softmax_stats_stop(&l2, &opts(1), &mut accum2, s2)
        .unwrap_err();
    assert!(
        e.to_string().contains("not left by a lockstep launch"),
        "{e}"
    );
    // A reset starts them together whatever they held.
    assert!(cpu
        .softmax_stats_stop(&l2, &opts(0), &mut accum2, s2)
        .is_ok());
}

/// The lockstep epilogue on a CUDA device decides as the batched rule fed the device's own row
/// statistics (the same decisions; hazards to rounding). Skipped without a CUDA device.
#[test]
fn cuda_lockstep_epilogue_decides_as_the_batched_rule() {
    let Some(cuda) = common::cuda() else { return };
    let on_cuda = |l: &Logits<'_>, o: &StatsOptions, a: &mut [FeatureAccum], s: Stop<'_>| {
        cuda.softmax_stats_stop(l, o, a, s).unwrap()
    };
    for rows in [1, 6, LOCKSTEP_MAX_ROWS] {
        step_against(&on_cuda, rows, 32000, 8, false);
    }
}

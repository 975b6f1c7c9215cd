//! Per-token stopping through the C ABI (`speckv_softmax_stats_stop`) on a CPU context, against
//! the kernel itself — `softmax_stats_v2` with its `STATS_STOP` epilogue on the emulator, sanitizer
//! on — fed the same logits: the same decisions, γ_b, stop counts and running expectations at every
//! drafted position. Then the contract an engine relies on (a stopped sequence has nothing written,
//! a step's first draft starts afresh, the counter reaches the batch), the hazard and cost files,
//! and misuse.

use std::ffi::{c_void, CString};
use std::ptr::{null, null_mut};

use speckv::backend::emulate::{Emulator, Stop};
use speckv::controller::hazard::HazardModel;
use speckv::controller::mlp::{Mlp, HIDDEN, INPUTS};
use speckv::stats::{Accumulate, Dtype, Logits, LogitsData, StatsOptions};
use speckv_c::*;
use speckv_kernels::params::{FeatureAccum, RowStats, StepCosts, StopState};

const ROWS: usize = 6;
const V: usize = 1500;
const GMAX: u32 = 7;

mod common;
use common::{cpu, last_error};

/// Drafted position `j`'s logits: sequence b confident for its first b positions, flat after, so
/// the sequences stop at different places. A fixed integer hash, so the C ABI and the emulator
/// read the same values.
fn logits(j: usize) -> Vec<f32> {
    (0..ROWS * V)
        .map(|i| {
            let (b, k) = (i / V, i % V);
            let h = (k as u64 * 2_654_435_761 + (j * 7 + b) as u64 * 40_503) % 10_007;
            let z = h as f32 / 10_007.0 - 0.5;
            let spike = if k == (j * 13 + b) % V { 3.0 } else { 0.0 };
            let scale = if j < b { 4.0 } else { 0.5 };
            scale * (z * 2.0 + spike)
        })
        .collect()
}

fn costs() -> StepCosts {
    let mut c = StepCosts {
        draft: 0.0,
        verify: [0.0; SPECKV_STOP_TIMES],
    };
    // SAFETY: a valid out-pointer; null cost file = the assumed model.
    assert_eq!(
        unsafe { speckv_step_costs(null(), GMAX, &mut c) },
        SpeckvStatus::Ok
    );
    c
}

/// A step's calibration: one odds scale for the batch, or one per sequence
/// (`SpeckvStopArgs.odds_scales`).
#[derive(Clone, Copy, Debug)]
enum Odds {
    One(f32),
    Each([f32; ROWS]),
}

impl Odds {
    /// The emulator's `Stop` fields: the one scale (1 when per sequence) and the per-row ones.
    fn emulated(&self) -> (f32, Option<&[f32]>) {
        match self {
            Odds::One(k) => (*k, None),
            Odds::Each(k) => (1.0, Some(&k[..])),
        }
    }
}

/// One step's buffers on the host.
struct Step {
    accum: Vec<FeatureAccum>,
    out: Vec<RowStats>,
    state: Vec<StopState>,
    gammas: Vec<i32>,
    stopped: u32,
    hazards: Vec<f32>,
    /// `SpeckvStopArgs.lockstep`.
    lockstep: u32,
}

impl Step {
    fn new() -> Step {
        Step {
            accum: vec![FeatureAccum::EMPTY; ROWS],
            out: vec![RowStats::default(); ROWS],
            // Zeroed memory, as a C caller would hand over: the first draft resets it.
            state: vec![
                StopState {
                    survive: 0.0,
                    expected: 0.0,
                    kept: 0,
                    stopped: 0
                };
                ROWS
            ],
            gammas: vec![0; ROWS],
            stopped: 0,
            hazards: vec![f32::NAN; ROWS * SPECKV_STOP_TIMES],
            lockstep: 0,
        }
    }

    /// The statistics' arguments for drafted position `j` of `x` (`ROWS × V`) into these buffers.
    fn args(&mut self, x: &[f32], j: usize, accumulate: u32) -> SpeckvStatsArgs {
        SpeckvStatsArgs {
            logits: x.as_ptr() as *const c_void,
            dtype: SPECKV_DTYPE_F32,
            rows: ROWS as u32,
            vocab: V as u32,
            row_stride: V as u32,
            temperature: 0.0,
            sample: 0,
            seed: 11,
            step: j as u64,
            accumulate,
            accum: self.accum.as_mut_ptr(),
            out: self.out.as_mut_ptr(),
        }
    }

    /// The rule's arguments into these buffers (the counter and the hazards included); per-sequence
    /// scales are read from `odds`, which must outlive the call.
    fn stop_args(&mut self, odds: &Odds) -> SpeckvStopArgs {
        let (odds_scale, odds_scales) = match odds {
            Odds::One(k) => (*k, null()),
            // A zero the call must not read: the per-sequence scales take its place.
            Odds::Each(k) => (0.0, k.as_ptr()),
        };
        SpeckvStopArgs {
            state: self.state.as_mut_ptr(),
            gammas_out: self.gammas.as_mut_ptr(),
            stopped_count: &mut self.stopped,
            hazards_out: self.hazards.as_mut_ptr(),
            costs: costs(),
            gamma_max: GMAX,
            compression_code: 1.0,
            odds_scale,
            lockstep: self.lockstep,
            odds_scales,
        }
    }

    /// Draft position `j` through the C ABI.
    fn draft(&mut self, ctx: *mut SpeckvContext, x: &[f32], j: usize, odds: &Odds) -> SpeckvStatus {
        let mode = if j == 0 {
            SPECKV_ACCUMULATE_RESET
        } else {
            SPECKV_ACCUMULATE_ADD
        };
        let (args, stop) = (self.args(x, j, mode), self.stop_args(odds));
        // SAFETY: every buffer holds `ROWS` entries (the logits `ROWS × V`).
        unsafe { speckv_softmax_stats_stop(ctx, &args, &stop) }
    }
}

#[test]
fn the_c_abi_stops_as_the_kernel_epilogue_does() {
    let outcomes: std::collections::BTreeSet<i32> =
        stops_as_the_kernel(false).into_iter().flatten().collect();
    // Confident then flat drafts: the sequences stop at several places.
    assert!(
        outcomes.len() >= 3 && outcomes.iter().any(|&g| g > 1 && g < GMAX as i32),
        "{outcomes:?}"
    );
}

/// In lockstep the batch decides together: the C ABI as the kernel's lockstep epilogue, and every
/// sequence ends its step with the same γ — one that stops short of γmax for some calibration, as
/// the flat drafts of the later positions weigh on the sum.
#[test]
fn the_c_abi_stops_in_lockstep_as_the_kernel_epilogue_does() {
    let ends = stops_as_the_kernel(true);
    for g in &ends {
        assert!(g.iter().all(|&x| x == g[0]), "{g:?}");
    }
    assert!(ends.iter().any(|g| g[0] < GMAX as i32), "{ends:?}");
}

/// The calibrations [`stops_as_the_kernel`] runs: three scales for the batch, then one per
/// sequence.
const CALIBRATIONS: [Odds; 4] = [
    Odds::One(1.0),
    Odds::One(0.6),
    Odds::One(1.7),
    Odds::Each([0.3, 4.0, 1.0, 0.6, 2.5, 1.7]),
];

/// Sequences decide alone: with one odds scale each, every sequence decides as it would in a batch
/// at its own scale, draft by draft; and the scales matter (the expectations the rule weighed
/// differ from those at the batch's scale of 1).
#[test]
fn each_sequence_decides_at_its_own_odds_scale() {
    let ctx = cpu();
    // SAFETY: a live context; null loads the shipped model.
    assert_eq!(unsafe { speckv_load_hazard(ctx, null()) }, SpeckvStatus::Ok);
    let Odds::Each(scales) = CALIBRATIONS[3] else {
        unreachable!()
    };
    let step = |odds: &Odds| -> Vec<(Vec<StopState>, Vec<i32>)> {
        let mut c = Step::new();
        (0..GMAX as usize)
            .map(|j| {
                assert_eq!(
                    c.draft(ctx, &logits(j), j, odds),
                    SpeckvStatus::Ok,
                    "{}",
                    last_error()
                );
                (c.state.clone(), c.gammas.clone())
            })
            .collect()
    };
    let each = step(&CALIBRATIONS[3]);
    for (b, &k) in scales.iter().enumerate() {
        let alone = step(&Odds::One(k));
        for (j, (e, a)) in each.iter().zip(&alone).enumerate() {
            assert_eq!(e.0[b], a.0[b], "sequence {b} at scale {k}, position {j}");
            assert_eq!(e.1[b], a.1[b], "sequence {b} at scale {k}, position {j}");
        }
    }
    let one = step(&Odds::One(1.0));
    let last = GMAX as usize - 1;
    let expected = |s: &[StopState]| s.iter().map(|x| x.expected).collect::<Vec<_>>();
    assert_ne!(
        expected(&each[last].0),
        expected(&one[last].0),
        "the scales changed nothing the rule weighed"
    );
    // SAFETY: created above, destroyed once.
    unsafe { speckv_context_destroy(ctx) };
}

/// One step per calibration through the C ABI on a CPU context (`lockstep` as asked), checked at
/// every position against `softmax_stats_v2` with `STATS_STOP` on the emulator; returns each
/// step's final γ_b.
fn stops_as_the_kernel(lockstep: bool) -> Vec<Vec<i32>> {
    let ctx = cpu();
    let w = HazardModel::default_model().unwrap().weights();
    let emu = Emulator::new(256);
    let (_, plan) = speckv::plan::softmax_stats_v2(ROWS as u32, V as u32, Dtype::F32, 7);
    let mut outcomes = Vec::new();
    // SAFETY: a live context; null loads the shipped model.
    assert_eq!(unsafe { speckv_load_hazard(ctx, null()) }, SpeckvStatus::Ok);
    for odds in &CALIBRATIONS {
        let mut c = Step {
            lockstep: lockstep as u32,
            ..Step::new()
        };
        let mut emu_accum = vec![FeatureAccum::EMPTY; ROWS];
        let mut emu_state = vec![StopState::START; ROWS];
        for j in 0..GMAX as usize {
            let x = logits(j);
            let before = (c.accum.clone(), c.state.clone());
            let was_stopped: Vec<bool> = c.state.iter().map(|s| j > 0 && s.stopped != 0).collect();
            // A sentinel where nothing may be written: the γ_b of stopped sequences (put back
            // after the check).
            let kept = c.gammas.clone();
            for (g, &done) in c.gammas.iter_mut().zip(&was_stopped) {
                if done {
                    *g = -7;
                }
            }
            let count_before = c.stopped;
            // Where this position's hazards go: a sentinel that stays unless a draft is kept.
            for b in 0..ROWS {
                c.hazards[b * SPECKV_STOP_TIMES + j] = -1.0;
            }
            assert_eq!(
                c.draft(ctx, &x, j, odds),
                SpeckvStatus::Ok,
                "{}",
                last_error()
            );
            let opts = StatsOptions {
                temperature: 0.0,
                sample: false,
                seed: 11,
                step: j as u64,
                accumulate: if j == 0 {
                    Accumulate::Reset
                } else {
                    Accumulate::Add
                },
            };
            let l = Logits::dense(LogitsData::F32(&x), V).unwrap();
            let (odds_scale, odds_scales) = odds.emulated();
            let stop = Stop {
                weights: &w,
                state: &emu_state,
                costs: costs(),
                gamma_max: GMAX,
                compression_code: 1.0,
                odds_scale,
                odds_scales,
                lockstep,
            };
            let r = emu
                .softmax_stats_v2_stop(&l, &opts, &mut emu_accum, &plan, stop)
                .unwrap();
            let (st, g) = (r.stop_state.unwrap(), r.gammas.unwrap());
            for b in 0..ROWS {
                let at = format!("odds {odds:?}, position {j}, sequence {b}");
                if was_stopped[b] {
                    assert_eq!(c.gammas[b], -7, "{at}: γ_b written after the stop");
                    c.gammas[b] = kept[b];
                    assert_eq!(c.state[b], before.1[b], "{at}");
                    assert_eq!(
                        bytemuck::bytes_of(&c.accum[b]),
                        bytemuck::bytes_of(&before.0[b]),
                        "{at}"
                    );
                    continue;
                }
                let (k, e) = (c.state[b], st[b]);
                assert_eq!((k.kept, k.stopped), (e.kept, e.stopped), "{at}");
                assert!(
                    (k.expected - e.expected).abs() <= 1e-5 * e.expected.abs().max(1.0),
                    "{at}: {} vs {}",
                    k.expected,
                    e.expected
                );
                assert_eq!(c.gammas[b], g[b], "{at}");
                let (h, e) = (
                    c.hazards[b * SPECKV_STOP_TIMES + j],
                    r.hazards.as_ref().unwrap()[b * SPECKV_STOP_TIMES + j],
                );
                if e.is_nan() {
                    assert_eq!(h, -1.0, "{at}: a discarded draft's hazard written");
                } else {
                    assert!(
                        (h - e).abs() <= 1e-4,
                        "{at}: hazard {h} vs the kernel's {e}"
                    );
                }
                assert_eq!(c.accum[b].count, emu_accum[b].count, "{at}");
                assert_eq!(c.out[b].argmax, r.stats[b].argmax, "{at}");
            }
            assert_eq!(
                c.stopped - count_before,
                r.stopped_count.unwrap(),
                "odds {odds:?}, position {j}: sequences stopped"
            );
            emu_state = st;
        }
        // Every sequence has stopped once, by γmax at the latest.
        assert!(c.state.iter().all(|s| s.stopped == 1), "{:?}", c.state);
        assert_eq!(c.stopped, ROWS as u32);
        assert!(c.gammas.iter().all(|&g| (0..=GMAX as i32).contains(&g)));
        outcomes.push(c.gammas.clone());

        // The next step's first draft starts afresh whatever the states hold.
        let x = logits(0);
        c.stopped = 0;
        assert_eq!(c.draft(ctx, &x, 0, odds), SpeckvStatus::Ok);
        assert!(c.state.iter().all(|s| s.kept <= 1), "{:?}", c.state);
        assert_eq!(
            c.stopped,
            c.state.iter().map(|s| s.stopped).sum::<u32>(),
            "the counter counts this call's stops"
        );
    }
    // SAFETY: created above, destroyed once.
    unsafe { speckv_context_destroy(ctx) };
    outcomes
}

/// A hazard model whose prediction is `h` whatever the features, as a file.
fn constant_hazard_file(h: f64, name: &str) -> CString {
    let m = HazardModel {
        mlp: Mlp {
            w1: [[0.0; HIDDEN]; INPUTS],
            b1: [0.0; HIDDEN],
            w2: [[0.0]; HIDDEN],
            b2: [h],
            feature_mean: [0.0; INPUTS],
            feature_std: [1.0; INPUTS],
        },
        source: "test".into(),
    };
    let p = std::env::temp_dir().join(format!("speckv-capi-{}-{name}.json", std::process::id()));
    m.save(&p).unwrap();
    CString::new(p.to_str().unwrap()).unwrap()
}

#[test]
fn a_hazard_file_is_what_the_rule_runs() {
    let ctx = cpu();
    let run = |path: &CString| -> Vec<i32> {
        // SAFETY: a live context and a NUL-terminated path.
        assert_eq!(
            unsafe { speckv_load_hazard(ctx, path.as_ptr()) },
            SpeckvStatus::Ok,
            "{}",
            last_error()
        );
        let mut c = Step::new();
        for j in 0..GMAX as usize {
            assert_eq!(
                c.draft(ctx, &logits(j), j, &Odds::One(1.0)),
                SpeckvStatus::Ok
            );
        }
        assert_eq!(c.stopped, ROWS as u32);
        c.gammas
    };
    // Every draft accepted: each sequence drafts to γmax; none: each discards its first draft.
    assert_eq!(
        run(&constant_hazard_file(0.999, "accept")),
        vec![GMAX as i32; ROWS]
    );
    assert_eq!(run(&constant_hazard_file(0.001, "reject")), vec![0; ROWS]);
    // SAFETY: created above, destroyed once.
    unsafe { speckv_context_destroy(ctx) };
}

#[test]
fn step_costs_come_from_a_cost_model_file() {
    let p = std::env::temp_dir().join(format!("speckv-capi-{}-cost.json", std::process::id()));
    std::fs::write(
        &p,
        r#"{"draft_ms_per_token": 2.5, "verify_ms": [10.0, 11.0, 12.5], "source": "test"}"#,
    )
    .unwrap();
    let path = CString::new(p.to_str().unwrap()).unwrap();
    let mut c = StepCosts {
        draft: 0.0,
        verify: [0.0; SPECKV_STOP_TIMES],
    };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    unsafe {
        assert_eq!(
            speckv_step_costs(path.as_ptr(), 5, &mut c),
            SpeckvStatus::Ok
        );
        assert_eq!(c.draft, 2.5);
        // Measured up to γ = 2, then on the line through the last two; +inf past γmax.
        assert_eq!(&c.verify[..6], &[10.0, 11.0, 12.5, 14.0, 15.5, 17.0]);
        assert!(c.verify[6..].iter().all(|v| *v == f32::INFINITY));

        let missing = CString::new("/nonexistent/cost.json").unwrap();
        assert_eq!(
            speckv_step_costs(missing.as_ptr(), 5, &mut c),
            SpeckvStatus::Io
        );
        assert_eq!(
            speckv_step_costs(null(), 16, &mut c),
            SpeckvStatus::InvalidArgument
        );
        assert!(last_error().contains("gamma_max"), "{}", last_error());
        assert_eq!(
            speckv_step_costs(null(), 0, &mut c),
            SpeckvStatus::InvalidArgument
        );
        assert_eq!(
            speckv_step_costs(null(), 5, null_mut()),
            SpeckvStatus::NullPointer
        );
    }
}

#[test]
fn stop_misuse_is_reported() {
    let ctx = cpu();
    let x = logits(0);
    // SAFETY (every call below): buffers of the stated shapes or deliberately null/bad values.
    unsafe {
        let mut c = Step::new();
        assert_eq!(
            c.draft(ctx, &x, 0, &Odds::One(1.0)),
            SpeckvStatus::NoHazardModel
        );
        assert!(
            last_error().contains("speckv_load_hazard"),
            "{}",
            last_error()
        );

        let bad = std::env::temp_dir().join(format!("speckv-capi-{}-bad.json", std::process::id()));
        std::fs::write(&bad, "{\"mlp\": 3}").unwrap();
        let bad = CString::new(bad.to_str().unwrap()).unwrap();
        assert_eq!(speckv_load_hazard(ctx, bad.as_ptr()), SpeckvStatus::Io);
        assert_eq!(
            speckv_load_hazard(null_mut(), null()),
            SpeckvStatus::NullPointer
        );
        assert_eq!(speckv_load_hazard(ctx, null()), SpeckvStatus::Ok);
        assert_eq!(c.draft(ctx, &x, 0, &Odds::One(1.0)), SpeckvStatus::Ok);

        let a = c.args(&x, 0, SPECKV_ACCUMULATE_RESET);
        let g = SpeckvStopArgs {
            stopped_count: null_mut(),
            hazards_out: null_mut(),
            compression_code: 2.0,
            ..c.stop_args(&Odds::One(1.0))
        };
        assert_eq!(speckv_softmax_stats_stop(ctx, &a, &g), SpeckvStatus::Ok);
        assert_eq!(
            speckv_softmax_stats_stop(ctx, &a, null()),
            SpeckvStatus::NullPointer
        );
        assert_eq!(
            speckv_softmax_stats_stop(null(), &a, &g),
            SpeckvStatus::NullPointer
        );

        let no_accum = c.args(&x, 0, SPECKV_ACCUMULATE_NO);
        assert_eq!(
            speckv_softmax_stats_stop(ctx, &no_accum, &g),
            SpeckvStatus::InvalidArgument
        );
        assert!(last_error().contains("accumulators"), "{}", last_error());

        let cases: Vec<(&str, SpeckvStopArgs, SpeckvStatus)> = vec![
            (
                "state",
                SpeckvStopArgs {
                    state: null_mut(),
                    ..g
                },
                SpeckvStatus::NullPointer,
            ),
            (
                "gammas_out",
                SpeckvStopArgs {
                    gammas_out: null_mut(),
                    ..g
                },
                SpeckvStatus::NullPointer,
            ),
            (
                "stop.state",
                SpeckvStopArgs {
                    state: (g.state as *mut u8).add(2) as *mut StopState,
                    ..g
                },
                SpeckvStatus::Misaligned,
            ),
            (
                "gamma_max",
                SpeckvStopArgs { gamma_max: 0, ..g },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "gamma_max",
                SpeckvStopArgs { gamma_max: 16, ..g },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "odds_scale",
                SpeckvStopArgs {
                    odds_scale: 0.0,
                    ..g
                },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "odds_scale",
                SpeckvStopArgs {
                    odds_scale: f32::NAN,
                    ..g
                },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "compression_code",
                SpeckvStopArgs {
                    compression_code: f32::INFINITY,
                    ..g
                },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "costs.draft",
                SpeckvStopArgs {
                    costs: StepCosts {
                        draft: -1.0,
                        ..g.costs
                    },
                    ..g
                },
                SpeckvStatus::InvalidArgument,
            ),
            (
                "stop.lockstep",
                SpeckvStopArgs { lockstep: 2, ..g },
                SpeckvStatus::InvalidArgument,
            ),
        ];
        for (what, s, want) in cases {
            assert_eq!(speckv_softmax_stats_stop(ctx, &a, &s), want, "{what}");
            assert!(last_error().contains(what), "{what}: {}", last_error());
        }
        // A verification cost the rule would weigh must be a time; those past γmax are unused.
        for (g_at, v, want) in [
            (3, f32::NAN, SpeckvStatus::InvalidArgument),
            (GMAX as usize, 0.0, SpeckvStatus::InvalidArgument),
            (GMAX as usize + 1, f32::NAN, SpeckvStatus::Ok),
        ] {
            let mut s = g;
            s.costs.verify[g_at] = v;
            assert_eq!(
                speckv_softmax_stats_stop(ctx, &a, &s),
                want,
                "verify[{g_at}]"
            );
            if want != SpeckvStatus::Ok {
                assert!(
                    last_error().contains(&format!("verify[{g_at}]")),
                    "{}",
                    last_error()
                );
            }
        }
        // Per-sequence scales: a zero `odds_scale` is then unread, but each scale is checked.
        let mut scales = [1.0f32; ROWS];
        let each = SpeckvStopArgs {
            odds_scale: 0.0,
            odds_scales: scales.as_ptr(),
            ..g
        };
        assert_eq!(speckv_softmax_stats_stop(ctx, &a, &each), SpeckvStatus::Ok);
        scales[4] = -2.0;
        assert_eq!(
            speckv_softmax_stats_stop(ctx, &a, &each),
            SpeckvStatus::InvalidArgument
        );
        assert!(
            last_error().contains("sequence 4's odds scale"),
            "{}",
            last_error()
        );
        let skewed = SpeckvStopArgs {
            odds_scales: (scales.as_ptr() as *const u8).add(1) as *const f32,
            ..g
        };
        assert_eq!(
            speckv_softmax_stats_stop(ctx, &a, &skewed),
            SpeckvStatus::Misaligned
        );
        assert!(
            last_error().contains("stop.odds_scales"),
            "{}",
            last_error()
        );
        // In lockstep: states no lockstep launch would leave (sequences at different drafts) are
        // refused on a later draft, and accepted on a step's first (RESET starts them together).
        let lock = SpeckvStopArgs { lockstep: 1, ..g };
        c.state[0].kept = 1;
        let add = c.args(&x, 1, SPECKV_ACCUMULATE_ADD);
        assert_eq!(
            speckv_softmax_stats_stop(ctx, &add, &lock),
            SpeckvStatus::InvalidArgument
        );
        assert!(last_error().contains("lockstep"), "{}", last_error());
        assert_eq!(speckv_softmax_stats_stop(ctx, &a, &lock), SpeckvStatus::Ok);
        assert!(c.state.iter().all(|s| s.kept == c.state[0].kept));
        speckv_context_destroy(ctx);
    }
}

#[test]
fn calibration_moves_the_odds_by_the_verified_outcomes() {
    let mut h = [f32::NAN; 2 * SPECKV_STOP_TIMES];
    h[..3].copy_from_slice(&[0.9, 0.6, 0.5]);
    h[SPECKV_STOP_TIMES..SPECKV_STOP_TIMES + 2].copy_from_slice(&[0.5, 0.5]);
    let gammas = [3i32, 2];
    let accepted = [1i32, 2];
    let mut k = 1.0f32;
    // SAFETY (every call): host buffers of the stated shapes or deliberately bad values.
    unsafe {
        assert_eq!(
            speckv_calibrate(&mut k, h.as_ptr(), gammas.as_ptr(), accepted.as_ptr(), 2),
            SpeckvStatus::Ok
        );
        // Sequence 0: draft 0 accepted (+0.1·(1 − 0.9)), draft 1 rejected (−0.1·0.6), draft 2
        // not an outcome; sequence 1: both accepted (+0.1·0.5 twice): log k = 0.05.
        assert!((k - 0.05f32.exp()).abs() < 1e-6, "{k}");
        // Every draft accepted at a hazard of 0.001, again and again: the scale stops at e³.
        let low = [0.001f32; SPECKV_STOP_TIMES];
        let mut big = 1.0f32;
        for _ in 0..100 {
            let g = [15i32];
            assert_eq!(
                speckv_calibrate(&mut big, low.as_ptr(), g.as_ptr(), g.as_ptr(), 1),
                SpeckvStatus::Ok
            );
        }
        assert!((big - 3f32.exp()).abs() < 1e-3, "{big}");
        for (g, a, want) in [
            ([3i32, 2], [4i32, 0], "accepted 4"),
            ([16, 2], [0, 0], "gamma 16"),
            ([-1, 2], [0, 0], "gamma -1"),
        ] {
            assert_eq!(
                speckv_calibrate(&mut k, h.as_ptr(), g.as_ptr(), a.as_ptr(), 2),
                SpeckvStatus::InvalidArgument
            );
            assert!(last_error().contains(want), "{}", last_error());
        }
        let mut zero = 0.0f32;
        assert_eq!(
            speckv_calibrate(&mut zero, h.as_ptr(), gammas.as_ptr(), accepted.as_ptr(), 2),
            SpeckvStatus::InvalidArgument
        );
        assert_eq!(
            speckv_calibrate(&mut k, null(), gammas.as_ptr(), accepted.as_ptr(), 2),
            SpeckvStatus::NullPointer
        );
    }
}

/// Each sequence's scale moves by its own verified drafts only — as `speckv_calibrate` over that
/// sequence alone — and nothing is written unless every input is valid.
#[test]
fn calibration_each_moves_every_sequence_by_its_own_drafts() {
    let mut h = [f32::NAN; 3 * SPECKV_STOP_TIMES];
    h[..3].copy_from_slice(&[0.9, 0.6, 0.5]);
    h[SPECKV_STOP_TIMES..SPECKV_STOP_TIMES + 2].copy_from_slice(&[0.5, 0.5]);
    h[2 * SPECKV_STOP_TIMES] = 0.3;
    let gammas = [3i32, 2, 1];
    let accepted = [1i32, 2, 0];
    let start = [1.0f32, 0.5, 3.0];
    let mut k = start;
    // SAFETY (every call): host buffers of the stated shapes or deliberately bad values.
    unsafe {
        assert_eq!(
            speckv_calibrate_each(
                k.as_mut_ptr(),
                h.as_ptr(),
                gammas.as_ptr(),
                accepted.as_ptr(),
                3
            ),
            SpeckvStatus::Ok,
            "{}",
            last_error()
        );
        for b in 0..3 {
            let mut alone = start[b];
            let row = &h[b * SPECKV_STOP_TIMES..];
            assert_eq!(
                speckv_calibrate(&mut alone, row.as_ptr(), &gammas[b], &accepted[b], 1),
                SpeckvStatus::Ok
            );
            assert_eq!(k[b].to_bits(), alone.to_bits(), "sequence {b}");
            assert_ne!(k[b], start[b], "sequence {b} did not move");
        }
        // Sequence 1's outcomes only (both drafts accepted at 0.5): log k grows by 0.1.
        assert!((k[1] - 0.5 * 0.1f32.exp()).abs() < 1e-6, "{}", k[1]);

        let before = k;
        let mut bad = k;
        bad[2] = f32::NAN;
        assert_eq!(
            speckv_calibrate_each(
                bad.as_mut_ptr(),
                h.as_ptr(),
                gammas.as_ptr(),
                accepted.as_ptr(),
                3
            ),
            SpeckvStatus::InvalidArgument
        );
        assert!(last_error().contains("odds_scales[2]"), "{}", last_error());
        assert_eq!(&bad[..2], &before[..2], "written despite the error");
        assert_eq!(
            speckv_calibrate_each(
                k.as_mut_ptr(),
                h.as_ptr(),
                gammas.as_ptr(),
                [0i32, 3, 0].as_ptr(),
                3
            ),
            SpeckvStatus::InvalidArgument
        );
        assert!(last_error().contains("accepted 3"), "{}", last_error());
        assert_eq!(k, before, "written despite the error");
        assert_eq!(
            speckv_calibrate_each(
                null_mut(),
                h.as_ptr(),
                gammas.as_ptr(),
                accepted.as_ptr(),
                3
            ),
            SpeckvStatus::NullPointer
        );
    }
}

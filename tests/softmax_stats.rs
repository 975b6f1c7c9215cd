//! `softmax_stats`: the kernel's own source on the emulator, the CPU backend and (when present)
//! the CUDA backend, each against a plain float64 reference written independently of the kernel
//! (direct softmax, then entropy as −Σ p ln p). One test body per behaviour, expanded per backend.

mod common;

use half::{bf16, f16};
use speckv::backend::cpu::CpuBackend;
use speckv::{
    philox, Accumulate, Dtype, Error, FeatureAccum, Logits, LogitsData, RowStats, StatsOptions,
    ROW_ALL_MASKED, ROW_NONFINITE,
};

// ---------------------------------------------------------------------------------------------
// float64 reference

#[derive(Debug)]
struct Ref {
    max_logit: f64,
    lse: f64,
    entropy: f64,
    confidence: f64,
    argmax: i32,
    flags: u32,
}

fn reference_row(x: &[f32], temperature: f32) -> Ref {
    if x.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
        return Ref {
            max_logit: f64::NAN,
            lse: f64::NAN,
            entropy: f64::NAN,
            confidence: f64::NAN,
            argmax: -1,
            flags: ROW_NONFINITE,
        };
    }
    if x.iter().all(|v| *v == f32::NEG_INFINITY) {
        return Ref {
            max_logit: f64::NAN,
            lse: f64::NAN,
            entropy: f64::NAN,
            confidence: f64::NAN,
            argmax: -1,
            flags: ROW_ALL_MASKED,
        };
    }
    let t = if temperature == 0.0 {
        1.0
    } else {
        temperature as f64
    };
    let mut argmax = 0usize;
    for (i, v) in x.iter().enumerate() {
        if *v > x[argmax] {
            argmax = i;
        }
    }
    let z: Vec<f64> = x.iter().map(|v| *v as f64 / t).collect();
    let m = z[argmax];
    let s: f64 = z.iter().map(|zi| (zi - m).exp()).sum();
    let lse = m + s.ln();
    let mut entropy = 0.0;
    let mut confidence: f64 = 0.0;
    for zi in &z {
        let p = (zi - lse).exp();
        if p > 0.0 {
            entropy -= p * p.ln();
        }
        confidence = confidence.max(p);
    }
    Ref {
        max_logit: x[argmax] as f64,
        lse,
        entropy,
        confidence,
        argmax: argmax as i32,
        flags: 0,
    }
}

/// The token the kernels must sample: Gumbel-max replayed from the same Philox words, with the
/// same f32 operations (randomness is an input, so this is exact, not statistical).
fn replay_sample(x: &[f32], temperature: f32, seed: u64, step: u64, row: u32) -> i32 {
    let inv_t = 1.0f32 / temperature;
    let mut best = (f32::NEG_INFINITY, -1i32);
    for (i, &v) in x.iter().enumerate() {
        if v == f32::NEG_INFINITY {
            continue;
        }
        let g = philox::gumbel(philox::uniform_open(philox::bits(
            seed, i as u32, row, step,
        )));
        let k = v * inv_t + g;
        if k > best.0 {
            best = (k, i as i32);
        }
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// inputs in every dtype

struct Input {
    f32s: Vec<f32>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
}

impl Input {
    fn new(values: Vec<f32>) -> Input {
        Input {
            f16s: values.iter().map(|&v| f16::from_f32(v)).collect(),
            bf16s: values.iter().map(|&v| bf16::from_f32(v)).collect(),
            f32s: values,
        }
    }
    fn data(&self, dtype: Dtype) -> LogitsData<'_> {
        match dtype {
            Dtype::F32 => LogitsData::F32(&self.f32s),
            Dtype::F16 => LogitsData::F16(&self.f16s),
            Dtype::Bf16 => LogitsData::Bf16(&self.bf16s),
        }
    }
    /// Elements `from..from + n` in `dtype`.
    fn part(&self, dtype: Dtype, from: usize, n: usize) -> LogitsData<'_> {
        match dtype {
            Dtype::F32 => LogitsData::F32(&self.f32s[from..from + n]),
            Dtype::F16 => LogitsData::F16(&self.f16s[from..from + n]),
            Dtype::Bf16 => LogitsData::Bf16(&self.bf16s[from..from + n]),
        }
    }
    /// The values as the kernel sees them in `dtype`.
    fn seen(&self, dtype: Dtype) -> Vec<f32> {
        let d = self.data(dtype);
        (0..d.len()).map(|i| d.get(i)).collect()
    }
}

type Run<'a> = &'a dyn Fn(
    &Logits<'_>,
    &StatsOptions,
    Option<&mut [FeatureAccum]>,
) -> speckv::Result<Vec<RowStats>>;

/// Runs one case and checks every row against the reference.
#[allow(clippy::too_many_arguments)]
fn check_case(
    run: Run<'_>,
    input: &Input,
    dtype: Dtype,
    rows: usize,
    vocab: usize,
    stride: usize,
    opts: &StatsOptions,
    label: &str,
) {
    let logits = Logits::new(input.data(dtype), rows, vocab, stride).unwrap();
    let out = run(&logits, opts, None).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(out.len(), rows, "{label}");
    let seen = input.seen(dtype);
    for (r, got) in out.iter().enumerate() {
        let x = &seen[r * stride..r * stride + vocab];
        let ctx = format!("{label} {dtype:?} row {r} rows {rows} vocab {vocab}");
        check_row(got, x, opts, r as u32, &ctx);
    }
}

/// One row's statistics against the float64 reference of its logits `x` (as the kernel saw them)
/// and, when sampled, the token replayed from Philox stream `stream`.
fn check_row(got: &RowStats, x: &[f32], opts: &StatsOptions, stream: u32, label: &str) {
    let want = reference_row(x, opts.temperature);
    let ctx = format!("{label} T {}: got {got:?} want {want:?}", opts.temperature);
    assert_eq!(got.flags, want.flags, "{ctx}");
    assert_eq!(got.argmax, want.argmax, "{ctx}");
    if want.flags != 0 {
        assert!(
            got.entropy.is_nan() && got.confidence.is_nan() && got.lse.is_nan(),
            "{ctx}"
        );
        assert_eq!(got.sampled, -1, "{ctx}");
        return;
    }
    assert_eq!(got.max_logit as f64, want.max_logit, "{ctx}");
    assert!(
        common::close(got.lse as f64, want.lse, 1e-5, 1e-6),
        "lse {ctx}"
    );
    assert!(
        common::close(got.entropy as f64, want.entropy, 1e-5, 1e-6),
        "entropy {ctx}"
    );
    assert!(
        common::close(got.confidence as f64, want.confidence, 1e-5, 1e-6),
        "confidence {ctx}"
    );
    if opts.temperature == 0.0 {
        assert_eq!(got.sampled, got.argmax, "greedy samples the argmax: {ctx}");
        assert_eq!(got.sampled_prob, got.confidence, "{ctx}");
    } else if opts.sample {
        let want_tok = replay_sample(x, opts.temperature, opts.seed, opts.step, stream);
        assert_eq!(got.sampled, want_tok, "sampled token {ctx}");
        let z = x[want_tok as usize] as f64 / opts.temperature as f64;
        let p = (z - want.lse).exp();
        assert!(
            common::close(got.sampled_prob as f64, p, 1e-5, 1e-7),
            "sampled_prob {ctx}"
        );
    } else {
        assert_eq!(got.sampled, -1, "{ctx}");
    }
}

/// One test body per behaviour, expanded for the emulator (the kernel's own source), the CPU
/// backend and the CUDA backend (skipped with a message where no GPU is present).
macro_rules! per_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn emulator() {
                let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                    speckv::backend::emulate::softmax_stats(l, o, a, 256)
                };
                ($body)(&run, "emulator");
            }
            /// v2 (rows split across blocks) on a 7-SM plan, so short rows split too.
            #[test]
            fn emulator_v2() {
                let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                    speckv::backend::emulate::Emulator::new(32)
                        .softmax_stats_v2(l, o, a, 7, None)
                        .map(|r| r.stats)
                };
                ($body)(&run, "emulator_v2");
            }
            #[test]
            fn cpu() {
                let b = CpuBackend::new();
                let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                    b.softmax_stats(l, o, a)
                };
                ($body)(&run, "cpu");
            }
            #[test]
            fn cuda() {
                let Some(c) = common::cuda() else { return };
                let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                    c.softmax_stats(l, o, a)
                };
                ($body)(&run, "cuda");
            }
            /// v1, the oracle kernel, on the device too.
            #[test]
            fn cuda_v1() {
                let Some(c) = common::cuda() else { return };
                let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                    c.softmax_stats_v1(l, o, a)
                };
                ($body)(&run, "cuda_v1");
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// behaviours

per_backend!(awkward_shapes, |run: Run<'_>, label: &str| {
    // (rows, vocab, dtypes)
    let cases: &[(usize, usize, &[Dtype])] = &[
        (1, 1, &Dtype::ALL),
        (3, 31, &Dtype::ALL),
        (3, 32, &Dtype::ALL),
        (3, 33, &Dtype::ALL),
        (64, 1000, &[Dtype::F32, Dtype::F16]),
        (3, 50257, &Dtype::ALL),
        (1, 128256, &[Dtype::F32, Dtype::Bf16]),
        (3, 128256, &[Dtype::F16]),
    ];
    for (k, &(rows, vocab, dtypes)) in cases.iter().enumerate() {
        let input = Input::new(common::normal_logits(rows * vocab, 3.0, 100 + k as u64));
        for &dtype in dtypes {
            for t in [1.0f32, 0.7] {
                let opts = StatsOptions {
                    temperature: t,
                    ..Default::default()
                };
                check_case(run, &input, dtype, rows, vocab, vocab, &opts, label);
            }
        }
    }
});

per_backend!(
    greedy_reports_softmax_at_t1_and_samples_the_argmax,
    |run: Run<'_>, label: &str| {
        let (rows, vocab) = (3, 1000);
        let input = Input::new(common::normal_logits(rows * vocab, 2.0, 7));
        let opts = StatsOptions {
            temperature: 0.0,
            sample: true,
            seed: 9,
            ..Default::default()
        };
        check_case(run, &input, Dtype::F32, rows, vocab, vocab, &opts, label);
    }
);

per_backend!(
    sampled_tokens_replay_exactly,
    |run: Run<'_>, label: &str| {
        for (k, &(rows, vocab)) in [(3usize, 5usize), (3, 1000), (2, 50257)].iter().enumerate() {
            let input = Input::new(common::normal_logits(rows * vocab, 2.5, 300 + k as u64));
            for (t, seed, step) in [
                (1.0f32, 1u64, 0u64),
                (0.7, 42, 17),
                (1.3, u64::MAX, 1 << 40),
            ] {
                let opts = StatsOptions {
                    temperature: t,
                    sample: true,
                    seed,
                    step,
                    ..Default::default()
                };
                check_case(run, &input, Dtype::F32, rows, vocab, vocab, &opts, label);
                check_case(run, &input, Dtype::Bf16, rows, vocab, vocab, &opts, label);
            }
        }
    }
);

per_backend!(ties_go_to_the_lowest_index, |run: Run<'_>, label: &str| {
    let (rows, vocab) = (5, 777);
    let mut v = common::grid_logits(rows * vocab, 11);
    // Row 4: the maximum appears three times.
    for i in 0..vocab {
        v[4 * vocab + i] = -1.0;
    }
    for i in [600, 123, 700] {
        v[4 * vocab + i] = 3.5;
    }
    let input = Input::new(v);
    let opts = StatsOptions::default();
    let mut by_dtype = Vec::new();
    for dtype in Dtype::ALL {
        check_case(run, &input, dtype, rows, vocab, vocab, &opts, label);
        let l = Logits::dense(input.data(dtype), vocab).unwrap();
        by_dtype.push(run(&l, &opts, None).unwrap());
    }
    assert_eq!(by_dtype[0][4].argmax, 123);
    // The grid is exact in every dtype: the same argmax everywhere.
    let argmaxes = |d: &Vec<RowStats>| d.iter().map(|r| r.argmax).collect::<Vec<_>>();
    assert_eq!(argmaxes(&by_dtype[0]), argmaxes(&by_dtype[1]));
    assert_eq!(argmaxes(&by_dtype[0]), argmaxes(&by_dtype[2]));
    assert_eq!(by_dtype[0].len(), rows);
});

per_backend!(degenerate_rows, |run: Run<'_>, label: &str| {
    let vocab = 300;
    let mut v = vec![0.0f32; 4 * vocab];
    // row 0: uniform; row 1: one-hot (one huge logit); row 2: two equal peaks; row 3: all equal
    // but negative and large.
    v[vocab + 17] = 1e4;
    v[2 * vocab + 5] = 50.0;
    v[2 * vocab + 250] = 50.0;
    for x in &mut v[3 * vocab..] {
        *x = -1e4;
    }
    let input = Input::new(v);
    let out = run(
        &Logits::dense(input.data(Dtype::F32), vocab).unwrap(),
        &StatsOptions::default(),
        None,
    )
    .unwrap();
    let ln_v = (vocab as f64).ln();
    assert!(
        common::close(out[0].entropy as f64, ln_v, 1e-5, 1e-6),
        "{label} uniform {:?}",
        out[0]
    );
    assert!(common::close(
        out[0].confidence as f64,
        1.0 / vocab as f64,
        1e-5,
        0.0
    ));
    assert_eq!(out[1].entropy, 0.0, "{label} one-hot {:?}", out[1]);
    assert_eq!(out[1].confidence, 1.0);
    assert_eq!(out[1].argmax, 17);
    assert!(
        common::close(out[2].entropy as f64, 2f64.ln(), 1e-5, 1e-6),
        "{label} {:?}",
        out[2]
    );
    assert_eq!(out[2].argmax, 5);
    assert!(
        common::close(out[3].entropy as f64, ln_v, 1e-5, 1e-6),
        "{label} {:?}",
        out[3]
    );
});

per_backend!(
    nonfinite_rows_are_flagged_not_averaged,
    |run: Run<'_>, label: &str| {
        let vocab = 100;
        let mut v = common::normal_logits(6 * vocab, 1.0, 5);
        v[vocab + 50] = f32::NAN;
        v[2 * vocab + 99] = f32::INFINITY;
        for x in &mut v[3 * vocab..4 * vocab] {
            *x = f32::NEG_INFINITY;
        }
        for i in (0..vocab).step_by(3) {
            v[4 * vocab + i] = f32::NEG_INFINITY; // partially masked: a valid row
        }
        v[5 * vocab] = f32::NAN;
        v[5 * vocab + 1] = f32::NEG_INFINITY;
        let input = Input::new(v);
        for dtype in Dtype::ALL {
            let opts = StatsOptions {
                temperature: 0.9,
                sample: true,
                seed: 3,
                ..Default::default()
            };
            check_case(run, &input, dtype, 6, vocab, vocab, &opts, label);
            let out = run(
                &Logits::dense(input.data(dtype), vocab).unwrap(),
                &opts,
                None,
            )
            .unwrap();
            let flags: Vec<u32> = out.iter().map(|r| r.flags).collect();
            assert_eq!(
                flags,
                vec![
                    0,
                    ROW_NONFINITE,
                    ROW_NONFINITE,
                    ROW_ALL_MASKED,
                    0,
                    ROW_NONFINITE
                ],
                "{label}"
            );
            assert!(
                out[4].sampled % 3 != 0,
                "a masked token was sampled: {label}"
            );
        }
    }
);

per_backend!(row_stride_skips_padding, |run: Run<'_>, label: &str| {
    let (rows, vocab, stride) = (3, 33, 40);
    let mut v = common::normal_logits(rows * stride, 2.0, 8);
    for r in 0..rows {
        for i in vocab..stride {
            v[r * stride + i] = f32::NAN; // never read
        }
    }
    let input = Input::new(v);
    let opts = StatsOptions {
        temperature: 1.0,
        sample: true,
        seed: 5,
        ..Default::default()
    };
    for dtype in Dtype::ALL {
        check_case(run, &input, dtype, rows, vocab, stride, &opts, label);
    }
});

per_backend!(feature_accumulators, |run: Run<'_>, label: &str| {
    let (rows, vocab) = (4, 257);
    let mut acc = vec![FeatureAccum::EMPTY; rows];
    let mut want = vec![FeatureAccum::EMPTY; rows];
    for (step, mode) in [
        Accumulate::Reset,
        Accumulate::Add,
        Accumulate::Add,
        Accumulate::Reset,
        Accumulate::Add,
    ]
    .into_iter()
    .enumerate()
    {
        let mut v = common::normal_logits(rows * vocab, 1.5, 50 + step as u64);
        if step == 2 {
            v[2 * vocab + 3] = f32::NAN; // row 2 of this draft is bad
        }
        let input = Input::new(v);
        let opts = StatsOptions {
            temperature: 0.8,
            accumulate: mode,
            ..Default::default()
        };
        let l = Logits::dense(input.data(Dtype::F32), vocab).unwrap();
        let out = run(&l, &opts, Some(&mut acc)).unwrap();
        for r in 0..rows {
            let rf = reference_row(&input.f32s[r * vocab..(r + 1) * vocab], 0.8);
            if mode == Accumulate::Reset {
                want[r] = FeatureAccum::EMPTY;
            }
            want[r].push(rf.entropy as f32, rf.confidence as f32, rf.flags);
            assert_eq!(out[r].flags, rf.flags);
        }
        for r in 0..rows {
            let (g, w) = (&acc[r], &want[r]);
            let ctx = format!("{label} step {step} row {r}: {g:?} vs {w:?}");
            assert_eq!((g.count, g.flags), (w.count, w.flags), "{ctx}");
            assert!(
                common::close(g.entropy_sum as f64, w.entropy_sum as f64, 1e-5, 1e-6),
                "{ctx}"
            );
            assert!(
                common::close(g.entropy_max as f64, w.entropy_max as f64, 1e-5, 1e-6),
                "{ctx}"
            );
            assert!(
                common::close(g.confidence_sum as f64, w.confidence_sum as f64, 1e-5, 1e-6),
                "{ctx}"
            );
            assert!(
                common::close(g.confidence_min as f64, w.confidence_min as f64, 1e-5, 1e-6),
                "{ctx}"
            );
        }
    }
    // After the last reset: two good rows each; row 2's NaN was in the earlier step.
    assert!(
        acc.iter().all(|a| a.count == 2 && a.flags == 0),
        "{label} {acc:?}"
    );
});

per_backend!(bad_input_is_a_typed_error, |run: Run<'_>, label: &str| {
    let v = vec![0.5f32; 64];
    let l = Logits::dense(LogitsData::F32(&v), 32).unwrap();
    // Negative, NaN, infinite, and positive but so small that 1/T is not finite (subnormal).
    for t in [-1.0f32, f32::NAN, f32::INFINITY, 1e-39, f32::from_bits(1)] {
        let opts = StatsOptions {
            temperature: t,
            ..Default::default()
        };
        assert!(
            matches!(run(&l, &opts, None), Err(Error::BadTemperature(_))),
            "{label} T={t}"
        );
    }
    let mut short = vec![FeatureAccum::EMPTY; 1];
    let opts = StatsOptions {
        accumulate: Accumulate::Add,
        ..Default::default()
    };
    assert!(
        matches!(run(&l, &opts, Some(&mut short)), Err(Error::Length { .. })),
        "{label}"
    );
    assert!(
        run(&l, &opts, None).is_err(),
        "{label}: accumulate without accumulators"
    );
});

per_backend!(
    statistics_are_finite_or_flagged,
    |run: Run<'_>, label: &str| {
        // The smallest normal temperature is accepted; logits whose x / T overflows f32 are flagged
        // (ROW_NONFINITE), never returned as NaN statistics with no flag; a row whose x / T stays
        // finite is fine.
        let v = vec![
            40.0f32, 0.0, -3.0, 1.0, // x / T = 4e38 overflows
            0.5, -0.5, 0.25, 0.0, // |x| / T ≤ 5e36
        ];
        let l = Logits::dense(LogitsData::F32(&v), 4).unwrap();
        for sample in [false, true] {
            let opts = StatsOptions {
                temperature: 1e-37,
                sample,
                ..Default::default()
            };
            let r = run(&l, &opts, None).unwrap();
            assert_eq!(r[0].flags, ROW_NONFINITE, "{label}: {:?}", r[0]);
            assert_eq!((r[0].argmax, r[0].sampled), (-1, -1));
            assert_eq!(r[1].flags, 0, "{label}: {:?}", r[1]);
            assert_eq!(r[1].argmax, 0);
            assert!(
                r[1].confidence > 0.999 && r[1].entropy.is_finite(),
                "{label}: {:?}",
                r[1]
            );
            if sample {
                assert_eq!(r[1].sampled, 0, "{label}: T → 0 samples the argmax");
            }
        }
    }
);

// ---------------------------------------------------------------------------------------------
// emulator-only and backend-independent checks

/// At GPU precision (`ex2` / `lg2` as `.approx.ftz`, within their error bounds, subnormals
/// flushed) the statistics stay within tolerance of the float64 reference, and the argmax and the
/// sampled token — which use no approximate instruction — are exact.
#[test]
fn emulator_at_gpu_precision_stays_within_tolerance() {
    for (k, &(rows, vocab)) in [(3usize, 1000usize), (2, 50257), (4, 33)]
        .iter()
        .enumerate()
    {
        let x = common::normal_logits(rows * vocab, 3.0, 900 + k as u64);
        let l = Logits::dense(LogitsData::F32(&x), vocab).unwrap();
        for t in [1.0f32, 0.6, 0.0] {
            let opts = StatsOptions {
                temperature: t,
                sample: t > 0.0,
                seed: 5,
                step: 2,
                ..Default::default()
            };
            let got = speckv::backend::emulate::Emulator::new(256)
                .gpu_math(k as u64)
                .softmax_stats(&l, &opts, None)
                .unwrap();
            for (r, g) in got.iter().enumerate() {
                let row = &x[r * vocab..(r + 1) * vocab];
                let want = reference_row(row, t);
                let ctx = format!("vocab {vocab} row {r} T {t}");
                assert_eq!(g.argmax, want.argmax, "{ctx}");
                assert!(
                    common::close(g.lse as f64, want.lse, 2e-6, 2e-6),
                    "{ctx}: lse {} vs {}",
                    g.lse,
                    want.lse
                );
                assert!(
                    common::close(g.entropy as f64, want.entropy, 2e-5, 2e-6),
                    "{ctx}: entropy {} vs {}",
                    g.entropy,
                    want.entropy
                );
                assert!(
                    common::close(g.confidence as f64, want.confidence, 2e-5, 1e-7),
                    "{ctx}"
                );
                if t > 0.0 {
                    assert_eq!(g.sampled, replay_sample(row, t, 5, 2, r as u32), "{ctx}");
                }
            }
        }
    }
}

/// v2 against the float64 reference and v1 on awkward shapes: rows whose starts are not 16-byte
/// aligned (odd strides: scalar heads and tails), rows shorter than a vector, plans from 1 to 132
/// SMs (1 to hundreds of blocks per row), every dtype, greedy, tempered and sampled.
#[test]
fn emulator_v2_matches_the_reference_and_v1_on_awkward_shapes() {
    for (k, &(rows, vocab, pad)) in [
        (1usize, 1usize, 0usize),
        (3, 7, 1),
        (2, 33, 3),
        (4, 1000, 5),
        (1, 50257, 0),
        (3, 4099, 7),
        (1, 128256, 0),
    ]
    .iter()
    .enumerate()
    {
        let stride = vocab + pad;
        let input = Input::new(common::grid_logits(rows * stride, 40 + k as u64));
        for dtype in Dtype::ALL {
            for (t, sample) in [(0.0f32, false), (1.0, true), (0.7, true), (1.3, false)] {
                if vocab > 10_000 && (dtype == Dtype::Bf16 || t == 1.3) {
                    continue;
                }
                let opts = StatsOptions {
                    temperature: t,
                    sample,
                    seed: 11,
                    step: 3,
                    ..Default::default()
                };
                let l = Logits::new(input.data(dtype), rows, vocab, stride).unwrap();
                let v1 = speckv::backend::emulate::softmax_stats(&l, &opts, None, 128).unwrap();
                for sms in [1u32, 13, 132] {
                    let label = format!("v2 sms {sms}");
                    let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                        speckv::backend::emulate::Emulator::new(32)
                            .softmax_stats_v2(l, o, a, sms, None)
                            .map(|r| r.stats)
                    };
                    check_case(&run, &input, dtype, rows, vocab, stride, &opts, &label);
                    let v2 = run(&l, &opts, None).unwrap();
                    for (a, b) in v1.iter().zip(&v2) {
                        assert_eq!(
                            (a.argmax, a.sampled, a.flags),
                            (b.argmax, b.sampled, b.flags),
                            "{label} vs v1"
                        );
                    }
                }
            }
        }
    }
}

/// The plan fills an H200 at batch 1 (issue 12's floor: ≥ 2 × 132 blocks for 1 × 128256 f16) and
/// never gives a block fewer than `MIN_CHUNK_VECS` vectors or more than 256 threads.
#[test]
fn v2_plans_fill_the_gpu() {
    let (lp, p) = speckv::plan::softmax_stats_v2(1, 128_256, Dtype::F16, 132);
    assert!(p.grid >= 264, "{p:?}");
    assert_eq!(lp.entry, "softmax_stats_v2_f16");
    assert_eq!(lp.grid[0], p.grid);
    for (rows, vocab) in [
        (1u32, 1u32),
        (1, 32_000),
        (64, 128_256),
        (256, 50_257),
        (1, 128_256),
    ] {
        for dtype in Dtype::ALL {
            let (_, p) = speckv::plan::softmax_stats_v2(rows, vocab, dtype, 132);
            let vecs = vocab.div_ceil(16 / dtype.size() as u32);
            assert!(p.splits * p.chunk_vecs >= vecs, "{p:?} covers the row");
            assert!(p.splits == 1 || p.chunk_vecs >= speckv_kernels::softmax_stats::MIN_CHUNK_VECS);
            assert!((32..=256).contains(&p.block) && p.block % 32 == 0);
            assert_eq!(p.grid, rows * p.splits);
        }
    }
}

/// The γ decision fused into v2's final merge equals the `gamma_mlp` kernel's, bit for bit, and
/// the accumulators equal v1's.
#[test]
fn emulator_v2_fused_decision_equals_gamma_mlp() {
    use speckv::controller::{Controller, CostModel, PAPER_CANDIDATES};
    let mlp = speckv::measure::overhead::random_mlp(5);
    let (rows, vocab, g) = (6usize, 3000usize, 3);
    let draft = common::normal_logits(rows * g * vocab, 2.5, 77);
    for cost in [None, Some(CostModel::assumed())] {
        let c = Controller::new(mlp.clone(), &PAPER_CANDIDATES, cost).unwrap();
        let w = c.mlp.to_f32();
        let mut a1 = vec![FeatureAccum::EMPTY; rows];
        let mut a2 = vec![FeatureAccum::EMPTY; rows];
        let mut last = None;
        for j in 0..g {
            // Position j of every sequence: rows b·g + j of the draft block.
            let rowsj: Vec<f32> = (0..rows)
                .flat_map(|b| draft[(b * g + j) * vocab..(b * g + j + 1) * vocab].to_vec())
                .collect();
            let l = Logits::dense(LogitsData::F32(&rowsj), vocab).unwrap();
            let opts = StatsOptions {
                temperature: 1.0,
                sample: true,
                seed: 1,
                step: j as u64,
                accumulate: if j == 0 {
                    Accumulate::Reset
                } else {
                    Accumulate::Add
                },
            };
            speckv::backend::emulate::softmax_stats(&l, &opts, Some(&mut a1), 256).unwrap();
            let d = speckv::backend::emulate::Decision {
                controller: &c,
                weights: &w,
                compression_code: 1.0,
                fallback: 2,
            };
            let r = speckv::backend::emulate::Emulator::new(32)
                .softmax_stats_v2(&l, &opts, Some(&mut a2), 5, Some(d))
                .unwrap();
            last = Some(r);
        }
        for (x, y) in a1.iter().zip(&a2) {
            assert_eq!(x.count, y.count);
            assert!(common::close(
                x.entropy_sum as f64,
                y.entropy_sum as f64,
                1e-5,
                1e-6
            ));
        }
        let r = last.unwrap();
        let (gk, ek, fk) = speckv::backend::emulate::gamma_mlp(&c, &w, &a2, 1.0, 2, 64).unwrap();
        assert_eq!(r.gammas.as_ref().unwrap(), &gk);
        assert_eq!(r.gamma_flags.as_ref().unwrap(), &fk);
        assert_eq!(
            bytemuck::cast_slice::<f32, u32>(r.expected.as_ref().unwrap()),
            bytemuck::cast_slice::<f32, u32>(&ek)
        );
        assert!(fk.iter().all(|&f| f == 0), "{fk:?}");
    }
}

/// A temperature the host did not check (another host's launch) is flagged by the kernel itself.
#[test]
fn emulator_kernel_flags_a_subnormal_temperature() {
    let v = vec![0.5f32, 1.0, -2.0, 0.0];
    let l = Logits::dense(LogitsData::F32(&v), 4).unwrap();
    for t in [1e-39f32, -0.5, f32::NAN] {
        let opts = StatsOptions {
            temperature: t,
            ..Default::default()
        };
        let r = speckv::backend::emulate::Emulator::new(64)
            .softmax_stats_unchecked_options(&l, &opts, None)
            .unwrap();
        assert_eq!(r[0].flags, speckv::ROW_BAD_TEMPERATURE, "T={t}: {:?}", r[0]);
        assert!(r[0].entropy.is_nan() && r[0].argmax == -1);
    }
}

/// llm.c style: the kernel at every block size gives the same argmax and sampled token, and
/// statistics within tolerance of the reference.
#[test]
fn emulator_every_block_size() {
    for (k, &(rows, vocab)) in [(3usize, 33usize), (2, 1000), (1, 50257)]
        .iter()
        .enumerate()
    {
        let input = Input::new(common::normal_logits(rows * vocab, 3.0, 900 + k as u64));
        let opts = StatsOptions {
            temperature: 0.9,
            sample: true,
            seed: 77,
            step: 3,
            ..Default::default()
        };
        let l = Logits::dense(input.data(Dtype::F16), vocab).unwrap();
        let mut first: Option<Vec<RowStats>> = None;
        for block in [32u32, 64, 96, 128, 256, 512, 992, 1024] {
            let run = |l: &Logits<'_>, o: &StatsOptions, a: Option<&mut [FeatureAccum]>| {
                speckv::backend::emulate::softmax_stats(l, o, a, block)
            };
            check_case(
                &run,
                &input,
                Dtype::F16,
                rows,
                vocab,
                vocab,
                &opts,
                &format!("emulator block {block}"),
            );
            let out = run(&l, &opts, None).unwrap();
            if let Some(f) = &first {
                for (a, b) in f.iter().zip(&out) {
                    assert_eq!(
                        (a.argmax, a.sampled),
                        (b.argmax, b.sampled),
                        "block {block}"
                    );
                }
            } else {
                first = Some(out);
            }
        }
    }
}

#[test]
fn emulator_rejects_block_sizes_the_kernel_cannot_take() {
    let v = vec![0.0f32; 64];
    let l = Logits::dense(LogitsData::F32(&v), 64).unwrap();
    for block in [0u32, 16, 48, 1056, 2048] {
        let r = speckv::backend::emulate::softmax_stats(&l, &StatsOptions::default(), None, block);
        assert!(
            matches!(r, Err(Error::BadBlockSize(b)) if b == block),
            "block {block}: {r:?}"
        );
    }
}

#[test]
fn emulator_and_cpu_sample_identical_tokens() {
    let (rows, vocab) = (16, 4099);
    let input = Input::new(common::normal_logits(rows * vocab, 1.0, 31));
    let cpu = CpuBackend::new();
    for dtype in Dtype::ALL {
        let l = Logits::dense(input.data(dtype), vocab).unwrap();
        let opts = StatsOptions {
            temperature: 1.1,
            sample: true,
            seed: 12345,
            step: 99,
            ..Default::default()
        };
        let a = speckv::backend::emulate::softmax_stats(&l, &opts, None, 128).unwrap();
        let b = cpu.softmax_stats(&l, &opts, None).unwrap();
        let ta: Vec<i32> = a.iter().map(|r| r.sampled).collect();
        let tb: Vec<i32> = b.iter().map(|r| r.sampled).collect();
        assert_eq!(ta, tb, "{dtype:?}");
    }
}

/// The sampled tokens follow softmax(x / T): χ² over 60,000 draws (5 degrees of freedom,
/// critical value 20.5 at p = 0.001). The CPU backend draws exactly what the kernel draws (tests
/// above), so this checks the kernel's distribution too.
#[test]
fn cpu_sampling_follows_softmax_chi_square() {
    let logits = [1.0f32, 0.0, 2.5, -1.0, 0.5, 1.7];
    let t = 0.8f32;
    let n = 60_000;
    let v: Vec<f32> = (0..n).flat_map(|_| logits).collect();
    let l = Logits::dense(LogitsData::F32(&v), 6).unwrap();
    let opts = StatsOptions {
        temperature: t,
        sample: true,
        seed: 2024,
        step: 0,
        ..Default::default()
    };
    let out = CpuBackend::new().softmax_stats(&l, &opts, None).unwrap();
    let mut counts = [0f64; 6];
    for r in &out {
        counts[r.sampled as usize] += 1.0;
    }
    let z: Vec<f64> = logits.iter().map(|&x| x as f64 / t as f64).collect();
    let s: f64 = z.iter().map(|v| v.exp()).sum();
    let chi2: f64 = z
        .iter()
        .zip(counts)
        .map(|(zi, c)| {
            let e = n as f64 * zi.exp() / s;
            (c - e).powi(2) / e
        })
        .sum();
    assert!(chi2 < 20.5, "χ² = {chi2}, counts {counts:?}");
}

#[test]
fn logits_validation_errors_say_what_was_wrong() {
    let v = vec![0.0f32; 10];
    let d = LogitsData::F32(&v);
    assert!(matches!(
        Logits::new(d, 1, 0, 0),
        Err(Error::Empty { what: "vocab" })
    ));
    assert!(matches!(
        Logits::new(d, 0, 5, 5),
        Err(Error::Empty { what: "rows" })
    ));
    assert!(matches!(
        Logits::new(d, 2, 5, 4),
        Err(Error::StrideTooSmall { .. })
    ));
    assert!(matches!(
        Logits::new(d, 3, 5, 5),
        Err(Error::LogitsLength {
            got: 10,
            need: 15,
            ..
        })
    ));
    assert!(matches!(Logits::dense(d, 3), Err(Error::Length { .. })));
    assert!(
        Logits::new(d, 2, 3, 7).is_ok(),
        "last row needs only vocab elements"
    );
    let e = Logits::new(d, 3, 5, 5).unwrap_err().to_string();
    assert!(e.contains("10") && e.contains("15"), "{e}");
}

/// On a GPU: the CUDA kernel and the CPU backend on the same random inputs — argmax and sampled
/// tokens bit-identical, statistics within the kernel's tolerance of each other.
#[test]
fn cuda_matches_the_cpu_backend_bit_for_bit_on_tokens() {
    let Some(cuda) = common::cuda() else { return };
    let cpu = CpuBackend::new();
    for &(rows, vocab) in &[(64usize, 128_256usize), (256, 32_000), (1, 50_257), (7, 33)] {
        let input = Input::new(common::normal_logits(
            rows * vocab,
            3.0,
            (rows * vocab) as u64,
        ));
        for dtype in Dtype::ALL {
            let l = Logits::dense(input.data(dtype), vocab).unwrap();
            let opts = StatsOptions {
                temperature: 0.8,
                sample: true,
                seed: 5,
                step: 6,
                ..Default::default()
            };
            let a = cuda.softmax_stats(&l, &opts, None).unwrap();
            let b = cpu.softmax_stats(&l, &opts, None).unwrap();
            for (r, (x, y)) in a.iter().zip(&b).enumerate() {
                let ctx = format!("{rows}x{vocab} {dtype:?} row {r}: cuda {x:?} cpu {y:?}");
                assert_eq!(
                    (x.argmax, x.sampled, x.flags),
                    (y.argmax, y.sampled, y.flags),
                    "{ctx}"
                );
                assert!(
                    common::close(x.entropy as f64, y.entropy as f64, 1e-5, 1e-6),
                    "{ctx}"
                );
                assert!(
                    common::close(x.confidence as f64, y.confidence as f64, 1e-5, 1e-6),
                    "{ctx}"
                );
                assert!(
                    common::close(x.lse as f64, y.lse as f64, 1e-5, 1e-6),
                    "{ctx}"
                );
            }
        }
    }
}

/// The γ decision fused into `softmax_stats_v2` on the device: the same statistics, accumulators,
/// flags and (up to near-ties of predicted tokens) γ as the emulator, and the arrival counters left
/// at zero. Skipped without a CUDA device.
#[test]
fn cuda_v2_fused_decision_matches_the_emulator() {
    use speckv::controller::{Controller, CostModel, PAPER_CANDIDATES};
    let Some(cuda) = common::cuda() else { return };
    let mlp = speckv::measure::overhead::random_mlp(6);
    let (rows, vocab, g) = (24usize, 16000usize, 3);
    let draft = common::normal_logits(rows * g * vocab, 2.5, 78);
    let c = Controller::new(mlp, &PAPER_CANDIDATES, Some(CostModel::assumed())).unwrap();
    let w = c.mlp.to_f32();
    let dc = cuda.upload_controller(&c).unwrap();
    let mut ae = vec![FeatureAccum::EMPTY; rows];
    let mut ac = vec![FeatureAccum::EMPTY; rows];
    let (mut re, mut rc) = (None, None);
    for j in 0..g {
        let rowsj: Vec<f32> = (0..rows)
            .flat_map(|b| draft[(b * g + j) * vocab..(b * g + j + 1) * vocab].to_vec())
            .collect();
        let l = Logits::dense(LogitsData::F32(&rowsj), vocab).unwrap();
        let opts = StatsOptions {
            temperature: 1.0,
            sample: true,
            seed: 1,
            step: j as u64,
            accumulate: if j == 0 {
                Accumulate::Reset
            } else {
                Accumulate::Add
            },
        };
        let d = speckv::backend::emulate::Decision {
            controller: &c,
            weights: &w,
            compression_code: 1.0,
            fallback: 2,
        };
        re = Some(
            speckv::backend::emulate::Emulator::new(32)
                .softmax_stats_v2(&l, &opts, Some(&mut ae), cuda.sm_count(), Some(d))
                .unwrap(),
        );
        rc = Some(
            cuda.softmax_stats_decide(&dc, &l, &opts, &mut ac, 1.0, 2)
                .unwrap(),
        );
        let (e, k) = (re.as_ref().unwrap(), rc.as_ref().unwrap());
        for (x, y) in e.stats.iter().zip(&k.stats) {
            assert_eq!(x.argmax, y.argmax);
            assert!(common::close(
                x.entropy as f64,
                y.entropy as f64,
                1e-4,
                1e-5
            ));
        }
    }
    let (e, k) = (re.unwrap(), rc.unwrap());
    for (x, y) in ae.iter().zip(&ac) {
        assert_eq!(x.count, y.count);
        assert!(common::close(
            x.entropy_sum as f64,
            y.entropy_sum as f64,
            1e-4,
            1e-5
        ));
    }
    assert_eq!(e.gamma_flags, k.gamma_flags);
    let (ge, gc) = (e.gammas.unwrap(), k.gammas.unwrap());
    let (ee, ec) = (e.expected.unwrap(), k.expected.unwrap());
    for i in 0..rows {
        assert!(common::close(ec[i] as f64, ee[i] as f64, 1e-3, 1e-4), "{i}");
    }
    let differ = ge.iter().zip(&gc).filter(|(a, b)| a != b).count();
    assert!(
        differ <= 1,
        "γ differs on {differ} of {rows} rows: {ge:?} vs {gc:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// v3: a batch's rows, each with its own options and accumulator, in one launch

/// Launch row k's options: greedy, sampled, tempered and sampled again, with their own seeds and
/// steps, starting, adding to or leaving their accumulators.
fn v3_options(k: usize) -> StatsOptions {
    let (temperature, sample, accumulate) = match k % 4 {
        0 => (0.0, false, Accumulate::Reset),
        1 => (0.7, true, Accumulate::Add),
        2 => (1.3, false, Accumulate::No),
        _ => (1.0, true, Accumulate::Add),
    };
    StatsOptions {
        temperature,
        sample,
        seed: 11 + k as u64,
        step: 3 * k as u64,
        accumulate,
    }
}

/// Accumulators with history: row k's has seen k + 1 rows already.
fn v3_accums(n: usize) -> Vec<FeatureAccum> {
    (0..n)
        .map(|k| {
            let mut a = FeatureAccum::EMPTY;
            for j in 0..=k {
                a.push(0.5 + 0.25 * j as f32, 0.9 - 0.05 * j as f32, 0);
            }
            a
        })
        .collect()
}

fn accum_close(a: &FeatureAccum, b: &FeatureAccum) -> bool {
    a.count == b.count
        && a.flags == b.flags
        && [
            (a.entropy_sum, b.entropy_sum),
            (a.entropy_max, b.entropy_max),
            (a.confidence_sum, b.confidence_sum),
            (a.confidence_min, b.confidence_min),
        ]
        .iter()
        .all(|&(x, y)| common::close(x as f64, y as f64, 1e-5, 1e-6))
}

/// v3 against the float64 reference and against v2 launched on each row alone: rows out of order
/// and read twice, every row with its own options and accumulator, awkward shapes (unaligned
/// heads and tails, rows shorter than a vector), every dtype, plans for 1 to 132 SMs. Tokens are
/// a one-row launch's (Philox stream 0), bit for bit; accumulators as v2 leaves them.
#[test]
fn emulator_v3_matches_the_reference_and_one_row_launches() {
    let cases: Vec<(usize, usize, usize, Vec<usize>)> = vec![
        (1, 1, 0, vec![0]),
        (3, 7, 1, vec![2, 0, 2]),
        (4, 33, 3, vec![1, 3, 0, 2]),
        (5, 1000, 5, vec![4, 1, 1, 3, 0]),
        (2, 4099, 7, vec![1, 0]),
        (16, 151, 0, (0..16).rev().collect()),
        (1, 50257, 0, vec![0, 0]),
    ];
    for (case, (logit_rows, vocab, pad, rows)) in cases.iter().enumerate() {
        let stride = vocab + pad;
        let input = Input::new(common::grid_logits(logit_rows * stride, 70 + case as u64));
        let opts: Vec<StatsOptions> = (0..rows.len()).map(v3_options).collect();
        let initial = v3_accums(rows.len());
        for dtype in Dtype::ALL {
            if *vocab > 10_000 && dtype != Dtype::F32 {
                continue;
            }
            let seen = input.seen(dtype);
            let l = Logits::new(input.data(dtype), *logit_rows, *vocab, stride).unwrap();
            for sms in [1u32, 13, 132] {
                let emu = speckv::backend::emulate::Emulator::new(32);
                let mut acc = initial.clone();
                let out = emu
                    .softmax_stats_v3(&l, rows, &opts, &mut acc, sms)
                    .unwrap();
                assert_eq!(out.len(), rows.len());
                for (k, &r) in rows.iter().enumerate() {
                    let ctx = format!(
                        "v3 {dtype:?} {logit_rows}x{vocab}+{pad} sms {sms} row {k} (logits {r})"
                    );
                    let x = &seen[r * stride..r * stride + vocab];
                    check_row(&out[k], x, &opts[k], 0, &ctx);
                    let one = Logits::dense(input.part(dtype, r * stride, *vocab), *vocab).unwrap();
                    let mut a1 = [initial[k]];
                    let v2 = emu
                        .softmax_stats_v2(&one, &opts[k], Some(&mut a1[..]), sms, None)
                        .unwrap()
                        .stats[0];
                    assert_eq!(
                        (out[k].argmax, out[k].sampled, out[k].flags),
                        (v2.argmax, v2.sampled, v2.flags),
                        "{ctx} vs v2 alone"
                    );
                    assert!(
                        accum_close(&acc[k], &a1[0]),
                        "{ctx}: {:?} vs v2's {:?}",
                        acc[k],
                        a1[0]
                    );
                    if opts[k].accumulate == Accumulate::No {
                        assert_eq!(acc[k], initial[k], "{ctx}: an accumulator left alone");
                    } else {
                        assert_ne!(acc[k], initial[k], "{ctx}: an accumulator updated");
                    }
                }
            }
        }
    }
}

/// v3 at every block size from 32 to 1024 threads, three blocks per row: the same tokens, each
/// row within the reference's tolerance.
#[test]
fn emulator_v3_every_block_size() {
    let (logit_rows, vocab) = (3usize, 1000usize);
    let input = Input::new(common::normal_logits(logit_rows * vocab, 3.0, 950));
    let l = Logits::dense(input.data(Dtype::F16), vocab).unwrap();
    let seen = input.seen(Dtype::F16);
    let rows = [2usize, 0, 1, 2];
    let opts: Vec<StatsOptions> = (0..rows.len()).map(v3_options).collect();
    let vecs = (vocab as u32).div_ceil(8);
    let mut first: Option<Vec<RowStats>> = None;
    for block in [32u32, 64, 96, 128, 256, 512, 992, 1024] {
        let plan = speckv_kernels::softmax_stats::PlanV2 {
            splits: 3,
            chunk_vecs: vecs.div_ceil(3),
            block,
            grid: 3 * rows.len() as u32,
            shared_bytes: speckv_kernels::softmax_stats::shared_bytes_v2(block),
        };
        let mut acc = v3_accums(rows.len());
        let out = speckv::backend::emulate::Emulator::new(block)
            .softmax_stats_v3_planned(&l, &rows, &opts, &mut acc, &plan)
            .unwrap();
        for (k, &r) in rows.iter().enumerate() {
            let x = &seen[r * vocab..(r + 1) * vocab];
            check_row(
                &out[k],
                x,
                &opts[k],
                0,
                &format!("v3 block {block} row {k}"),
            );
        }
        match &first {
            Some(f) => {
                for (a, b) in f.iter().zip(&out) {
                    assert_eq!(
                        (a.argmax, a.sampled),
                        (b.argmax, b.sampled),
                        "block {block}"
                    );
                }
            }
            None => first = Some(out),
        }
    }
}

/// Descriptions another host could write, launched unchecked: a logits row or an accumulator slot
/// the launch lacks is flagged `ROW_BAD_INDEX` and touches nothing; a bad temperature is flagged
/// as v2 flags it; the γ-decision and stopping bits are ignored (v3 accumulates only).
#[test]
fn emulator_v3_flags_descriptions_it_cannot_follow() {
    use speckv::{StatsRow, ROW_BAD_INDEX, ROW_BAD_TEMPERATURE};
    use speckv_kernels::params::{STATS_ACCUMULATE, STATS_DECIDE, STATS_SAMPLE, STATS_STOP};
    let (logit_rows, vocab) = (3usize, 257usize);
    let input = Input::new(common::normal_logits(logit_rows * vocab, 2.0, 960));
    let l = Logits::dense(input.data(Dtype::F32), vocab).unwrap();
    let row = |row: u32, temperature: f32, flags: u32, accum_slot: u32| StatsRow {
        seed: 9,
        step: 1,
        row,
        stream: 0,
        temperature,
        flags,
        accum_slot,
        _pad: 0,
    };
    let add = STATS_ACCUMULATE;
    let desc = [
        row(0, 1.0, add | STATS_SAMPLE, 0),
        row(3, 1.0, add, 1),
        row(1, 1.0, add, 3),
        row(2, -1.0, STATS_SAMPLE, 1),
        row(2, 0.8, add | STATS_DECIDE | STATS_STOP, 2),
    ];
    let plan = speckv::plan::softmax_stats_v3(desc.len() as u32, vocab as u32, Dtype::F32, 13).1;
    let initial = v3_accums(3);
    let mut acc = initial.clone();
    let emu = speckv::backend::emulate::Emulator::new(32);
    let out = emu
        .softmax_stats_v3_unchecked(&l, &desc, &mut acc, &plan)
        .unwrap();
    assert_eq!(out[0].flags, 0, "{:?}", out[0]);
    assert_ne!(acc[0], initial[0]);
    for k in [1, 2] {
        // Bit for bit (NaN ≠ NaN as floats).
        assert_eq!(
            bytemuck::bytes_of(&out[k]),
            bytemuck::bytes_of(&RowStats::flagged(ROW_BAD_INDEX)),
            "row {k}: {:?}",
            out[k]
        );
    }
    assert_eq!(
        acc[1], initial[1],
        "flagged rows and a row not accumulating leave slot 1"
    );
    assert_eq!(
        out[3].flags & ROW_BAD_TEMPERATURE,
        ROW_BAD_TEMPERATURE,
        "{:?}",
        out[3]
    );
    assert_eq!(out[3].sampled, -1);
    // Row 4 as a plain accumulating row.
    let plain = [row(2, 0.8, add, 2)];
    let plan1 = speckv::plan::softmax_stats_v3(1, vocab as u32, Dtype::F32, 13).1;
    let mut acc1 = initial.clone();
    let one = emu
        .softmax_stats_v3_unchecked(&l, &plain, &mut acc1, &plan1)
        .unwrap();
    assert_eq!((out[4].argmax, out[4].flags), (one[0].argmax, one[0].flags));
    assert!(
        accum_close(&acc[2], &acc1[2]),
        "{:?} vs {:?}",
        acc[2],
        acc1[2]
    );
    // No accumulators at all: an accumulating row names a slot the launch lacks.
    let none = emu
        .softmax_stats_v3_unchecked(&l, &plain, &mut [], &plan1)
        .unwrap();
    assert_eq!(none[0].flags, ROW_BAD_INDEX, "{:?}", none[0]);
    // Two accumulating rows naming one slot race: the sanitizer reports it, nothing is returned.
    let shared = [row(0, 1.0, add, 1), row(1, 1.0, add, 1)];
    let plan2 = speckv::plan::softmax_stats_v3(2, vocab as u32, Dtype::F32, 13).1;
    let e = emu
        .softmax_stats_v3_unchecked(&l, &shared, &mut initial.clone(), &plan2)
        .unwrap_err();
    assert!(
        e.to_string().contains("global write race on `accum`"),
        "{e}"
    );
}

/// What a v3 call is refused for, before anything is launched, with what was wrong: options or
/// accumulators not one per row, a row past the logits, a bad temperature, an inconsistent plan
/// — on the emulator, and on CUDA where present.
#[test]
fn v3_calls_are_checked() {
    let v = common::normal_logits(3 * 64, 1.0, 7);
    let l = Logits::dense(LogitsData::F32(&v), 64).unwrap();
    let opts = [StatsOptions::default(); 2];
    let mut bad_t = opts;
    bad_t[1].temperature = -0.5;
    let emu = speckv::backend::emulate::Emulator::new(32);
    type Call<'a> = Box<
        dyn Fn(&[usize], &[StatsOptions], &mut [FeatureAccum]) -> speckv::Result<Vec<RowStats>>
            + 'a,
    >;
    let mut backends: Vec<(&str, Call<'_>)> = vec![(
        "emulator",
        Box::new(|r, o, a| emu.softmax_stats_v3(&l, r, o, a, 132)),
    )];
    if let Some(cuda) = common::cuda() {
        backends.push((
            "cuda",
            Box::new(|r, o, a| cuda.softmax_stats_v3(&l, r, o, a)),
        ));
    }
    for (name, call) in &backends {
        let mut two = [FeatureAccum::EMPTY; 2];
        let e = call(&[0, 1], &opts[..1], &mut two).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Length {
                    what: "row options",
                    got: 1,
                    expected: 2
                }
            ),
            "{name}: {e}"
        );
        let e = call(&[0, 1], &opts, &mut two[..1]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Length {
                    what: "accumulators",
                    got: 1,
                    expected: 2
                }
            ),
            "{name}: {e}"
        );
        let e = call(&[0, 3], &opts, &mut two).unwrap_err();
        assert_eq!(e.to_string(), "logits row 3 of 3 rows", "{name}");
        let e = call(&[0, 1], &bad_t, &mut two).unwrap_err();
        assert!(
            matches!(e, Error::BadTemperature(t) if t == -0.5),
            "{name}: {e}"
        );
        assert_eq!(
            two,
            [FeatureAccum::EMPTY; 2],
            "{name}: refused calls change nothing"
        );
        assert!(
            call(&[], &[], &mut []).unwrap().is_empty(),
            "{name}: no rows, no launch"
        );
    }
    let mut plan = speckv::plan::softmax_stats_v3(2, 64, Dtype::F32, 132).1;
    plan.grid += 1;
    let e = emu
        .softmax_stats_v3_planned(&l, &[0, 1], &opts, &mut [FeatureAccum::EMPTY; 2], &plan)
        .unwrap_err();
    assert!(e.to_string().contains("inconsistent v3 plan"), "{e}");
}

/// On a GPU: v3 over a batch's rows at the Qwen pair's vocabulary against the CPU backend on each
/// row alone — tokens and flags bit for bit, statistics and accumulators within tolerance.
/// Skipped without a CUDA device.
#[test]
fn cuda_v3_matches_the_cpu_backend_row_by_row() {
    let Some(cuda) = common::cuda() else { return };
    let cpu = CpuBackend::new();
    for &(logit_rows, vocab) in &[(16usize, 151_936usize), (5, 128_256), (3, 33)] {
        let input = Input::new(common::normal_logits(logit_rows * vocab, 3.0, vocab as u64));
        let rows: Vec<usize> = (0..logit_rows).rev().chain([0]).collect();
        let opts: Vec<StatsOptions> = (0..rows.len()).map(v3_options).collect();
        for dtype in Dtype::ALL {
            let l = Logits::dense(input.data(dtype), vocab).unwrap();
            let mut acc = v3_accums(rows.len());
            let initial = acc.clone();
            let out = cuda.softmax_stats_v3(&l, &rows, &opts, &mut acc).unwrap();
            for (k, &r) in rows.iter().enumerate() {
                let one = Logits::dense(input.part(dtype, r * vocab, vocab), vocab).unwrap();
                let mut a1 = [initial[k]];
                let acc1 = (opts[k].accumulate != Accumulate::No).then_some(&mut a1[..]);
                let want = cpu.softmax_stats(&one, &opts[k], acc1).unwrap()[0];
                let got = out[k];
                let ctx =
                    format!("{logit_rows}x{vocab} {dtype:?} row {k}: cuda {got:?} cpu {want:?}");
                assert_eq!(
                    (got.argmax, got.sampled, got.flags),
                    (want.argmax, want.sampled, want.flags),
                    "{ctx}"
                );
                for (x, y) in [
                    (got.entropy, want.entropy),
                    (got.confidence, want.confidence),
                    (got.lse, want.lse),
                ] {
                    assert!(common::close(x as f64, y as f64, 1e-5, 1e-6), "{ctx}");
                }
                assert!(
                    accum_close(&acc[k], &a1[0]),
                    "{ctx}: {:?} vs {:?}",
                    acc[k],
                    a1[0]
                );
            }
        }
    }
}

/// The CPU twin of v3 (`CpuBackend::softmax_stats_rows`) against the emulated kernel on the same
/// descriptions, streams other than 0 included: tokens, argmax and flags exact, statistics and
/// accumulators within tolerance; and the one-options CPU pass is its case of rows 0..n.
#[test]
fn cpu_rows_twin_matches_the_emulated_v3_kernel() {
    use speckv::StatsRow;
    let (logit_rows, vocab) = (5usize, 3001usize);
    let input = Input::new(common::normal_logits(logit_rows * vocab, 2.5, 970));
    let cpu = CpuBackend::new();
    for dtype in Dtype::ALL {
        let l = Logits::dense(input.data(dtype), vocab).unwrap();
        let desc: Vec<StatsRow> = (0..7usize)
            .map(|k| {
                let o = v3_options(k);
                StatsRow {
                    seed: o.seed,
                    step: o.step,
                    row: ((k * 3) % logit_rows) as u32,
                    stream: (k * 11) as u32,
                    temperature: o.temperature,
                    flags: o.kernel_flags(),
                    accum_slot: k as u32,
                    _pad: 0,
                }
            })
            .collect();
        let mut a_cpu = v3_accums(desc.len());
        let mut a_emu = a_cpu.clone();
        let got = cpu.softmax_stats_rows(&l, &desc, &mut a_cpu).unwrap();
        let plan = speckv::plan::softmax_stats_v3(desc.len() as u32, vocab as u32, dtype, 13).1;
        let want = speckv::backend::emulate::Emulator::new(64)
            .softmax_stats_v3_unchecked(&l, &desc, &mut a_emu, &plan)
            .unwrap();
        for k in 0..desc.len() {
            let ctx = format!("{dtype:?} row {k}: cpu {:?} emulator {:?}", got[k], want[k]);
            assert_eq!(
                (got[k].argmax, got[k].sampled, got[k].flags),
                (want[k].argmax, want[k].sampled, want[k].flags),
                "{ctx}"
            );
            assert!(
                common::close(got[k].entropy as f64, want[k].entropy as f64, 1e-5, 1e-6),
                "{ctx}"
            );
            assert!(accum_close(&a_cpu[k], &a_emu[k]), "{ctx}");
        }
        // Rows 0..n, stream r, one set of options: the one-options pass, bit for bit.
        let o = v3_options(1);
        let same: Vec<StatsRow> = (0..logit_rows)
            .map(|r| StatsRow {
                seed: o.seed,
                step: o.step,
                row: r as u32,
                stream: r as u32,
                temperature: o.temperature,
                flags: o.kernel_flags(),
                accum_slot: r as u32,
                _pad: 0,
            })
            .collect();
        let mut a1 = v3_accums(logit_rows);
        let mut a2 = a1.clone();
        let rows = cpu.softmax_stats_rows(&l, &same, &mut a1).unwrap();
        let pass = cpu.softmax_stats(&l, &o, Some(&mut a2)).unwrap();
        assert_eq!(rows, pass, "{dtype:?}");
        assert_eq!(a1, a2, "{dtype:?}");
    }
}

//! `verify`: the kernel's own source on the emulator, the CPU backend and (when present) the CUDA
//! backend, against a float64 reference of speculative sampling written independently of the kernel
//! (randomness is an input: the reference draws the same Philox uniforms, so accepted counts and
//! tokens must match exactly), plus χ² losslessness checks over ≥ 10⁶ sequences.

mod common;

use half::{bf16, f16};
use speckv::backend::cpu::CpuBackend;
use speckv::measure::verify_sim::{self, SimMode};
use speckv::{
    philox, Backend, DraftDist, Dtype, Error, LogitsData, VerifyBatch, VerifyOutput,
    VERIFY_BAD_DRAFT, VERIFY_BAD_GAMMA, VERIFY_BAD_TEMPERATURE, VERIFY_BAD_TOKEN, VERIFY_NONFINITE,
};

// ---------------------------------------------------------------------------------------------
// float64 reference

fn softmax64(x: &[f32], t: f64) -> Vec<f64> {
    let z: Vec<f64> = x.iter().map(|&v| v as f64 / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn first_argmax(x: &[f32]) -> usize {
    let mut a = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[a] {
            a = i;
        }
    }
    a
}

/// Host-side copy of a batch, every value as f32 (as the kernel sees it).
struct Case {
    batch: usize,
    gmax: usize,
    vocab: usize,
    target: Vec<f32>,
    draft_logits: Vec<f32>,
    draft_probs: Vec<f32>,
    draft_temp: Vec<f32>,
    target_temp: Vec<f32>,
    tokens: Vec<i32>,
    gammas: Vec<i32>,
    seed: u64,
    step: u64,
}

struct Typed {
    t16: Vec<f16>,
    t_bf: Vec<bf16>,
    d16: Vec<f16>,
    d_bf: Vec<bf16>,
}

impl Case {
    fn typed(&self) -> Typed {
        Typed {
            t16: self.target.iter().map(|&v| f16::from_f32(v)).collect(),
            t_bf: self.target.iter().map(|&v| bf16::from_f32(v)).collect(),
            d16: self
                .draft_logits
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect(),
            d_bf: self
                .draft_logits
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect(),
        }
    }

    /// The batch in `dtype`, draft as logits or probabilities.
    fn batch<'a>(&'a self, t: &'a Typed, dtype: Dtype, probs: bool) -> VerifyBatch<'a> {
        let (target, dl) = match dtype {
            Dtype::F32 => (
                LogitsData::F32(&self.target),
                LogitsData::F32(&self.draft_logits),
            ),
            Dtype::F16 => (LogitsData::F16(&t.t16), LogitsData::F16(&t.d16)),
            Dtype::Bf16 => (LogitsData::Bf16(&t.t_bf), LogitsData::Bf16(&t.d_bf)),
        };
        VerifyBatch {
            target,
            target_stride: self.vocab,
            draft: if probs {
                DraftDist::Probs(&self.draft_probs)
            } else {
                DraftDist::Logits {
                    data: dl,
                    temperature: &self.draft_temp,
                }
            },
            draft_stride: self.vocab,
            draft_tokens: &self.tokens,
            gammas: &self.gammas,
            target_temperature: &self.target_temp,
            batch: self.batch,
            gamma_max: self.gmax,
            vocab: self.vocab,
            seed: self.seed,
            step: self.step,
        }
    }

    /// The reference, reading values through `v` (so f16/bf16 rounding is the kernel's).
    fn reference(&self, v: &VerifyBatch<'_>) -> VerifyOutput {
        let mut out = VerifyOutput::new(self.batch, self.gmax);
        let w = self.gmax + 1;
        let vocab = self.vocab;
        let t_row = |b: usize, i: usize| -> Vec<f32> {
            let at = (b * w + i) * vocab;
            (0..vocab).map(|j| v.target.get(at + j)).collect()
        };
        for b in 0..self.batch {
            let g = self.gammas[b] as usize;
            let tt = self.target_temp[b];
            let greedy = tt == 0.0;
            let mut k = g;
            let mut emit = -1i32;
            let mut flagged = 0;
            for i in 0..g {
                let x = self.tokens[b * self.gmax + i] as usize;
                let tr = t_row(b, i);
                if greedy {
                    let a = first_argmax(&tr);
                    out.ratios[b * self.gmax + i] = if a == x { 1.0 } else { 0.0 };
                    if a != x {
                        k = i;
                        emit = a as i32;
                        break;
                    }
                    continue;
                }
                let p = softmax64(&tr, tt as f64);
                let q: Vec<f64> = match v.draft {
                    DraftDist::Probs(dp) => dp[(b * self.gmax + i) * vocab..][..vocab]
                        .iter()
                        .map(|&x| x as f64)
                        .collect(),
                    DraftDist::Logits { data, temperature } => {
                        let at = (b * self.gmax + i) * vocab;
                        let dr: Vec<f32> = (0..vocab).map(|j| data.get(at + j)).collect();
                        if temperature[b] == 0.0 {
                            // A greedy draft proposed x with certainty: q is one-hot at x.
                            (0..vocab).map(|j| (j == x) as u32 as f64).collect()
                        } else {
                            softmax64(&dr, temperature[b] as f64)
                        }
                    }
                };
                if q[x] == 0.0 {
                    // The draft cannot have proposed x: the sequence is flagged, nothing emitted.
                    flagged = VERIFY_BAD_DRAFT;
                    break;
                }
                let ratio = (p[x] / q[x]).min(1.0);
                out.ratios[b * self.gmax + i] = ratio as f32;
                let useed = philox::derive(self.seed, philox::PURPOSE_ACCEPT, 0);
                let u =
                    philox::uniform_open(philox::bits(useed, i as u32, b as u32, self.step)) as f64;
                if u >= ratio {
                    k = i;
                    let eseed = philox::derive(self.seed, philox::PURPOSE_EMIT, i as u32);
                    let mut best = (f64::NEG_INFINITY, -1i32);
                    for j in 0..vocab {
                        let wj = p[j] - q[j];
                        if wj > 0.0 {
                            let e = -philox::ln_det(philox::uniform_open(philox::bits(
                                eseed, j as u32, b as u32, self.step,
                            ))) as f64;
                            if wj / e > best.0 {
                                best = (wj / e, j as i32);
                            }
                        }
                    }
                    emit = best.1;
                    break;
                }
            }
            if flagged != 0 {
                out.flags[b] = flagged;
                continue;
            }
            if k == g {
                let tr = t_row(b, g);
                emit = if greedy {
                    first_argmax(&tr) as i32
                } else {
                    let inv_t = 1.0f32 / tt;
                    let eseed = philox::derive(self.seed, philox::PURPOSE_EMIT, g as u32);
                    let mut best = (f32::NEG_INFINITY, -1i32);
                    for (j, &x) in tr.iter().enumerate() {
                        let key = x * inv_t
                            + philox::gumbel(philox::uniform_open(philox::bits(
                                eseed, j as u32, b as u32, self.step,
                            )));
                        if key > best.0 {
                            best = (key, j as i32);
                        }
                    }
                    best.1
                };
            }
            out.accepted[b] = k as i32;
            out.emitted_count[b] = k as i32 + 1;
            for j in 0..k {
                out.emitted[b * w + j] = self.tokens[b * self.gmax + j];
            }
            out.emitted[b * w + k] = emit;
            for gp in 0..=g {
                out.counterfactual[b * w + gp] = k.min(gp) as i32 + 1;
            }
        }
        out
    }
}

/// A mixed batch: greedy and stochastic sequences, γ_b from 0 to γmax, drafts sampled from q
/// (stochastic) or equal to the target argmax for a while (greedy), so every path is taken.
fn mixed_case(batch: usize, gmax: usize, vocab: usize, seed: u64) -> Case {
    let target = common::normal_logits(batch * (gmax + 1) * vocab, 2.0, seed);
    // Drafts close to the target (the target plus noise): realistic acceptance rates.
    let noise = common::normal_logits(batch * gmax * vocab, 1.0, seed + 1);
    let mut draft_logits = vec![0f32; batch * gmax * vocab];
    for b in 0..batch {
        for i in 0..gmax {
            for j in 0..vocab {
                draft_logits[(b * gmax + i) * vocab + j] =
                    target[(b * (gmax + 1) + i) * vocab + j] + noise[(b * gmax + i) * vocab + j];
            }
        }
    }
    let target_temp: Vec<f32> = (0..batch).map(|b| [0.0, 1.0, 0.7, 1.3][b % 4]).collect();
    let draft_temp: Vec<f32> = (0..batch)
        .map(|b| [1.0, 1.0, 0.7, 0.0, 1.3][b % 5])
        .collect();
    let mut draft_probs = vec![0f32; batch * gmax * vocab];
    let mut tokens = vec![0i32; batch * gmax];
    for b in 0..batch {
        for i in 0..gmax {
            let row = &draft_logits[(b * gmax + i) * vocab..][..vocab];
            let q = softmax64(
                row,
                if draft_temp[b] == 0.0 {
                    1.0
                } else {
                    draft_temp[b] as f64
                },
            );
            for j in 0..vocab {
                draft_probs[(b * gmax + i) * vocab + j] = q[j] as f32;
            }
            let u = philox::uniform_open(philox::bits(seed, (b * gmax + i) as u32, 99, 0)) as f64;
            let mut c = 0.0;
            let mut x = vocab - 1;
            for (j, p) in q.iter().enumerate() {
                c += p;
                if u < c {
                    x = j;
                    break;
                }
            }
            if draft_temp[b] == 0.0 || target_temp[b] == 0.0 {
                // Greedy drafts: the draft argmax, which often matches the target argmax.
                x = first_argmax(row);
                if i >= 2 && b % 3 == 0 {
                    x = (x + 1) % vocab; // force a greedy mismatch sometimes
                }
            }
            tokens[b * gmax + i] = x as i32;
        }
    }
    let gammas = (0..batch).map(|b| (b % (gmax + 1)) as i32).rev().collect();
    Case {
        batch,
        gmax,
        vocab,
        target,
        draft_logits,
        draft_probs,
        draft_temp,
        target_temp,
        tokens,
        gammas,
        seed,
        step: 5,
    }
}

fn assert_same(got: &VerifyOutput, want: &VerifyOutput, label: &str) {
    assert_eq!(got.flags, want.flags, "{label}: flags");
    assert_eq!(got.accepted, want.accepted, "{label}: accepted");
    assert_eq!(
        got.emitted_count, want.emitted_count,
        "{label}: emitted counts"
    );
    assert_eq!(got.emitted, want.emitted, "{label}: emitted tokens");
    assert_eq!(
        got.counterfactual, want.counterfactual,
        "{label}: counterfactual"
    );
    for (i, (a, b)) in got.ratios.iter().zip(&want.ratios).enumerate() {
        assert!(
            common::close(*a as f64, *b as f64, 2e-5, 1e-6),
            "{label}: ratio {i}: {a} vs {b}"
        );
    }
}

/// Invariants every output satisfies.
fn assert_invariants(v: &VerifyBatch<'_>, o: &VerifyOutput, label: &str) {
    let w = v.gamma_max + 1;
    for b in 0..v.batch {
        if o.flags[b] != 0 {
            assert_eq!(o.emitted_count[b], 0, "{label}");
            continue;
        }
        let k = o.accepted[b];
        assert!(k >= 0 && k <= v.gammas[b], "{label}");
        assert_eq!(o.emitted_count[b], k + 1, "{label}: emitted = accepted + 1");
        for j in 0..k as usize {
            assert_eq!(
                o.emitted[b * w + j],
                v.draft_tokens[b * v.gamma_max + j],
                "{label}: accepted prefix"
            );
        }
        let last = o.emitted[b * w + k as usize];
        assert!(
            last >= 0 && (last as usize) < v.vocab,
            "{label}: emitted token in range"
        );
        for j in k as usize + 1..w {
            assert_eq!(o.emitted[b * w + j], -1, "{label}: padding");
        }
    }
}

type Run<'a> = &'a dyn Fn(&VerifyBatch<'_>) -> speckv::Result<VerifyOutput>;

macro_rules! per_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn emulator() {
                ($body)(
                    &|v: &VerifyBatch<'_>| speckv::backend::emulate::verify(v, 128),
                    "emulator",
                );
            }
            /// v2 (rows in parallel, scalar walk, split draw) on a 7-SM plan.
            #[test]
            fn emulator_v2() {
                ($body)(
                    &|v: &VerifyBatch<'_>| {
                        speckv::backend::emulate::Emulator::new(32).verify_v2(v, 7)
                    },
                    "emulator_v2",
                );
            }
            #[test]
            fn cpu() {
                let c = CpuBackend::new();
                ($body)(&|v: &VerifyBatch<'_>| c.verify(v), "cpu");
            }
            #[test]
            fn cuda() {
                let Some(c) = common::cuda() else { return };
                ($body)(&|v: &VerifyBatch<'_>| c.verify(v), "cuda");
            }
            /// v1, the oracle kernel, on the device too.
            #[test]
            fn cuda_v1() {
                let Some(c) = common::cuda() else { return };
                ($body)(&|v: &VerifyBatch<'_>| c.verify_v1(v), "cuda_v1");
            }
        }
    };
}

per_backend!(
    matches_the_reference_exactly,
    |run: Run<'_>, label: &str| {
        for (k, &(batch, gmax, vocab)) in [
            (20usize, 4usize, 2usize),
            (20, 4, 33),
            (12, 8, 1000),
            (4, 3, 50_257),
        ]
        .iter()
        .enumerate()
        {
            let case = mixed_case(batch, gmax, vocab, 1000 + k as u64);
            let typed = case.typed();
            for dtype in Dtype::ALL {
                for probs in [false, true] {
                    if vocab > 2000 && dtype != Dtype::F16 {
                        continue;
                    }
                    let v = case.batch(&typed, dtype, probs);
                    let got = run(&v).unwrap();
                    let want = case.reference(&v);
                    let l = format!(
                        "{label} batch {batch} γmax {gmax} vocab {vocab} {dtype:?} probs {probs}"
                    );
                    assert_invariants(&v, &got, &l);
                    assert_same(&got, &want, &l);
                }
            }
        }
    }
);

per_backend!(
    identical_distributions_accept_everything,
    |run: Run<'_>, label: &str| {
        let (batch, gmax, vocab) = (8, 6, 500);
        let mut case = mixed_case(batch, gmax, vocab, 77);
        case.target_temp = vec![0.9; batch];
        case.draft_temp = vec![0.9; batch];
        case.gammas = vec![gmax as i32; batch];
        for b in 0..batch {
            for i in 0..gmax {
                for j in 0..vocab {
                    case.draft_logits[(b * gmax + i) * vocab + j] =
                        case.target[(b * (gmax + 1) + i) * vocab + j];
                }
            }
        }
        let typed = case.typed();
        let v = case.batch(&typed, Dtype::F32, false);
        let out = run(&v).unwrap();
        assert!(
            out.accepted.iter().all(|&k| k == gmax as i32),
            "{label}: p = q must accept every token: {:?}",
            out.accepted
        );
        // Exactly 1 where p and q come from one fused pass (v1, CPU); within rounding of 1 where
        // q comes from the draft's own log-sum-exp (v2).
        assert!(
            out.ratios.iter().all(|&r| (1.0 - r).abs() <= 1e-6),
            "{label}: {:?}",
            out.ratios
        );
        assert_same(&out, &case.reference(&v), label);
    }
);

per_backend!(
    one_hot_and_disjoint_supports,
    |run: Run<'_>, label: &str| {
        // Sequence 0: one-hot target at token 3, draft proposes 3 → accepted; then proposes 5 → rejected, emits 3.
        // Sequence 1: target mass only on {0, 1}, draft only on {2, 3}: rejected at 0, emits 0 or 1.
        let (batch, gmax, vocab) = (2, 2, 8);
        let ninf = f32::NEG_INFINITY;
        let mut target = vec![ninf; batch * (gmax + 1) * vocab];
        let mut draft = vec![ninf; batch * gmax * vocab];
        for i in 0..=gmax {
            target[i * vocab + 3] = 0.0;
            target[((gmax + 1) + i) * vocab] = 0.3;
            target[((gmax + 1) + i) * vocab + 1] = -0.2;
        }
        for i in 0..gmax {
            draft[i * vocab + 3] = 0.0;
            draft[i * vocab + 5] = 1.0;
            draft[(gmax + i) * vocab + 2] = 0.0;
            draft[(gmax + i) * vocab + 3] = 0.5;
        }
        let tokens = vec![3, 5, 2, 3];
        for seed in 0..20u64 {
            let v = VerifyBatch {
                target: LogitsData::F32(&target),
                target_stride: vocab,
                draft: DraftDist::Logits {
                    data: LogitsData::F32(&draft),
                    temperature: &[1.0, 1.0],
                },
                draft_stride: vocab,
                draft_tokens: &tokens,
                gammas: &[2, 2],
                target_temperature: &[1.0, 1.0],
                batch,
                gamma_max: gmax,
                vocab,
                seed,
                step: 0,
            };
            let o = run(&v).unwrap();
            assert_eq!(o.tokens(0), &[3, 3], "{label} seed {seed}");
            assert_eq!(o.accepted[1], 0, "{label}");
            assert!(
                matches!(o.tokens(1), [0] | [1]),
                "{label}: {:?}",
                o.tokens(1)
            );
            assert_eq!(o.ratios[2], 0.0, "{label}: disjoint supports have ratio 0");
        }
    }
);

per_backend!(
    greedy_output_is_the_target_argmax_chain,
    |run: Run<'_>, label: &str| {
        let (batch, gmax, vocab) = (5, 5, 300);
        let mut case = mixed_case(batch, gmax, vocab, 4242);
        case.target_temp = vec![0.0; batch];
        case.gammas = vec![gmax as i32; batch];
        // Sequence b drafts the target's argmax chain for b positions, then a wrong token.
        for b in 0..batch {
            for i in 0..gmax {
                let row = &case.target[(b * (gmax + 1) + i) * vocab..][..vocab];
                let a = first_argmax(row) as i32;
                case.tokens[b * gmax + i] = if i < b { a } else { (a + 7) % vocab as i32 };
            }
        }
        let typed = case.typed();
        let v = case.batch(&typed, Dtype::F32, false);
        let o = run(&v).unwrap();
        for b in 0..batch {
            let chain: Vec<i32> = (0..=b)
                .map(|i| first_argmax(&case.target[(b * (gmax + 1) + i) * vocab..][..vocab]) as i32)
                .collect();
            assert_eq!(o.tokens(b), chain.as_slice(), "{label}: sequence {b}");
            assert_eq!(o.accepted[b], b as i32);
        }
    }
);

per_backend!(
    nan_rows_are_flagged_per_sequence,
    |run: Run<'_>, label: &str| {
        let (batch, gmax, vocab) = (3, 3, 64);
        let mut case = mixed_case(batch, gmax, vocab, 5);
        case.target_temp = vec![0.0; batch];
        case.gammas = vec![3, 3, 3];
        for b in 0..batch {
            for i in 0..gmax {
                let row = &case.target[(b * (gmax + 1) + i) * vocab..][..vocab];
                case.tokens[b * gmax + i] = first_argmax(row) as i32;
            }
        }
        // Sequence 0 has a NaN in row 1 (read: all accepted). Sequence 1 rejects at 0, so its NaN in
        // row 2 is never read. Sequence 2 is clean.
        case.target[vocab + 10] = f32::NAN;
        case.tokens[gmax] = (case.tokens[gmax] + 1) % vocab as i32;
        case.target[((gmax + 1) + 2) * vocab + 4] = f32::NAN;
        let typed = case.typed();
        let v = case.batch(&typed, Dtype::F32, false);
        let o = run(&v).unwrap();
        assert_eq!(o.flags, vec![VERIFY_NONFINITE, 0, 0], "{label}");
        assert_eq!((o.emitted_count[0], o.accepted[0]), (0, 0));
        assert!(o.emitted[..gmax + 1].iter().all(|&t| t == -1));
        assert_eq!(o.accepted[1], 0);
        assert_eq!(o.accepted[2], 3);
    }
);

per_backend!(bad_input_is_a_typed_error, |run: Run<'_>, label: &str| {
    let case = mixed_case(2, 2, 10, 1);
    let typed = case.typed();
    let good = case.batch(&typed, Dtype::F32, false);
    assert!(run(&good).is_ok(), "{label}");
    let bad_tokens = [0, 10, 1, 2];
    let v = VerifyBatch {
        draft_tokens: &bad_tokens,
        gammas: &[2, 2],
        ..good
    };
    assert!(
        matches!(
            run(&v),
            Err(Error::BadToken {
                seq: 0,
                pos: 1,
                token: 10,
                vocab: 10
            })
        ),
        "{label}"
    );
    let v = VerifyBatch {
        gammas: &[3, 0],
        ..good
    };
    assert!(
        matches!(
            run(&v),
            Err(Error::BadGamma {
                seq: 0,
                gamma: 3,
                max: 2
            })
        ),
        "{label}"
    );
    let v = VerifyBatch {
        target_temperature: &[-1.0, 1.0],
        ..good
    };
    assert!(matches!(run(&v), Err(Error::BadTemperature(_))), "{label}");
    let v = VerifyBatch {
        target: LogitsData::F32(&case.target[1..]),
        ..good
    };
    assert!(
        matches!(
            run(&v),
            Err(Error::Length {
                what: "target logits",
                ..
            })
        ),
        "{label}"
    );
    let v = VerifyBatch {
        gammas: &[1],
        ..good
    };
    assert!(
        matches!(run(&v), Err(Error::Length { what: "gammas", .. })),
        "{label}"
    );
    let v = VerifyBatch {
        draft: DraftDist::Logits {
            data: LogitsData::F16(&typed.d16),
            temperature: &case.draft_temp,
        },
        ..good
    };
    assert!(
        run(&v).unwrap_err().to_string().contains("dtype"),
        "{label}"
    );
    let v = VerifyBatch {
        draft: DraftDist::Probs(&case.draft_probs[..5]),
        ..good
    };
    assert!(
        matches!(
            run(&v),
            Err(Error::Length {
                what: "draft probabilities",
                ..
            })
        ),
        "{label}"
    );
});

per_backend!(
    greedy_draft_is_one_hot_at_its_own_token,
    |run: Run<'_>, label: &str| {
        // The draft rows tie tokens 0 and 1 at their max; the engine's greedy draft picked 1 (its
        // tie-break), the lowest-index argmax is 0. A greedy draft proposed 1 with certainty, so
        // q = δ₁ and position 0 accepts with probability p(1) ≈ 0.035. (Making q one-hot at the
        // row's argmax instead gave q(1) = 0, ratio 1: every token accepted.)
        let (batch, gmax, vocab) = (512, 1, 4);
        let target: Vec<f32> = (0..batch)
            .flat_map(|_| [2.0f32, -1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
            .collect();
        let draft: Vec<f32> = (0..batch).flat_map(|_| [3.0f32, 3.0, 0.0, 0.0]).collect();
        let (tokens, gammas) = (vec![1; batch], vec![1; batch]);
        let (tt, td) = (vec![1.0f32; batch], vec![0.0f32; batch]);
        let v = VerifyBatch {
            target: LogitsData::F32(&target),
            target_stride: vocab,
            draft: DraftDist::Logits {
                data: LogitsData::F32(&draft),
                temperature: &td,
            },
            draft_stride: vocab,
            draft_tokens: &tokens,
            gammas: &gammas,
            target_temperature: &tt,
            batch,
            gamma_max: gmax,
            vocab,
            seed: 17,
            step: 3,
        };
        let o = run(&v).unwrap();
        let p1 = softmax64(&[2.0, -1.0, 0.0, 0.5], 1.0)[1];
        assert!(o.flags.iter().all(|&f| f == 0), "{label}");
        for b in 0..batch {
            assert!(
                common::close(o.ratios[b] as f64, p1, 1e-5, 1e-7),
                "{label}: {}",
                o.ratios[b]
            );
        }
        let rate = o.accepted.iter().sum::<i32>() as f64 / batch as f64;
        // 512 draws at p ≈ 0.035: mean 18, σ ≈ 4.2.
        assert!(
            (0.01..0.07).contains(&rate),
            "{label}: acceptance {rate}, p(1) = {p1}"
        );
        // A rejected position emits from the residual p − δ₁: never token 1.
        for b in 0..batch {
            if o.accepted[b] == 0 {
                assert_ne!(o.tokens(b), &[1], "{label}");
            }
        }
    }
);

per_backend!(
    probabilities_that_are_not_finite_fail_closed,
    |run: Run<'_>, label: &str| {
        let (gmax, vocab) = (1, 8);
        // Draft probabilities, drafted token 2; the target gives it ≈ 5e-5, so position 0 is
        // rejected and the residual pass reads every q_j.
        let base = [0.05f32, 0.05, 0.8, 0.02, 0.02, 0.02, 0.02, 0.02];
        let mut q: Vec<[f32; 8]> = vec![base; 5];
        q[0][5] = f32::NAN; // a NaN read only by the residual pass
        q[1][5] = -0.5; // a negative probability
        q[2][2] = 0.0; // the draft gave its own token probability 0
        q[3][2] = 1.5; // a probability above 1
        let batch = q.len();
        let probs: Vec<f32> = q.iter().flatten().copied().collect();
        let target: Vec<f32> = (0..batch)
            .flat_map(|_| {
                let mut r = [0.0f32; 16];
                r[0] = 5.0;
                r[2] = -5.0;
                r
            })
            .collect();
        let v = VerifyBatch {
            target: LogitsData::F32(&target),
            target_stride: vocab,
            draft: DraftDist::Probs(&probs),
            draft_stride: vocab,
            draft_tokens: &[2; 5],
            gammas: &[1; 5],
            target_temperature: &[1.0; 5],
            batch,
            gamma_max: gmax,
            vocab,
            seed: 5,
            step: 0,
        };
        let o = run(&v).unwrap();
        assert_eq!(
            o.flags,
            vec![
                VERIFY_NONFINITE,
                VERIFY_NONFINITE,
                VERIFY_BAD_DRAFT,
                VERIFY_NONFINITE,
                0
            ],
            "{label}"
        );
        assert_eq!(o.emitted_count, vec![0, 0, 0, 0, 1], "{label}");
        assert_eq!(
            o.accepted[4], 0,
            "{label}: the clean sequence rejects token 2"
        );
        assert!((0..4).all(|b| o.tokens(b).is_empty()));
        // Logits whose x / T overflows under a tiny (but normal) temperature: flagged, not NaN.
        let target = [40.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let draft = [0.0f32, 0.0, 0.0, 0.0];
        let v = VerifyBatch {
            target: LogitsData::F32(&target),
            target_stride: 4,
            draft: DraftDist::Logits {
                data: LogitsData::F32(&draft),
                temperature: &[1.0],
            },
            draft_stride: 4,
            draft_tokens: &[0],
            gammas: &[1],
            target_temperature: &[1e-37],
            batch: 1,
            gamma_max: 1,
            vocab: 4,
            seed: 0,
            step: 0,
        };
        let o = run(&v).unwrap();
        assert_eq!(
            (o.flags[0], o.emitted_count[0]),
            (VERIFY_NONFINITE, 0),
            "{label}"
        );
        // Below f32::MIN_POSITIVE, 1/T is not finite: a typed error before any launch.
        let v = VerifyBatch {
            target_temperature: &[1e-39],
            ..v
        };
        assert!(
            matches!(run(&v), Err(Error::BadTemperature(t)) if t == 1e-39),
            "{label}"
        );
    }
);

// ---------------------------------------------------------------------------------------------

/// At GPU precision (`ex2` / `lg2` / `rcp` as `.approx.ftz`, within their error bounds) the kernel
/// decides as the float64 reference does, except where a uniform falls within 1e-4 of the
/// acceptance ratio — the only place precision can legitimately flip a decision.
#[test]
fn emulator_at_gpu_precision_decides_like_the_reference_away_from_thresholds() {
    let (mut compared, mut near) = (0, 0);
    for seed in 0..3u64 {
        let case = mixed_case(24, 4, 1000, 500 + seed);
        let typed = case.typed();
        for dtype in [Dtype::F32, Dtype::F16] {
            for probs in [false, true] {
                let v = case.batch(&typed, dtype, probs);
                let got = speckv::backend::emulate::Emulator::new(128)
                    .gpu_math(seed)
                    .verify(&v)
                    .unwrap();
                let want = case.reference(&v);
                assert_invariants(&v, &got, "gpu math");
                let w = case.gmax + 1;
                for b in 0..case.batch {
                    compared += 1;
                    let same = got.accepted[b] == want.accepted[b]
                        && got.emitted[b * w..(b + 1) * w] == want.emitted[b * w..(b + 1) * w]
                        && got.flags[b] == want.flags[b];
                    if same {
                        continue;
                    }
                    // The first position where one accepted and the other rejected.
                    let i = got.accepted[b].min(want.accepted[b]) as usize;
                    let useed = philox::derive(case.seed, philox::PURPOSE_ACCEPT, 0);
                    let u =
                        philox::uniform_open(philox::bits(useed, i as u32, b as u32, case.step));
                    let r = want.ratios[b * case.gmax + i];
                    assert!(
                        got.accepted[b] != want.accepted[b] && (u - r).abs() < 1e-4,
                        "seed {seed} {dtype:?} probs {probs} sequence {b}: {:?} vs {:?} (u {u}, ratio {r})",
                        &got.emitted[b * w..(b + 1) * w],
                        &want.emitted[b * w..(b + 1) * w]
                    );
                    near += 1;
                }
            }
        }
    }
    assert!(
        near * 50 < compared,
        "{near} of {compared} sequences differ"
    );
}

/// v2 against v1 and the reference on several plans (1 to 132 SMs: one block per row up to many),
/// awkward vocabularies (rows not 16-byte aligned) and every dtype; device-written γ, tokens and
/// temperatures flagged as v1 flags them.
#[test]
fn emulator_v2_matches_v1_and_the_reference() {
    for (k, &(batch, gmax, vocab)) in [(6usize, 3usize, 33usize), (5, 4, 1000), (3, 2, 4099)]
        .iter()
        .enumerate()
    {
        let case = mixed_case(batch, gmax, vocab, 2000 + k as u64);
        let typed = case.typed();
        for dtype in Dtype::ALL {
            for probs in [false, true] {
                let v = case.batch(&typed, dtype, probs);
                let want = case.reference(&v);
                let v1 = speckv::backend::emulate::verify(&v, 64).unwrap();
                for sms in [1u32, 13, 132] {
                    let l = format!("v2 sms {sms} vocab {vocab} {dtype:?} probs {probs}");
                    let got = speckv::backend::emulate::Emulator::new(32)
                        .verify_v2(&v, sms)
                        .unwrap();
                    assert_invariants(&v, &got, &l);
                    assert_same(&got, &want, &l);
                    assert_same(&got, &v1, &format!("{l} vs v1"));
                }
            }
        }
    }
    let case = mixed_case(3, 2, 10, 9);
    let typed = case.typed();
    let good = case.batch(&typed, Dtype::F32, false);
    let tokens = [0, 1, -3, 1, 4, 5];
    let v = VerifyBatch {
        gammas: &[7, 2, 2],
        draft_tokens: &tokens,
        target_temperature: &[1.0, 1.0, 1e-39],
        ..good
    };
    let o = speckv::backend::emulate::Emulator::new(32)
        .verify_v2_unchecked_values(&v, 5)
        .unwrap();
    assert_eq!(
        o.flags,
        vec![VERIFY_BAD_GAMMA, VERIFY_BAD_TOKEN, VERIFY_BAD_TEMPERATURE]
    );
    assert_eq!(o.emitted_count, vec![0, 0, 0]);
}

/// A temperature the host never saw (written on the device) is flagged by the kernel itself.
#[test]
fn emulator_kernel_flags_a_subnormal_temperature() {
    let case = mixed_case(3, 2, 10, 9);
    let typed = case.typed();
    let good = case.batch(&typed, Dtype::F32, false);
    let temps = [1e-39f32, 1.0, f32::NAN];
    let v = VerifyBatch {
        target_temperature: &temps,
        ..good
    };
    assert!(matches!(v.validate(), Err(Error::BadTemperature(_))));
    let o = speckv::backend::emulate::verify_unchecked_values(&v, 64).unwrap();
    assert_eq!(
        o.flags,
        vec![VERIFY_BAD_TEMPERATURE, 0, VERIFY_BAD_TEMPERATURE]
    );
    assert_eq!(o.emitted_count[0], 0);
}

// ---------------------------------------------------------------------------------------------

/// γ_b and draft tokens written on the device (by the controller) bypass host validation; the
/// kernel itself flags them.
#[test]
fn emulator_kernel_flags_device_written_gamma_and_tokens() {
    let case = mixed_case(3, 2, 10, 9);
    let typed = case.typed();
    let good = case.batch(&typed, Dtype::F32, false);
    let tokens = [0, 1, -3, 1, 4, 5];
    let v = VerifyBatch {
        gammas: &[7, 2, 2],
        draft_tokens: &tokens,
        ..good
    };
    let o = speckv::backend::emulate::verify_unchecked_values(&v, 64).unwrap();
    assert_eq!(o.flags, vec![VERIFY_BAD_GAMMA, VERIFY_BAD_TOKEN, 0]);
    assert_eq!(&o.emitted_count[..2], &[0, 0]);
    assert_eq!(o.emitted_count[2], o.accepted[2] + 1);
}

#[test]
fn emulator_every_block_size_gives_the_same_decisions() {
    let case = mixed_case(10, 4, 777, 31);
    let typed = case.typed();
    let v = case.batch(&typed, Dtype::Bf16, false);
    let want = case.reference(&v);
    for block in [32u32, 64, 96, 128, 256, 512, 1024] {
        let got = speckv::backend::emulate::verify(&v, block).unwrap();
        assert_same(&got, &want, &format!("block {block}"));
    }
}

/// Losslessness: for several (p, q) pairs and V from 2 to 64, the emitted token at every position
/// follows p exactly (χ² over ≥ 10⁶ sequences, tail 1e-4) and position 0 accepts with
/// probability Σ min(p, q).
#[test]
fn cpu_emitted_tokens_follow_the_target_chi_square() {
    let cpu = Backend::Cpu(CpuBackend::new());
    let n = 1_000_000u64;
    let normalise = |v: Vec<f64>| -> Vec<f64> {
        let s: f64 = v.iter().sum();
        v.into_iter().map(|x| x / s).collect()
    };
    let flat = |v: usize| vec![1.0 / v as f64; v];
    let peaked =
        |v: usize, at: usize| normalise((0..v).map(|j| if j == at { 50.0 } else { 1.0 }).collect());
    let mut cases: Vec<(&str, verify_sim::Dists, verify_sim::Dists)> = Vec::new();
    // q = p
    let p = peaked(8, 2);
    cases.push((
        "q = p",
        vec![p.clone(), p.clone(), p.clone()],
        vec![p.clone(), p.clone()],
    ));
    // disjoint supports (V = 4)
    let pa = normalise(vec![1.0, 3.0, 0.0, 0.0]);
    let qa = normalise(vec![0.0, 0.0, 2.0, 1.0]);
    cases.push(("disjoint", vec![pa.clone(), pa.clone()], vec![qa.clone()]));
    // q with zeros where p > 0 (V = 16)
    let p16 = normalise((1..=16).map(|j| j as f64).collect());
    let q16 = normalise(
        (0..16)
            .map(|j| {
                if j % 3 == 0 {
                    0.0
                } else {
                    1.0 + (j % 5) as f64
                }
            })
            .collect(),
    );
    cases.push((
        "q zeros",
        vec![p16.clone(), peaked(16, 9), p16.clone()],
        vec![q16.clone(), q16.clone()],
    ));
    // peaked vs flat, V = 64, γ = 3
    cases.push((
        "peaked/flat",
        vec![peaked(64, 5), flat(64), peaked(64, 40), flat(64)],
        vec![flat(64), peaked(64, 5), peaked(64, 40)],
    ));
    // V = 2
    cases.push((
        "V = 2",
        vec![vec![0.3, 0.7], vec![0.9, 0.1]],
        vec![vec![0.8, 0.2]],
    ));
    for (name, target, draft) in cases {
        let r =
            verify_sim::run(&cpu, &target, &draft, n, 2024, SimMode::Stochastic, 65_536).unwrap();
        for i in 0..target.len() {
            let crit = verify_sim::chi2_critical_1e4(r.chi2_dof[i]);
            if i == 0 {
                assert_eq!(
                    r.reached[0], n,
                    "{name}: every sequence emits at position 0"
                );
            }
            if r.reached[i] == 0 {
                continue; // never reached (disjoint supports reject every draft)
            }
            assert!(
                r.chi2[i] < crit,
                "{name} position {i}: χ² {} ≥ {crit} (dof {}), counts {:?}",
                r.chi2[i],
                r.chi2_dof[i],
                r.counts[i]
            );
        }
        let want = r.expected_accepted_first;
        let got = r.accepted_first as f64 / n as f64;
        let sigma = (want * (1.0 - want) / n as f64).sqrt().max(1e-9);
        assert!(
            (got - want).abs() < 5.0 * sigma + 1e-12,
            "{name}: acceptance {got} vs Σ min(p, q) = {want}"
        );
    }
}

/// The emulator runs the kernel's own source through the same simulation: identical counts to
/// the CPU backend for the same seed.
#[test]
fn emulator_simulation_counts_equal_the_cpu_backend() {
    let (target, draft) = verify_sim::dirichlet_pair(12, 3, 8).unwrap();
    let cpu = verify_sim::run(
        &Backend::Cpu(CpuBackend::new()),
        &target,
        &draft,
        3000,
        8,
        SimMode::Stochastic,
        1000,
    )
    .unwrap();
    // The emulator as a backend: run the same batches through speckv::backend::emulate::verify.
    let mut counts = vec![vec![0u64; 12]; 4];
    let mut step = 0u64;
    let mut done = 0;
    while done < 3000 {
        let n = 1000;
        let t_row: Vec<f32> = target.iter().flatten().map(|&p| p.ln() as f32).collect();
        let q_row: Vec<f32> = draft.iter().flatten().map(|&p| p as f32).collect();
        let tl: Vec<f32> = (0..n).flat_map(|_| t_row.iter().copied()).collect();
        let qp: Vec<f32> = (0..n).flat_map(|_| q_row.iter().copied()).collect();
        let mut tokens = vec![0i32; n * 3];
        for i in 0..3 {
            let dseed = philox::derive(8, philox::PURPOSE_DRAFT, i as u32);
            for b in 0..n {
                let u = philox::uniform_open(philox::bits(dseed, b as u32, 0, step)) as f64;
                let mut c = 0.0;
                let mut x = 11;
                for (j, p) in draft[i].iter().enumerate() {
                    c += p;
                    if u < c {
                        x = j;
                        break;
                    }
                }
                tokens[b * 3 + i] = x as i32;
            }
        }
        let v = VerifyBatch {
            target: LogitsData::F32(&tl),
            target_stride: 12,
            draft: DraftDist::Probs(&qp),
            draft_stride: 12,
            draft_tokens: &tokens,
            gammas: &vec![3; n],
            target_temperature: &vec![1.0; n],
            batch: n,
            gamma_max: 3,
            vocab: 12,
            seed: 8,
            step,
        };
        let o = speckv::backend::emulate::verify(&v, 32).unwrap();
        for b in 0..n {
            for (i, &t) in o.tokens(b).iter().enumerate() {
                counts[i][t as usize] += 1;
            }
        }
        done += n;
        step += 1;
    }
    assert_eq!(counts, cpu.counts);
}

#[test]
fn verify_sim_cli_prints_the_documented_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args([
            "--backend",
            "cpu",
            "verify-sim",
            "--vocab",
            "6",
            "--gamma",
            "2",
            "--samples",
            "5000",
            "--seed",
            "1",
            "--mode",
            "stochastic",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vocab"], 6);
    assert_eq!(v["gamma"], 2);
    assert_eq!(v["samples"], 5000);
    assert_eq!(v["target"].as_array().unwrap().len(), 3);
    assert_eq!(v["draft"].as_array().unwrap().len(), 2);
    let counts = v["counts"].as_array().unwrap();
    assert_eq!(counts.len(), 3);
    let first: u64 = counts[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(first, 5000, "every sequence emits at position 0");
    assert!(v["accepted_first"].as_u64().unwrap() <= 5000);
}

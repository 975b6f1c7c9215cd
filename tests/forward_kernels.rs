//! The forward-pass kernels (`embed`, `rms_norm`, `qkv_rope`, `attention`, `silu_mul`) on the
//! emulator — their own source, sanitizer on, several schedules — against float64 references
//! written here, at every block size 32..1024 where the kernel takes a block size, over awkward
//! shapes; and the inputs each refuses.

mod common;

use half::f16;
use speckv::backend::emulate::Emulator;
use speckv::backend::forward::Heads;
use speckv::Error;

const BLOCKS: [u32; 6] = [32, 64, 128, 256, 512, 1024];

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    common::close(a, b, rel, abs)
}

/// f16 bits of values on a coarse grid (exact in f16).
fn f16_grid(n: usize, seed: u64) -> Vec<u16> {
    common::grid_logits(n, seed)
        .iter()
        .map(|&v| f16::from_f32(v * 0.5).to_bits())
        .collect()
}

fn h(b: u16) -> f64 {
    f16::from_bits(b).to_f64()
}

// ---- embed ------------------------------------------------------------------------------------

#[test]
fn embed_copies_the_token_rows_exactly() {
    for hidden in [8usize, 64, 72] {
        let vocab = 37;
        let table = f16_grid(vocab * hidden, hidden as u64);
        let tokens = [0u32, 36, 5, 5, 17];
        for block in [32, 128, 1024] {
            let x = Emulator::new(block).embed(&table, hidden, &tokens).unwrap();
            for (i, &t) in tokens.iter().enumerate() {
                for k in 0..hidden {
                    assert_eq!(
                        x[i * hidden + k] as f64,
                        h(table[t as usize * hidden + k]),
                        "hidden {hidden}, block {block}, row {i}, element {k}"
                    );
                }
            }
        }
    }
}

#[test]
fn embed_refuses_bad_tokens_and_widths() {
    let table = f16_grid(10 * 8, 1);
    let e = Emulator::new(64);
    assert!(
        e.embed(&table, 8, &[10]).is_err(),
        "token past the vocabulary"
    );
    assert!(matches!(e.embed(&table, 8, &[]), Err(Error::Empty { .. })));
    assert!(matches!(
        e.embed(&table[..60], 12, &[0]),
        Err(Error::Unsupported(_))
    ));
}

// ---- rms_norm ---------------------------------------------------------------------------------

/// (x + r in f32, its RMSNorm in f64).
fn rms_reference(x: &[f32], r: Option<&[f32]>, w: &[f32], eps: f32) -> (Vec<f32>, Vec<f64>) {
    let hidden = w.len();
    let xs: Vec<f32> = match r {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    let mut out = Vec::new();
    for row in xs.chunks(hidden) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v as f64 * s * g as f64));
    }
    (xs, out)
}

#[test]
fn rms_norm_matches_the_f64_reference_at_every_block_size() {
    for (hidden, rows) in [(4usize, 1usize), (64, 3), (68, 2), (1536, 2)] {
        let x = common::normal_logits(rows * hidden, 2.0, hidden as u64);
        let r = common::normal_logits(rows * hidden, 0.5, 7 + hidden as u64);
        let w = common::normal_logits(hidden, 1.0, 9 + hidden as u64);
        for residual in [false, true] {
            let rr = residual.then_some(r.as_slice());
            let (want_x, want) = rms_reference(&x, rr, &w, 1e-5);
            for block in BLOCKS {
                let (got_x, got) = Emulator::new(block).rms_norm(&x, rr, &w, 1e-5).unwrap();
                assert_eq!(got_x, want_x, "the residual add is one f32 add per element");
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        close(g as f64, e, 2e-6, 1e-6),
                        "hidden {hidden}, block {block}, residual {residual}, [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_refuses_bad_input() {
    let e = Emulator::new(64);
    let w = vec![1.0f32; 8];
    let x = vec![1.0f32; 16];
    assert!(matches!(
        e.rms_norm(&x, None, &w[..6], 1e-5),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        e.rms_norm(&x[..12], None, &w, 1e-5),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        e.rms_norm(&x, Some(&x[..8]), &w, 1e-5),
        Err(Error::Length { .. })
    ));
    assert!(e.rms_norm(&x, None, &w, f32::NAN).is_err());
    assert!(matches!(
        Emulator::new(48).rms_norm(&x, None, &w, 1e-5),
        Err(Error::BadBlockSize(48))
    ));
}

// ---- silu_mul ---------------------------------------------------------------------------------

#[test]
fn silu_mul_matches_the_f64_reference() {
    for (ffn, m) in [(4usize, 1usize), (128, 3), (36, 16)] {
        let gu = common::normal_logits(m * 2 * ffn, 3.0, ffn as u64);
        for (label, e) in [
            ("exact", Emulator::new(64)),
            ("gpu math", Emulator::new(256).gpu_math(3)),
        ] {
            let got = e.silu_mul(&gu, ffn).unwrap();
            for i in 0..m {
                for j in 0..ffn {
                    let g = gu[i * 2 * ffn + j] as f64;
                    let u = gu[i * 2 * ffn + ffn + j] as f64;
                    let want = g / (1.0 + (-g).exp()) * u;
                    let v = got[i * ffn + j] as f64;
                    assert!(
                        close(v, want, 1e-5, 1e-6),
                        "{label} ffn {ffn} [{i},{j}]: {v} vs {want}"
                    );
                }
            }
        }
    }
    assert!(matches!(
        Emulator::new(64).silu_mul(&[0.0; 12], 6),
        Err(Error::Unsupported(_))
    ));
}

// ---- qkv_rope ---------------------------------------------------------------------------------

/// A rotary table of `positions × hd/2` (cos, sin) pairs, f64 angles as the model computes them.
fn rope_table(positions: usize, hd: usize) -> Vec<[f32; 2]> {
    let mut t = Vec::new();
    for p in 0..positions {
        for j in 0..hd / 2 {
            let th = p as f64 * 10_000f64.powf(-2.0 * j as f64 / hd as f64);
            t.push([th.cos() as f32, th.sin() as f32]);
        }
    }
    t
}

const SHAPES: [(usize, usize, usize); 5] =
    [(4, 2, 16), (2, 1, 64), (14, 2, 64), (2, 2, 128), (2, 1, 8)];

#[test]
fn qkv_rope_rotates_and_appends_like_the_reference() {
    for (heads, kv_heads, hd) in SHAPES {
        let s = Heads {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let (qkvw, kvw, half) = (s.qkv_width(), s.kv_width(), hd / 2);
        let capacity = 24;
        let rope = rope_table(capacity, hd);
        for (m, len) in [(1usize, 0usize), (3, 5), (16, 8)] {
            let qkv = common::normal_logits(m * qkvw, 1.0, (heads * 31 + m) as u64);
            let bias = common::normal_logits(qkvw, 0.25, hd as u64);
            for neox in [false, true] {
                for with_bias in [false, true] {
                    let b = with_bias.then_some(bias.as_slice());
                    let k0 = f16_grid(capacity * kvw, 3);
                    let v0 = f16_grid(capacity * kvw, 4);
                    let (mut k, mut v) = (k0.clone(), v0.clone());
                    let q = Emulator::new(128)
                        .qkv_rope(&qkv, b, &rope, s, neox, len, &mut k, &mut v)
                        .unwrap();
                    let val = |i: usize, c: usize| {
                        qkv[i * qkvw + c] as f64 + b.map(|b| b[c] as f64).unwrap_or(0.0)
                    };
                    for i in 0..m {
                        let pos = len + i;
                        for head in 0..heads + kv_heads {
                            for j in 0..half {
                                let (a, bb) = if neox {
                                    (j, j + half)
                                } else {
                                    (2 * j, 2 * j + 1)
                                };
                                let [c, sn] = rope[pos * half + j];
                                let (x0, x1) = (val(i, head * hd + a), val(i, head * hd + bb));
                                let y0 = x0 * c as f64 - x1 * sn as f64;
                                let y1 = x0 * sn as f64 + x1 * c as f64;
                                let (g0, g1) = if head < heads {
                                    let at = (i * heads + head) * hd;
                                    (q[at + a] as f64, q[at + bb] as f64)
                                } else {
                                    let at = pos * kvw + (head - heads) * hd;
                                    (h(k[at + a]), h(k[at + bb]))
                                };
                                let tol = if head < heads { 1e-6 } else { 1e-3 };
                                assert!(
                                    close(g0, y0, tol, 1e-6) && close(g1, y1, tol, 1e-6),
                                    "{s:?} m {m} len {len} neox {neox} head {head} pair {j}"
                                );
                            }
                        }
                        for e in 0..kvw {
                            let want = val(i, (heads + kv_heads) * hd + e);
                            assert!(close(h(v[pos * kvw + e]), want, 1e-3, 1e-6));
                        }
                    }
                    // Rows outside the step are untouched.
                    for p in (0..capacity).filter(|&p| p < len || p >= len + m) {
                        assert_eq!(k[p * kvw..(p + 1) * kvw], k0[p * kvw..(p + 1) * kvw]);
                        assert_eq!(v[p * kvw..(p + 1) * kvw], v0[p * kvw..(p + 1) * kvw]);
                    }
                }
            }
        }
    }
}

#[test]
fn qkv_rope_refuses_a_step_past_the_cache() {
    let s = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
    };
    let rope = rope_table(8, 16);
    let qkv = vec![0f32; 2 * s.qkv_width()];
    let (mut k, mut v) = (vec![0u16; 8 * 32], vec![0u16; 8 * 32]);
    let e = Emulator::new(64);
    assert!(e
        .qkv_rope(&qkv, None, &rope, s, false, 7, &mut k, &mut v)
        .is_err());
    assert!(e
        .qkv_rope(&qkv, None, &rope[..8 * 6], s, false, 5, &mut k, &mut v)
        .is_err());
    let bad = Heads {
        heads: 3,
        kv_heads: 2,
        head_dim: 16,
    };
    assert!(matches!(
        e.qkv_rope(&qkv, None, &rope, bad, false, 0, &mut k, &mut v),
        Err(Error::Unsupported(_))
    ));
}

// ---- attention --------------------------------------------------------------------------------

/// Causal GQA in f64: query i (position len + i) over cache rows 0..=len + i.
fn attention_reference(q: &[f32], k: &[u16], v: &[u16], s: Heads, len: usize) -> Vec<f64> {
    let (hd, kvw) = (s.head_dim, s.kv_width());
    let m = q.len() / s.q_width();
    let group = s.heads / s.kv_heads;
    let mut out = vec![0f64; q.len()];
    for i in 0..m {
        for hh in 0..s.heads {
            let kvh = hh / group;
            let qv = &q[(i * s.heads + hh) * hd..][..hd];
            let n = len + i + 1;
            let sc: Vec<f64> = (0..n)
                .map(|p| {
                    (0..hd)
                        .map(|e| qv[e] as f64 * h(k[p * kvw + kvh * hd + e]))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
            for e in 0..hd {
                out[(i * s.heads + hh) * hd + e] = (0..n)
                    .map(|p| (sc[p] - mx).exp() / z * h(v[p * kvw + kvh * hd + e]))
                    .sum();
            }
        }
    }
    out
}

#[test]
fn attention_matches_the_f64_reference() {
    for (heads, kv_heads, hd) in SHAPES.iter().copied().chain([(2, 1, 256), (2, 2, 32)]) {
        let s = Heads {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let capacity = 64;
        let k = f16_grid(capacity * s.kv_width(), hd as u64);
        let v = f16_grid(capacity * s.kv_width(), 1 + hd as u64);
        for (m, len) in [(1usize, 0usize), (3, 7), (16, 40)] {
            let q = common::normal_logits(m * s.q_width(), 1.0, (m + len) as u64);
            let want = attention_reference(&q, &k, &v, s, len);
            for block in BLOCKS {
                let got = Emulator::new(block).attention(&q, &k, &v, s, len).unwrap();
                for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        close(g as f64, w, 1e-5, 1e-6),
                        "{s:?} m {m} len {len} block {block} [{j}]: {g} vs {w}"
                    );
                }
            }
            // The GPU's ex2.approx stays close.
            let got = Emulator::new(128)
                .gpu_math(5)
                .attention(&q, &k, &v, s, len)
                .unwrap();
            for (&g, &w) in got.iter().zip(&want) {
                assert!(close(g as f64, w, 1e-4, 1e-5));
            }
        }
    }
}

#[test]
fn attention_refuses_bad_shapes() {
    let e = Emulator::new(128);
    let s = Heads {
        heads: 2,
        kv_heads: 1,
        head_dim: 48,
    };
    let q = vec![0f32; 2 * 48];
    let k = vec![0u16; 8 * 48];
    assert!(matches!(
        e.attention(&q, &k, &k, s, 0),
        Err(Error::Unsupported(_))
    ));
    let s = Heads {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let q = vec![0f32; 2 * 32];
    let k = vec![0u16; 8 * 16];
    assert!(
        e.attention(&q, &k, &k, s, 7).is_err(),
        "len + m past the cache"
    );
    assert!(e.attention(&q[..31], &k, &k, s, 0).is_err());
}

/// v2 splits each pair's cache positions across blocks: against the same f64 reference, at plans
/// for 1, 7 and 132 SMs (1 to 32 splits, so some splits are empty at short lengths), every block
/// size, and within float rounding of v1.
#[test]
fn attention_v2_matches_the_reference_at_every_split() {
    for (heads, kv_heads, hd) in [(4, 2, 16), (14, 2, 64), (2, 2, 128), (2, 1, 256)] {
        let s = Heads {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let capacity = 80;
        let k = f16_grid(capacity * s.kv_width(), 7 + hd as u64);
        let v = f16_grid(capacity * s.kv_width(), 8 + hd as u64);
        for (m, len) in [(1usize, 0usize), (1, 63), (5, 20), (16, 60)] {
            let q = common::normal_logits(m * s.q_width(), 1.0, (3 * m + len) as u64);
            let want = attention_reference(&q, &k, &v, s, len);
            let v1 = Emulator::new(128).attention(&q, &k, &v, s, len).unwrap();
            for (sms, block) in [(1u32, 32u32), (7, 128), (132, 1024), (132, 64)] {
                let got = Emulator::new(block)
                    .attention_v2(&q, &k, &v, s, len, sms)
                    .unwrap();
                for (j, ((&g, &w), &o)) in got.iter().zip(&want).zip(&v1).enumerate() {
                    assert!(
                        close(g as f64, w, 1e-5, 1e-6) && close(g as f64, o as f64, 1e-5, 1e-6),
                        "{s:?} m {m} len {len} sms {sms} block {block} [{j}]: {g} vs {w} (v1 {o})"
                    );
                }
            }
        }
    }
    let (_, splits, _) = speckv::plan::attention_v2(1, 12, 128, 128, 132).unwrap();
    assert_eq!(
        splits, 22,
        "12 heads at batch 1 get 22 splits: 264 blocks = 2 per SM"
    );
}

// ---- batches ----------------------------------------------------------------------------------

/// A batch of sequences at different cache lengths, m positions each: `qkv_rope` writes every
/// sequence's q rows and cache rows exactly as a launch of that sequence alone does, and
/// `attention_v2` over the batch matches the v1 oracle run per sequence (and the f64 reference),
/// with the caches laid one after another and the lengths read per sequence.
#[test]
fn batched_qkv_rope_and_attention_equal_each_sequence_alone() {
    for (heads, kv_heads, hd) in [(4, 2, 16), (14, 2, 64), (2, 1, 256)] {
        let s = Heads {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let (qkvw, qw, kvw) = (s.qkv_width(), s.q_width(), s.kv_width());
        let capacity = 64;
        let rope = rope_table(capacity, hd);
        for (m, lens) in [
            (2usize, vec![0usize, 9, 30]),
            (4, vec![5, 5, 1, 60]),
            (1, vec![63, 0]),
            (16, vec![3]),
        ] {
            let seqs = lens.len();
            let ctx = format!("{s:?} m {m} lens {lens:?}");
            let qkv = common::normal_logits(seqs * m * qkvw, 1.0, (hd + m) as u64);
            let bias = common::normal_logits(qkvw, 0.25, 5);
            let k0 = f16_grid(seqs * capacity * kvw, 11);
            let v0 = f16_grid(seqs * capacity * kvw, 12);
            let e = Emulator::new(128);
            let (mut kb, mut vb) = (k0.clone(), v0.clone());
            let qb = e
                .qkv_rope_batch(&qkv, Some(&bias), &rope, s, true, &lens, &mut kb, &mut vb)
                .unwrap();
            for (b, &len) in lens.iter().enumerate() {
                let cache = b * capacity * kvw..(b + 1) * capacity * kvw;
                let (mut k, mut v) = (k0[cache.clone()].to_vec(), v0[cache.clone()].to_vec());
                let rows = &qkv[b * m * qkvw..(b + 1) * m * qkvw];
                let q = e
                    .qkv_rope(rows, Some(&bias), &rope, s, true, len, &mut k, &mut v)
                    .unwrap();
                assert_eq!(&qb[b * m * qw..(b + 1) * m * qw], &q[..], "{ctx}: q of {b}");
                assert_eq!(&kb[cache.clone()], &k[..], "{ctx}: k cache of {b}");
                assert_eq!(&vb[cache.clone()], &v[..], "{ctx}: v cache of {b}");
            }
            // Attention over the caches just written.
            for (sms, block) in [(1u32, 32u32), (132, 128), (7, 1024)] {
                let got = Emulator::new(block)
                    .attention_v2_batch(&qb, &kb, &vb, s, &lens, sms)
                    .unwrap();
                for (b, &len) in lens.iter().enumerate() {
                    let cache = b * capacity * kvw..(b + 1) * capacity * kvw;
                    let q = &qb[b * m * qw..(b + 1) * m * qw];
                    let (k, v) = (&kb[cache.clone()], &vb[cache]);
                    let oracle = Emulator::new(128).attention(q, k, v, s, len).unwrap();
                    let want = attention_reference(q, k, v, s, len);
                    let mine = &got[b * m * qw..(b + 1) * m * qw];
                    for (j, ((&g, &o), &w)) in mine.iter().zip(&oracle).zip(&want).enumerate() {
                        assert!(
                            close(g as f64, o as f64, 1e-5, 1e-6) && close(g as f64, w, 1e-5, 1e-6),
                            "{ctx} sms {sms} block {block} seq {b} [{j}]: {g} vs v1 {o}, ref {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn batched_steps_refuse_uneven_or_overfull_batches() {
    let s = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
    };
    let rope = rope_table(8, 16);
    let e = Emulator::new(64);
    let (mut k, mut v) = (vec![0u16; 2 * 8 * 32], vec![0u16; 2 * 8 * 32]);
    // 3 rows over 2 sequences.
    let qkv = vec![0f32; 3 * s.qkv_width()];
    assert!(e
        .qkv_rope_batch(&qkv, None, &rope, s, false, &[0, 0], &mut k, &mut v)
        .is_err());
    // One sequence's step past its cache; no sequences at all.
    let qkv = vec![0f32; 4 * s.qkv_width()];
    assert!(e
        .qkv_rope_batch(&qkv, None, &rope, s, false, &[0, 7], &mut k, &mut v)
        .is_err());
    assert!(e
        .qkv_rope_batch(&qkv, None, &rope, s, false, &[], &mut k, &mut v)
        .is_err());
    let q = vec![0f32; 4 * s.q_width()];
    assert!(e.attention_v2_batch(&q, &k, &v, s, &[0, 7], 4).is_err());
    // 18 rows: more than one step holds.
    let (mut k, mut v) = (vec![0u16; 9 * 8 * 32], vec![0u16; 9 * 8 * 32]);
    let qkv = vec![0f32; 18 * s.qkv_width()];
    assert!(e
        .qkv_rope_batch(&qkv, None, &rope, s, false, &[0; 9], &mut k, &mut v)
        .is_err());
    // The refusals left the caches alone.
    assert!(k.iter().chain(&v).all(|&x| x == 0));
}

//! The x86-64 kernels, one body compiled three times: AVX2 (`maddubs` + `madd` with ones), AVX-VNNI
//! and AVX-512 VNNI on 256-bit registers (`dpbusd`). Every load comes from a bounds-checked slice;
//! `unsafe` is only the intrinsics' target-feature contract, which `rows`' caller checks.

use std::arch::x86_64::*;

use super::{float_row, nf4_i8, Acts, Linear};
use crate::weights::ggml::BlockType;
use crate::weights::quant::QMatrix;
use speckv_kernels::params::NF4_BLOCK;

macro_rules! dot_maddubs {
    ($w:expr, $x:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($w, $x), _mm256_set1_epi16(1))
    };
}
macro_rules! dot_avxvnni {
    ($w:expr, $x:expr) => {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), $w, $x)
    };
}
macro_rules! dot_avx512vnni {
    ($w:expr, $x:expr) => {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $w, $x)
    };
}

macro_rules! kernels {
    ($name:ident, $feat:literal, $dot:ident) => {
        pub(super) mod $name {
            use super::*;

            /// Sums of four adjacent u8 × i8 products per i32 lane.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dot_u8(w: __m256i, x: __m256i) -> __m256i {
                $dot!(w, x)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn load32(b: &[u8]) -> __m256i {
                _mm256_loadu_si256(b[..32].as_ptr() as *const __m256i)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn load16(b: &[u8]) -> __m128i {
                _mm_loadu_si128(b[..16].as_ptr() as *const __m128i)
            }

            /// Bit k of `qh` → 0xFF in byte k, else 0.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn bits32(qh: u32) -> __m256i {
                let shuf = _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
                let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
                _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
            }

            /// Adds one decoded sub-block (codes `wv`, per-lane scale `sv`, half offsets `o`)
            /// into every position of the group.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn apply<const MB: usize, const SIGNED: bool>(
                wv: __m256i,
                sv: __m256,
                o: [f32; 2],
                xs: &X32<MB>,
                b: usize,
                acc: &mut [__m256; MB],
                off: &mut [f32; MB],
            ) {
                // Signed codes: |w| · (x with w's sign), so the u8 × i8 instruction serves.
                let aw = if SIGNED { _mm256_abs_epi8(wv) } else { wv };
                for i in 0..MB {
                    // In bounds: `x32` checked every position covers the row (b < in / 32).
                    let xv = _mm256_loadu_si256(xs.q[i].add(32 * b) as *const __m256i);
                    let xv = if SIGNED { _mm256_sign_epi8(xv, wv) } else { xv };
                    let p = dot_u8(aw, xv);
                    let scale = _mm256_mul_ps(sv, _mm256_set1_ps(*xs.d[i].add(b)));
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
                    if !SIGNED {
                        let h = xs.h[i].add(2 * b);
                        off[i] += o[0] * *h + o[1] * *h.add(1);
                    }
                }
            }

            /// Base pointers of each position's per-32 codes, scales and half sums.
            struct X32<const MB: usize> {
                q: [*const i8; MB],
                d: [*const f32; MB],
                h: [*const f32; MB],
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn x32<const MB: usize>(a: &Acts, i0: usize, inp: usize) -> X32<MB> {
                let mut x = X32 {
                    q: [std::ptr::null(); MB],
                    d: [std::ptr::null(); MB],
                    h: [std::ptr::null(); MB],
                };
                for i in 0..MB {
                    let (q, d, h) = a.row(i0 + i);
                    assert!(q.len() >= inp && d.len() >= inp / 32 && h.len() >= inp / 16);
                    x.q[i] = q.as_ptr();
                    x.d[i] = d.as_ptr();
                    x.h[i] = h.as_ptr();
                }
                x
            }

            /// Q4_0 (T = 0), Q4_1 (1), Q5_0 (2) rows, one loop per type. Q4_0 and Q5_0 codes are
            /// made signed (nibble − 8, value − 16) so no offset term is needed; Q4_1 keeps its
            /// min through the activations' half sums.
            #[target_feature(enable = $feat)]
            unsafe fn row_b32<const MB: usize, const T: u8>(
                row: &[u8],
                xs: &X32<MB>,
                acc_out: &mut [__m256; MB],
                off_out: &mut [f32; MB],
            ) {
                // Accumulators as locals, so they stay in registers across the loop.
                let (mut acc_l, mut off_l) = (*acc_out, *off_out);
                let (acc, off) = (&mut acc_l, &mut off_l);
                let m4 = _mm_set1_epi8(0x0F);
                let nb = if T == 0 {
                    18
                } else if T == 1 {
                    20
                } else {
                    22
                };
                let at = if T == 0 {
                    2
                } else if T == 1 {
                    4
                } else {
                    6
                };
                for (b, blk) in row.chunks_exact(nb).enumerate() {
                    let p = blk.as_ptr();
                    let d = half(blk, 0);
                    let v = _mm_loadu_si128(p.add(at) as *const __m128i);
                    let lo = _mm_and_si128(v, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                    let wv = _mm256_set_m128i(hi, lo);
                    if T == 1 {
                        let m = half(blk, 2);
                        apply::<MB, false>(wv, _mm256_set1_ps(d), [m, m], xs, b, acc, off);
                    } else if T == 0 {
                        let sw = _mm256_sub_epi8(wv, _mm256_set1_epi8(8));
                        apply::<MB, true>(sw, _mm256_set1_ps(d), [0.0; 2], xs, b, acc, off);
                    } else {
                        let qh = (p.add(2) as *const u32).read_unaligned();
                        let h = _mm256_and_si256(bits32(u32::from_le(qh)), _mm256_set1_epi8(0x10));
                        let sw = _mm256_sub_epi8(_mm256_or_si256(wv, h), _mm256_set1_epi8(16));
                        apply::<MB, true>(sw, _mm256_set1_ps(d), [0.0; 2], xs, b, acc, off);
                    }
                }
                *acc_out = acc_l;
                *off_out = off_l;
            }

            /// Row `r` of an integer-path matrix dotted with the group's positions.
            #[target_feature(enable = $feat)]
            unsafe fn row_int<const MB: usize>(
                w: &Linear,
                r: usize,
                a: &Acts,
                i0: usize,
            ) -> [f32; MB] {
                let mut acc = [_mm256_setzero_ps(); MB];
                let mut off = [0f32; MB];
                // The per-32 positions, built only for the types that read them (the K-quants
                // read the per-256 form, so theirs stay null and unread).
                let xs = &if w.k_quant() {
                    X32 {
                        q: [std::ptr::null(); MB],
                        d: [std::ptr::null(); MB],
                        h: [std::ptr::null(); MB],
                    }
                } else {
                    x32::<MB>(a, i0, w.shape().1)
                };
                match w {
                    Linear::Blocks(bm) => {
                        let row = bm.row(r);
                        let ty = bm.ty;
                        match ty {
                            BlockType::Q4_0 => row_b32::<MB, 0>(row, xs, &mut acc, &mut off),
                            BlockType::Q4_1 => row_b32::<MB, 1>(row, xs, &mut acc, &mut off),
                            BlockType::Q5_0 => row_b32::<MB, 2>(row, xs, &mut acc, &mut off),
                            BlockType::Q8_0 => {
                                for (b, blk) in row.chunks_exact(34).enumerate() {
                                    let d = _mm256_set1_ps(half(blk, 0));
                                    apply::<MB, true>(
                                        load32(&blk[2..]),
                                        d,
                                        [0.0; 2],
                                        xs,
                                        b,
                                        &mut acc,
                                        &mut off,
                                    );
                                }
                            }
                            BlockType::Q4K => row_q4k::<MB>(row, a, i0, &mut acc, &mut off),
                            BlockType::Q6K => row_q6k::<MB>(row, a, i0, &mut acc, &mut off),
                            BlockType::F16 | BlockType::F32 => {}
                        }
                    }
                    Linear::Regime(QMatrix::Int8 { q, scale, inp, .. }) => {
                        let row: &[u8] = bytemuck::cast_slice(&q[r * inp..(r + 1) * inp]);
                        let s = _mm256_set1_ps(scale[r]);
                        for (b, c) in row.chunks_exact(32).enumerate() {
                            apply::<MB, true>(load32(c), s, [0.0; 2], xs, b, &mut acc, &mut off);
                        }
                    }
                    Linear::Regime(QMatrix::Nf4 {
                        packed,
                        absmax,
                        inp,
                        ..
                    }) => {
                        let e0 = r * inp;
                        let t = nf4_i8();
                        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            t.as_ptr() as *const __m128i
                        ));
                        let bytes = &packed[e0 / 2..(e0 + inp) / 2];
                        for (b, c) in bytes.chunks_exact(16).enumerate() {
                            let v = load16(c);
                            // High nibble first: element 2i is byte i's high nibble.
                            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
                            let lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
                            let idx = _mm256_set_m128i(
                                _mm_unpackhi_epi8(hi, lo),
                                _mm_unpacklo_epi8(hi, lo),
                            );
                            let wv = _mm256_shuffle_epi8(table, idx);
                            let s = _mm256_set1_ps(absmax[(e0 + 32 * b) / NF4_BLOCK] / 127.0);
                            apply::<MB, true>(wv, s, [0.0; 2], xs, b, &mut acc, &mut off);
                        }
                    }
                    Linear::Regime(QMatrix::Fp16 { .. }) => {}
                }
                let mut y = [0f32; MB];
                for i in 0..MB {
                    y[i] = hsum(acc[i]) + off[i];
                }
                y
            }

            /// f16 at byte `i` of `b`, converted by F16C.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn half(b: &[u8], i: usize) -> f32 {
                let bits = u16::from_le_bytes([b[i], b[i + 1]]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            k_quant_kernels!($feat);

            /// Row bytes of f16 or f32 dotted with the group's f32 positions (F16C + FMA).
            #[target_feature(enable = $feat)]
            unsafe fn row_float<const MB: usize>(
                bytes: &[u8],
                is_f16: bool,
                xs: &[&[f32]; MB],
            ) -> [f32; MB] {
                let n = xs[0].len();
                let mut acc = [[_mm256_setzero_ps(); 2]; MB];
                let mut k = 0;
                while k + 16 <= n {
                    let (w0, w1) = if is_f16 {
                        let p = bytes[2 * k..2 * k + 32].as_ptr();
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
                        )
                    } else {
                        let p = bytes[4 * k..4 * k + 64].as_ptr() as *const f32;
                        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                    };
                    for i in 0..MB {
                        let x = xs[i][k..k + 16].as_ptr();
                        acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[i][1]);
                    }
                    k += 16;
                }
                let mut y = [0f32; MB];
                for i in 0..MB {
                    let mut s = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
                    for kk in k..n {
                        let wv = if is_f16 {
                            half::f16::from_le_bytes([bytes[2 * kk], bytes[2 * kk + 1]]).to_f32()
                        } else {
                            f32::from_le_bytes([
                                bytes[4 * kk],
                                bytes[4 * kk + 1],
                                bytes[4 * kk + 2],
                                bytes[4 * kk + 3],
                            ])
                        };
                        s = wv.mul_add(xs[i][kk], s);
                    }
                    y[i] = s;
                }
                y
            }

            #[target_feature(enable = $feat)]
            unsafe fn group<const MB: usize>(
                w: &Linear,
                x: &[f32],
                a: &Acts,
                r: usize,
                i0: usize,
                y: &mut [f32],
            ) {
                let (_, inp) = w.shape();
                let v = if w.integer() {
                    row_int::<MB>(w, r, a, i0)
                } else {
                    let (bytes, is_f16) = float_row(w, r);
                    let xs: [&[f32]; MB] =
                        std::array::from_fn(|i| &x[(i0 + i) * inp..(i0 + i + 1) * inp]);
                    row_float::<MB>(bytes, is_f16, &xs)
                };
                y[i0..i0 + MB].copy_from_slice(&v);
            }

            /// Output rows r0.. into `yt` (`[rows, m]`), positions in groups of up to four.
            #[target_feature(enable = $feat)]
            pub(in crate::weights::cpu) unsafe fn rows(
                w: &Linear,
                x: &[f32],
                a: &Acts,
                m: usize,
                r0: usize,
                yt: &mut [f32],
            ) {
                for (j, y) in yt.chunks_exact_mut(m).enumerate() {
                    let r = r0 + j;
                    let mut i0 = 0;
                    while i0 < m {
                        let g = (m - i0).min(4);
                        match g {
                            4 => group::<4>(w, x, a, r, i0, y),
                            3 => group::<3>(w, x, a, r, i0, y),
                            2 => group::<2>(w, x, a, r, i0, y),
                            _ => group::<1>(w, x, a, r, i0, y),
                        }
                        i0 += g;
                    }
                }
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", dot_maddubs);
kernels!(avxvnni, "avx2,fma,f16c,avxvnni", dot_avxvnni);
kernels!(
    avx512vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    dot_avx512vnni
);

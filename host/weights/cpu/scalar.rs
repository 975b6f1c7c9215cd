//! The products in plain Rust: the oracle of the SIMD kernels (the same integer sums, the same
//! scale formula) and the path of CPUs without AVX2.

use super::{float_row, sub_block, Acts, Linear};
use crate::weights::ggml::BlockType;

/// A K-quant row against the per-256 activations: value = s_h · c + o_h per 16, x = dk · q.
fn k_quant(w: &Linear, r: usize, a: &Acts, i: usize) -> f32 {
    let (_, inp) = w.shape();
    let (qk, dk, bsum) = a.row_k(i);
    let mut acc = 0f32;
    for b in 0..inp / 32 {
        let sb = sub_block(w, r, b);
        let q = &qk[32 * b..32 * b + 32];
        let d = dk[b / 8];
        for h in 0..2 {
            let r = 16 * h..16 * h + 16;
            let dot: i32 = sb.c[r.clone()]
                .iter()
                .zip(&q[r])
                .map(|(&c, &x)| c as i32 * x as i32)
                .sum();
            acc += d * (sb.s[h] * dot as f32 + sb.o[h] * bsum[2 * b + h] as f32);
        }
    }
    acc
}

pub(super) fn rows(w: &Linear, x: &[f32], a: &Acts, m: usize, r0: usize, yt: &mut [f32]) {
    let (_, inp) = w.shape();
    for (j, y) in yt.chunks_exact_mut(m).enumerate() {
        let r = r0 + j;
        if w.integer() {
            let kq =
                matches!(w, Linear::Blocks(b) if matches!(b.ty, BlockType::Q4K | BlockType::Q6K));
            for (i, yi) in y.iter_mut().enumerate() {
                if kq {
                    *yi = k_quant(w, r, a, i);
                    continue;
                }
                let (qs, dx, d16) = a.row(i);
                let mut acc = 0f32;
                for b in 0..inp / 32 {
                    let sb = sub_block(w, r, b);
                    let q = &qs[32 * b..32 * b + 32];
                    for h in 0..2 {
                        let r = 16 * h..16 * h + 16;
                        let dot: i32 = sb.c[r.clone()]
                            .iter()
                            .zip(&q[r])
                            .map(|(&c, &x)| {
                                let c = if sb.signed { c as i8 as i32 } else { c as i32 };
                                c * x as i32
                            })
                            .sum();
                        acc += sb.s[h] * dx[b] * dot as f32 + sb.o[h] * d16[2 * b + h];
                    }
                }
                *yi = acc;
            }
        } else {
            let (bytes, is_f16) = float_row(w, r);
            for (i, yi) in y.iter_mut().enumerate() {
                let xr = &x[i * inp..(i + 1) * inp];
                let mut acc = 0f32;
                for (k, xv) in xr.iter().enumerate() {
                    let wv = if is_f16 {
                        half::f16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]).to_f32()
                    } else {
                        f32::from_le_bytes([
                            bytes[4 * k],
                            bytes[4 * k + 1],
                            bytes[4 * k + 2],
                            bytes[4 * k + 3],
                        ])
                    };
                    acc = wv.mul_add(*xv, acc);
                }
                *yi = acc;
            }
        }
    }
}

//! The forward pass's elementwise and attention pieces: RMSNorm, RoPE from a table of cos /
//! sin (adjacent pairs or halves), grouped-query attention over the f16 cache with heads split
//! across threads.

use half::f16;
use rayon::prelude::*;

use crate::weights::cpu::vec::{axpy_f16, dot_f16};

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], h: usize) {
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = (*v as f64 * s) as f32 * g;
        }
    }
}

/// cos and sin of every (position, pair) up to `positions`: `[positions, hd / 2]`, computed in
/// f64 once at load.
#[derive(Clone)]
pub(super) struct RopeTable {
    half: usize,
    base: f64,
    hd: usize,
    cs: Vec<(f32, f32)>,
}

/// Positions the table covers; later ones are computed on the fly.
const TABLE_POSITIONS: usize = 8192;

impl RopeTable {
    pub fn new(hd: usize, base: f32, context: usize) -> RopeTable {
        let half = hd / 2;
        let n = context.min(TABLE_POSITIONS);
        let mut cs = Vec::with_capacity(n * half);
        for p in 0..n {
            for j in 0..half {
                cs.push(Self::angle(p, j, base as f64, hd));
            }
        }
        RopeTable {
            half,
            base: base as f64,
            hd,
            cs,
        }
    }

    fn angle(pos: usize, j: usize, base: f64, hd: usize) -> (f32, f32) {
        let theta = pos as f64 * base.powf(-2.0 * j as f64 / hd as f64);
        let (s, c) = theta.sin_cos();
        (c as f32, s as f32)
    }

    /// (cos, sin) of every (position, pair) for positions `0..positions`: the values [`apply`]
    /// uses, as the device forward pass's table.
    ///
    /// [`apply`]: RopeTable::apply
    pub fn pairs(&self, positions: usize) -> Vec<[f32; 2]> {
        let mut out = Vec::with_capacity(positions * self.half);
        for pos in 0..positions {
            for j in 0..self.half {
                let (c, s) = match self.cs.get(pos * self.half + j) {
                    Some(&v) => v,
                    None => Self::angle(pos, j, self.base, self.hd),
                };
                out.push([c, s]);
            }
        }
        out
    }

    /// Rotary embedding in place on `[m, heads, hd]` at positions pos0.., llama's adjacent pairs
    /// (GGUF stores llama's q/k permuted for them) or qwen2's halves (`neox`).
    pub fn apply(&self, x: &mut [f32], heads: usize, pos0: usize, neox: bool) {
        let (hd, half) = (self.hd, self.half);
        for (i, row) in x.chunks_mut(heads * hd).enumerate() {
            let pos = pos0 + i;
            for head in row.chunks_mut(hd) {
                for j in 0..half {
                    let (c, s) = match self.cs.get(pos * half + j) {
                        Some(&v) => v,
                        None => Self::angle(pos, j, self.base, hd),
                    };
                    let (a, b) = if neox {
                        (j, j + half)
                    } else {
                        (2 * j, 2 * j + 1)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}

/// The attention's shape.
pub(super) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

/// Causal grouped-query attention of m new positions (queries `[m, heads, hd]`) over the cache's
/// first `pos0 + m` positions (`[pos, kv_heads · hd]`, f16). Heads run in parallel; each writes
/// its `[m, hd]` block of `att_h` and uses its row of `scores` (`capacity` long).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    m: usize,
    pos0: usize,
    s: &Heads,
    att_h: &mut [f32],
    scores: &mut [f32],
    att: &mut [f32],
) {
    let (heads, hd) = (s.heads, s.hd);
    let group = heads / s.kv_heads;
    let kvw = s.kv_heads * hd;
    let cap = scores.len() / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    att_h[..heads * m * hd]
        .par_chunks_mut(m * hd)
        .zip(scores.par_chunks_mut(cap))
        .enumerate()
        .for_each(|(h, (out, sc))| {
            let kvh = h / group;
            for i in 0..m {
                let n = pos0 + i + 1; // positions visible to query i
                let qv = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
                let mut mx = f32::NEG_INFINITY;
                for (p, sp) in sc[..n].iter_mut().enumerate() {
                    let kv = &kc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                    *sp = dot_f16(qv, kv) * scale;
                    mx = mx.max(*sp);
                }
                let mut z = 0f32;
                for sp in sc[..n].iter_mut() {
                    *sp = (*sp - mx).exp();
                    z += *sp;
                }
                let o = &mut out[i * hd..(i + 1) * hd];
                o.fill(0.0);
                let iz = 1.0 / z;
                for (p, sp) in sc[..n].iter().enumerate() {
                    let vv = &vc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                    axpy_f16(o, sp * iz, vv);
                }
            }
        });
    for i in 0..m {
        for h in 0..heads {
            att[(i * heads + h) * hd..(i * heads + h + 1) * hd]
                .copy_from_slice(&att_h[(h * m + i) * hd..(h * m + i + 1) * hd]);
        }
    }
}

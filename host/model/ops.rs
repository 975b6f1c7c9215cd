//! The forward pass's elementwise and attention pieces: RMSNorm, bias, RoPE (adjacent pairs or
//! halves), grouped-query attention over the cache.

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], h: usize) {
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = (*v as f64 * s) as f32 * g;
        }
    }
}

pub(super) fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in y.chunks_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
}

/// Rotary embedding in place on `[m, heads, hd]` at positions pos0.., llama's adjacent pairs
/// (GGUF stores llama's q/k permuted for them) or qwen2's halves (`neox`).
pub(super) fn rope(x: &mut [f32], heads: usize, hd: usize, pos0: usize, base: f32, neox: bool) {
    let half = hd / 2;
    for (i, row) in x.chunks_mut(heads * hd).enumerate() {
        let pos = (pos0 + i) as f64;
        for head in row.chunks_mut(hd) {
            for j in 0..half {
                let theta = pos * (base as f64).powf(-2.0 * j as f64 / hd as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = if neox {
                    (j, j + half)
                } else {
                    (2 * j, 2 * j + 1)
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * c - x1 * s) as f32;
                head[b] = (x0 * s + x1 * c) as f32;
            }
        }
    }
}

/// Causal grouped-query attention of m new positions over the cache.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    m: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let kvw = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; m * heads * hd];
    let mut scores = Vec::new();
    for i in 0..m {
        let n = pos0 + i + 1; // positions visible to query i
        for h in 0..heads {
            let kvh = h / group;
            let qv = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            scores.clear();
            let mut mx = f32::NEG_INFINITY;
            for p in 0..n {
                let kv = &kc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                let s = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(s);
                scores.push(s);
            }
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - mx).exp();
                z += *s;
            }
            let o = &mut out[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            for (p, s) in scores.iter().enumerate() {
                let w = s / z;
                let vv = &vc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                for (a, b) in o.iter_mut().zip(vv) {
                    *a += w * b;
                }
            }
        }
    }
    out
}

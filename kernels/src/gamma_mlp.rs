//! The γ decision on the device: for every sequence of a batch, the 16-unit MLP evaluated on the
//! sequence's feature accumulator (mean/max draft entropy, mean/min draft confidence of the step's
//! drafted tokens, written in place by `softmax_stats`), for every candidate γ; the γ maximising
//! predicted tokens per step â(γ)·γ + 1 — or per unit cost with a cost table — is written to device
//! memory, where `verify` reads it. No host synchronisation anywhere.
//!
//! One thread per sequence. The predicted acceptance rate is clamped to [0, 1]; ties go to the
//! earlier candidate. An empty (count 0) or flagged accumulator gets `fallback_gamma`.

use crate::gpu;
use crate::params::{GammaMlpParams, MlpWeights};

/// Predicted acceptance rate (clamped to [0, 1]) for raw features `x`.
#[inline(always)]
pub fn predict(w: &MlpWeights, x: &[f32; 6]) -> f32 {
    let mut z = [0f32; 6];
    let mut i = 0;
    while i < 6 {
        z[i] = (x[i] - w.mean[i]) * w.inv_std[i];
        i += 1;
    }
    let mut y = w.b2;
    let mut j = 0;
    while j < 16 {
        let mut h = w.b1[j];
        let mut i = 0;
        while i < 6 {
            h += z[i] * w.w1[i * 16 + j];
            i += 1;
        }
        if h > 0.0 {
            y += h * w.w2[j];
        }
        j += 1;
    }
    y.clamp(0.0, 1.0)
}

/// The chosen candidate index and its predicted tokens per step, for the base features
/// (mean entropy, mean confidence, max entropy, min confidence) and compression code.
#[inline(always)]
pub fn decide(
    w: &MlpWeights,
    base: [f32; 4],
    code: f32,
    candidates: &[i32],
    cost: Option<&[f32]>,
) -> (usize, f32) {
    // Iterators and `get` only: no bounds-check panic path reaches the PTX.
    let mut best = (0usize, f32::NEG_INFINITY, 0f32);
    for (c, &gi) in candidates.iter().enumerate() {
        let g = gi as f32;
        let a = predict(w, &[base[0], base[1], base[2], base[3], code, g]);
        let tokens = a * g + 1.0;
        let score = match cost.and_then(|k| k.get(c)) {
            Some(&k) => tokens / k,
            None => tokens,
        };
        if score > best.1 {
            best = (c, score, tokens);
        }
    }
    (best.0, best.2)
}

/// The kernel body.
///
/// # Safety
/// `p.weights` must point to one `MlpWeights`, `p.accum` and `p.gammas_out` (and, when not null,
/// `p.compression` and `p.expected_out`) to `batch` elements, `p.cost` (when not null) to
/// `n_candidates`; `n_candidates` must be 1..=8 with positive candidates and positive costs.
#[inline(always)]
pub unsafe fn gamma_mlp(p: &GammaMlpParams) {
    let b = gpu::block_idx_x() * gpu::block_dim_x() + gpu::thread_idx_x();
    if b >= p.batch {
        return;
    }
    let a = *p.accum.add(b as usize);
    let n = if (p.n_candidates as usize) < p.candidates.len() {
        p.n_candidates as usize
    } else {
        p.candidates.len()
    };
    let candidates = p.candidates.get(..n).unwrap_or(&[]);
    let (gamma, expected) = if a.count == 0 || a.flags != 0 || candidates.is_empty() {
        (p.fallback_gamma, f32::NAN)
    } else {
        let cnt = a.count as f32;
        let base = [
            a.entropy_sum / cnt,
            a.confidence_sum / cnt,
            a.entropy_max,
            a.confidence_min,
        ];
        let code = if p.compression.is_null() {
            p.compression_code
        } else {
            *p.compression.add(b as usize)
        };
        let cost = if p.cost.is_null() {
            None
        } else {
            Some(core::slice::from_raw_parts(p.cost, n))
        };
        let (c, tokens) = decide(&*p.weights, base, code, candidates, cost);
        (
            candidates.get(c).copied().unwrap_or(p.fallback_gamma),
            tokens,
        )
    };
    *p.gammas_out.add(b as usize) = gamma;
    if !p.expected_out.is_null() {
        *p.expected_out.add(b as usize) = expected;
    }
}

/// # Safety
/// See [`gamma_mlp`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn gamma_mlp_f32(p: GammaMlpParams) {
    gamma_mlp(&p)
}

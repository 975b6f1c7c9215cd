//! The γ decision on the device: for every sequence of a batch, the 16-unit MLP evaluated on the
//! sequence's feature accumulator (mean/max draft entropy, mean/min draft confidence of the step's
//! drafted tokens, written in place by `softmax_stats`), for every candidate γ; the γ maximising
//! predicted tokens per step â(γ)·γ + 1 — or per unit cost with a cost table — is written to device
//! memory, where `verify` reads it. No host synchronisation anywhere.
//!
//! One thread per sequence. The predicted acceptance rate is clamped to [0, 1]; ties go to the
//! earlier candidate. Fail-closed: a sequence whose accumulator is empty (`GAMMA_EMPTY`) or holds
//! flagged rows (`GAMMA_FLAGGED_ROWS`), or whose features or predictions are not finite
//! (`GAMMA_NONFINITE`), gets `fallback_gamma`, and the reason in `flags_out`.

use core::mem::offset_of;

use crate::gpu;
use crate::params::{
    FeatureAccum, GammaMlpParams, MlpWeights, GAMMA_EMPTY, GAMMA_FLAGGED_ROWS, GAMMA_NONFINITE,
};

/// Where the MLP's weights are read from: a host reference, or device memory (one `ld.global.nc`
/// per weight, so nothing is copied into the thread's registers or local memory up front).
pub trait MlpSource: Copy {
    /// Element `i` of the weights struct viewed as f32s.
    fn at(self, i: usize) -> f32;
}

const W1: usize = offset_of!(MlpWeights, w1) / 4;
const B1: usize = offset_of!(MlpWeights, b1) / 4;
const W2: usize = offset_of!(MlpWeights, w2) / 4;
const MEAN: usize = offset_of!(MlpWeights, mean) / 4;
const INV_STD: usize = offset_of!(MlpWeights, inv_std) / 4;
const B2: usize = offset_of!(MlpWeights, b2) / 4;

impl MlpSource for &MlpWeights {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        // SAFETY: `MlpWeights` is `#[repr(C)]` of f32 fields only (size asserted in params.rs),
        // and callers pass indices below its 144 floats.
        unsafe { *(self as *const MlpWeights as *const f32).add(i) }
    }
}

/// Weights in global memory.
#[derive(Clone, Copy)]
pub struct DeviceMlp(pub *const MlpWeights);

impl MlpSource for DeviceMlp {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        // SAFETY: the launch contract: `weights` points to one `MlpWeights` no thread writes.
        unsafe { gpu::ld_nc(self.0 as *const f32, i) }
    }
}

/// Predicted acceptance rate (clamped to [0, 1]) for raw features `x`; NaN when `x` or the
/// weights are not finite.
#[inline(always)]
pub fn predict<W: MlpSource>(w: W, x: &[f32; 6]) -> f32 {
    let mut z = [0f32; 6];
    crate::unroll!(i in 0..6 => {
        z[i] = (x[i] - w.at(MEAN + i)) * w.at(INV_STD + i);
    });
    let mut y = w.at(B2);
    crate::unroll!(j in 0..16 => {
        let mut h = w.at(B1 + j);
        crate::unroll!(i in 0..6 => {
            h += z[i] * w.at(W1 + i * 16 + j);
        });
        if h > 0.0 {
            y += h * w.at(W2 + j);
        }
    });
    if !y.is_finite() || !(z[0] + z[1] + z[2] + z[3] + z[4] + z[5]).is_finite() {
        return f32::NAN;
    }
    y.clamp(0.0, 1.0)
}

/// The hidden layer's pre-activations without the γ input: the five features that do not change
/// between candidates are summed once, in the order `predict` sums them, so adding γ's term per
/// candidate gives `predict`'s value bit for bit while the weights are read once, not once per
/// candidate.
#[derive(Clone, Copy)]
pub struct Partial {
    h: [f32; 16],
    /// Standardisation of γ (mean, 1 / std) and the finiteness of the five standardised features.
    g_mean: f32,
    g_inv_std: f32,
    finite: f32,
}

impl Partial {
    #[inline(always)]
    pub fn new<W: MlpSource>(w: W, x: &[f32; 5]) -> Partial {
        let mut z = [0f32; 5];
        crate::unroll!(i in 0..6 => {
            if i < 5 {
                z[i] = (x[i] - w.at(MEAN + i)) * w.at(INV_STD + i);
            }
        });
        let mut h = [0f32; 16];
        crate::unroll!(j in 0..16 => {
            let mut v = w.at(B1 + j);
            crate::unroll!(i in 0..6 => {
                if i < 5 {
                    v += z[i] * w.at(W1 + i * 16 + j);
                }
            });
            h[j] = v;
        });
        Partial {
            h,
            g_mean: w.at(MEAN + 5),
            g_inv_std: w.at(INV_STD + 5),
            finite: z[0] + z[1] + z[2] + z[3] + z[4],
        }
    }

    /// `predict` at candidate γ = `g`.
    #[inline(always)]
    pub fn predict<W: MlpSource>(&self, w: W, g: f32) -> f32 {
        let z5 = (g - self.g_mean) * self.g_inv_std;
        let mut y = w.at(B2);
        crate::unroll!(j in 0..16 => {
            let h = self.h[j] + z5 * w.at(W1 + 5 * 16 + j);
            if h > 0.0 {
                y += h * w.at(W2 + j);
            }
        });
        if !y.is_finite() || !(self.finite + z5).is_finite() {
            return f32::NAN;
        }
        y.clamp(0.0, 1.0)
    }
}

/// The chosen candidate index and its predicted tokens per step, for the base features
/// (mean entropy, mean confidence, max entropy, min confidence) and compression code; `None` when
/// a feature or a prediction is not finite (the caller falls back).
#[inline(always)]
pub fn decide<W: MlpSource>(
    w: W,
    base: [f32; 4],
    code: f32,
    candidates: &[i32],
    cost: Option<&[f32]>,
) -> Option<(usize, f32)> {
    // Iterators and `get` only: no bounds-check panic path reaches the PTX.
    let part = Partial::new(w, &[base[0], base[1], base[2], base[3], code]);
    let mut best = (0usize, f32::NEG_INFINITY, 0f32);
    for (c, &gi) in candidates.iter().enumerate() {
        let g = gi as f32;
        let a = part.predict(w, g);
        if a.is_nan() {
            return None;
        }
        let tokens = a * g + 1.0;
        let score = match cost.and_then(|k| k.get(c)) {
            Some(&k) => tokens / k,
            None => tokens,
        };
        if score > best.1 {
            best = (c, score, tokens);
        }
    }
    if best.1 == f32::NEG_INFINITY {
        return None;
    }
    Some((best.0, best.2))
}

/// Decides sequence `b`'s γ from its accumulator `a` and writes `gammas_out[b]` (and, when not
/// null, `expected_out[b]` and `flags_out[b]`): the kernel's per-thread work, also run by
/// `softmax_stats_v2`'s final merge with `STATS_DECIDE`.
///
/// # Safety
/// `p`'s pointers as documented on [`gamma_mlp`], with at least `b + 1` entries.
#[inline(always)]
pub unsafe fn decide_into(p: &GammaMlpParams, b: u32, a: &FeatureAccum) {
    let n = if (p.n_candidates as usize) < p.candidates.len() {
        p.n_candidates as usize
    } else {
        p.candidates.len()
    };
    let candidates = p.candidates.get(..n).unwrap_or(&[]);
    let mut flags = 0;
    if a.count == 0 {
        flags |= GAMMA_EMPTY;
    }
    if a.flags != 0 {
        flags |= GAMMA_FLAGGED_ROWS;
    }
    let mut gamma = p.fallback_gamma;
    let mut expected = f32::NAN;
    if flags == 0 && !candidates.is_empty() {
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
            gpu::ld_nc(p.compression, b as usize)
        };
        // Every candidate by a constant index (registers, not local memory); the same
        // arithmetic, in the same order, as `decide`.
        let w = DeviceMlp(p.weights);
        let part = Partial::new(w, &[base[0], base[1], base[2], base[3], code]);
        let mut best = (p.fallback_gamma, f32::NEG_INFINITY, 0f32);
        let mut bad = false;
        crate::unroll!(c in 0..8 => {
            if c < n {
                let gi = p.candidates[c];
                let g = gi as f32;
                let a = part.predict(w, g);
                bad |= a.is_nan();
                let tokens = a * g + 1.0;
                let score = if p.cost.is_null() {
                    tokens
                } else {
                    tokens / gpu::ld_nc(p.cost, c)
                };
                if score > best.1 {
                    best = (gi, score, tokens);
                }
            }
        });
        let _ = candidates;
        if bad || best.1 == f32::NEG_INFINITY {
            flags |= GAMMA_NONFINITE;
        } else {
            gamma = best.0;
            expected = best.2;
        }
    }
    gpu::st(p.gammas_out, b as usize, gamma);
    if !p.expected_out.is_null() {
        gpu::st(p.expected_out, b as usize, expected);
    }
    if !p.flags_out.is_null() {
        gpu::st(p.flags_out, b as usize, flags);
    }
}

/// The kernel body: one thread per sequence.
///
/// # Safety
/// `p.weights` must point to one `MlpWeights`, `p.accum` and `p.gammas_out` (and, when not null,
/// `p.compression`, `p.expected_out` and `p.flags_out`) to `batch` elements, `p.cost` (when not
/// null) to `n_candidates`; `n_candidates` must be 1..=8 with positive candidates and positive
/// costs.
#[inline(always)]
pub unsafe fn gamma_mlp(p: &GammaMlpParams) {
    let b = gpu::block_idx_x() * gpu::block_dim_x() + gpu::thread_idx_x();
    if b >= p.batch {
        return;
    }
    decide_into(p, b, &gpu::ld(p.accum, b as usize));
}

/// # Safety
/// See [`gamma_mlp`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn gamma_mlp_f32(p: GammaMlpParams) {
    gamma_mlp(&p)
}

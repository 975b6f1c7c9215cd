//! Batched verification: for every sequence of the batch at once, how many of its γ_b drafted
//! tokens the target accepts and which tokens are emitted — one launch, one block per sequence, γ_b
//! read from device memory (so the γ controller never waits on the host).
//!
//! Stochastic mode (target temperature T > 0) is the rejection sampling of Leviathan et al. / Chen
//! et al.: position i accepts draft token x_i when u_i < min(1, p_i(x_i) / q_i(x_i)); at the first
//! rejection a token is drawn from norm(max(0, p_i − q_i)); when all γ_b are accepted a bonus token
//! is drawn from p_{γ_b}. Greedy mode (T = 0) accepts while x_i equals the target argmax and then
//! emits the target argmax. Modes mix freely within a batch.
//!
//! Per position, one fused pass reads the target row and (in logits mode) the draft row and reduces
//! both to (max, Σ e^{z−m}, argmax), so p_i(x_i) and q_i(x_i) follow without another read; positions
//! after the first rejection are never read. The rejected position is read once more for the
//! residual sample (exponential race: argmax_j w_j / E_j with E_j = −ln u_j), the bonus position
//! once for a Gumbel-max sample of the target — the same formula as `softmax_stats`.
//!
//! Randomness is an input: Philox4x32-10 keyed by sub-streams of the seed (`philox::derive`):
//! acceptance uniforms at counter (i / 4, b, step), emission noise of position i at (j / 4, b, step).

use crate::gpu;
use crate::params::{
    VerifyParams, VERIFY_ALL_MASKED, VERIFY_BAD_DRAFT, VERIFY_BAD_GAMMA, VERIFY_BAD_TEMPERATURE,
    VERIFY_BAD_TOKEN, VERIFY_DRAFT_PROBS, VERIFY_NONFINITE,
};
use crate::philox;
use crate::reduce::{block_all_reduce, KeyMax, Reduce};
use crate::softmax_stats::Logit;
#[cfg(target_arch = "nvptx64")]
use crate::softmax_stats::{Bf16, F16, F32};

/// (max, Σ e^{z−m}, argmax) of one row under temperature, with non-finite input flagged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowMax {
    /// Largest raw logit, −inf when none.
    pub max: f32,
    /// Σ e^{(x_j − max)/T}.
    pub sum: f32,
    /// Index of `max`, lowest on ties.
    pub argmax: u32,
    /// `VERIFY_NONFINITE` when a NaN or ±inf (other than a −inf logit) was seen.
    pub flags: u32,
}

impl RowMax {
    pub const EMPTY: RowMax = RowMax {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        argmax: u32::MAX,
        flags: 0,
    };

    #[inline(always)]
    pub fn push(&mut self, x: f32, i: u32, inv_t: f32) {
        if x == f32::NEG_INFINITY {
            return;
        }
        // NaN, +inf, or x / T overflowing (a temperature too small for these logits).
        if !(x * inv_t).is_finite() {
            self.flags |= VERIFY_NONFINITE;
            return;
        }
        if x > self.max {
            if self.sum > 0.0 {
                self.sum *= gpu::exp_approx(self.max * inv_t - x * inv_t);
            }
            self.max = x;
            self.argmax = i;
            self.sum += 1.0;
        } else {
            self.sum += gpu::exp_approx(x * inv_t - self.max * inv_t);
        }
    }

    #[inline(always)]
    pub fn merge(&mut self, o: &RowMax, inv_t: f32) {
        self.flags |= o.flags;
        if o.sum == 0.0 {
            return;
        }
        if self.sum == 0.0 {
            self.max = o.max;
            self.sum = o.sum;
            self.argmax = o.argmax;
            return;
        }
        let take_other = o.max > self.max || (o.max == self.max && o.argmax < self.argmax);
        let m = if o.max > self.max { o.max } else { self.max };
        let mz = m * inv_t;
        self.sum = self.sum * gpu::exp_approx(self.max * inv_t - mz)
            + o.sum * gpu::exp_approx(o.max * inv_t - mz);
        self.max = m;
        if take_other {
            self.argmax = o.argmax;
        }
    }

    /// softmax(x / T) at a logit `x` of this row.
    #[inline(always)]
    pub fn prob(&self, x: f32, inv_t: f32) -> f32 {
        if x == f32::NEG_INFINITY {
            return 0.0;
        }
        gpu::exp_approx(x * inv_t - self.max * inv_t) / self.sum
    }

    /// `VERIFY_NONFINITE` / `VERIFY_ALL_MASKED` problems of the finished row.
    #[inline(always)]
    pub fn problems(&self) -> u32 {
        if self.flags != 0 {
            self.flags
        } else if self.sum == 0.0 {
            VERIFY_ALL_MASKED
        } else {
            0
        }
    }

    #[inline(always)]
    fn shfl(&self, mask: u32) -> RowMax {
        RowMax {
            max: gpu::shfl_xor_f32(self.max, mask),
            sum: gpu::shfl_xor_f32(self.sum, mask),
            argmax: gpu::shfl_xor_u32(self.argmax, mask),
            flags: gpu::shfl_xor_u32(self.flags, mask),
        }
    }
}

/// A target row and a draft row reduced in the same pass.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RowPair {
    pub target: RowMax,
    pub draft: RowMax,
}

impl Reduce for RowPair {
    /// (1 / T_target, 1 / T_draft).
    type Ctx = (f32, f32);
    const EMPTY: RowPair = RowPair {
        target: RowMax::EMPTY,
        draft: RowMax::EMPTY,
    };
    #[inline(always)]
    fn merge(&mut self, o: &Self, ctx: (f32, f32)) {
        self.target.merge(&o.target, ctx.0);
        self.draft.merge(&o.draft, ctx.1);
    }
    #[inline(always)]
    fn shfl_xor(&self, mask: u32) -> Self {
        RowPair {
            target: self.target.shfl(mask),
            draft: self.draft.shfl(mask),
        }
    }
}

/// Dynamic shared memory a launch with `block` threads needs.
pub const fn shared_bytes(block: u32) -> usize {
    let pair = core::mem::size_of::<RowPair>();
    let key = core::mem::size_of::<KeyMax>();
    let per_warp = if pair > key { pair } else { key };
    (block.div_ceil(gpu::WARP_SIZE) as usize) * per_warp
}

/// A usable temperature: 0 (greedy) or a normal positive finite number, so that 1/T is finite.
/// Negative, NaN, infinite and subnormal temperatures are flagged (`VERIFY_BAD_TEMPERATURE`).
#[inline(always)]
pub fn valid_temperature(t: f32) -> bool {
    t == 0.0 || (f32::MIN_POSITIVE..f32::INFINITY).contains(&t)
}

/// Largest probability accepted as "at most 1 up to rounding" (a softmax computed in f32, or with
/// the GPU's approximate exp, can exceed 1 by a few ulps).
pub const PROB_MAX: f32 = 1.0 + 1.0 / 1024.0;

/// A usable probability: finite and in [0, 1] up to rounding ([`PROB_MAX`]).
#[inline(always)]
pub fn valid_prob(q: f32) -> bool {
    (0.0..=PROB_MAX).contains(&q)
}

/// One sequence's view of the launch.
struct Seq<'a, L> {
    p: &'a VerifyParams,
    b: u32,
    _l: core::marker::PhantomData<L>,
}

impl<L: Logit> Seq<'_, L> {
    #[inline(always)]
    unsafe fn target(&self, i: u32, j: u32) -> f32 {
        let row = (self.b as u64 * (self.p.gamma_max as u64 + 1) + i as u64)
            * self.p.target_stride as u64;
        L::load(self.p.target_logits, row + j as u64)
    }
    #[inline(always)]
    unsafe fn draft_logit(&self, i: u32, j: u32) -> f32 {
        let row = (self.b as u64 * self.p.gamma_max as u64 + i as u64) * self.p.draft_stride as u64;
        L::load(self.p.draft, row + j as u64)
    }
    #[inline(always)]
    unsafe fn draft_prob(&self, i: u32, j: u32) -> f32 {
        let row = (self.b as u64 * self.p.gamma_max as u64 + i as u64) * self.p.draft_stride as u64;
        gpu::ld_nc(self.p.draft as *const f32, (row + j as u64) as usize)
    }
    #[inline(always)]
    unsafe fn token(&self, i: u32) -> i32 {
        gpu::ld_nc(
            self.p.draft_tokens,
            (self.b * self.p.gamma_max + i) as usize,
        )
    }
}

/// How the draft's distribution q is given.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Draft {
    /// Logits at a positive temperature: q = softmax(x / T_d), reduced with the target row.
    Logits,
    /// The draft was greedy (T_d = 0): q is one-hot at the drafted token itself — not at the
    /// argmax of the draft row, which another tie-break or precision could put elsewhere.
    Greedy,
    /// f32 probabilities, each validated when read.
    Probs,
}

/// The kernel body, generic over the logit type.
///
/// Fail-closed: a sequence is flagged (`seq_flags` ≠ 0: no token accepted or emitted) when a row it
/// reads holds NaN / +inf, is all −inf, when γ_b, a drafted token or a temperature is invalid, when
/// p(x), q(x) or their ratio is not a finite probability, when a drafted token has q(x) = 0 (the
/// draft could not have proposed it), or when a draft probability read anywhere is not in [0, 1].
///
/// # Safety
/// The buffers of `p` must have the shapes documented on [`VerifyParams`] (draft tokens and γ are
/// validated in-kernel, the shapes cannot be); launch with `grid.x == batch`, `block.x` a multiple
/// of 32 (≤ 1024) and [`shared_bytes`]`(block.x)` bytes of dynamic shared memory.
#[inline(always)]
pub unsafe fn verify<L: Logit>(p: &VerifyParams) {
    let b = gpu::block_idx_x();
    if b >= p.batch {
        return;
    }
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let s = Seq::<L> {
        p,
        b,
        _l: core::marker::PhantomData,
    };
    let gmax = p.gamma_max;
    let probs_mode = p.flags & VERIFY_DRAFT_PROBS != 0;

    let g = gpu::ld_nc(p.gammas, b as usize);
    let tt = gpu::ld_nc(p.target_temperature, b as usize);
    let td = if probs_mode {
        1.0
    } else {
        gpu::ld_nc(p.draft_temperature, b as usize)
    };
    let mut flags = 0u32;
    if g < 0 || g as u32 > gmax {
        flags |= VERIFY_BAD_GAMMA;
    }
    if !valid_temperature(tt) || !valid_temperature(td) {
        flags |= VERIFY_BAD_TEMPERATURE;
    }
    let g = if flags != 0 { 0 } else { g as u32 };
    let greedy = tt == 0.0;
    let inv_tt = if greedy { 1.0 } else { 1.0 / tt };
    let draft = if probs_mode {
        Draft::Probs
    } else if td == 0.0 {
        Draft::Greedy
    } else {
        Draft::Logits
    };
    let inv_td = if draft == Draft::Logits {
        1.0 / td
    } else {
        1.0
    };
    let read_draft_row = !greedy && draft == Draft::Logits;
    let pair_shared = gpu::dynamic_shared::<RowPair>();
    let key_shared = gpu::dynamic_shared::<KeyMax>();

    if tid == 0 && !p.ratios.is_null() {
        let mut i = 0;
        while i < gmax {
            gpu::st(p.ratios, (b * gmax + i) as usize, f32::NAN);
            i += 1;
        }
    }

    let accept_seed = philox::derive(p.seed, philox::PURPOSE_ACCEPT, 0);
    let mut k = g; // accepted
    let mut emit: i32 = -1;
    let mut rejected = false;
    let mut i = 0u32;
    while flags == 0 && i < g {
        let x = s.token(i);
        if x < 0 || x as u32 >= p.vocab {
            flags |= VERIFY_BAD_TOKEN;
            break;
        }
        let x = x as u32;
        // One fused pass over target row i (and draft row i in logits mode).
        let mut st = RowPair::EMPTY;
        let mut j = tid;
        while j < p.vocab {
            st.target.push(s.target(i, j), j, inv_tt);
            if read_draft_row {
                st.draft.push(s.draft_logit(i, j), j, inv_td);
            }
            j += block;
        }
        let st = block_all_reduce(st, (inv_tt, inv_td), pair_shared);
        flags |= st.target.problems();
        if read_draft_row {
            flags |= st.draft.problems();
        }
        if flags != 0 {
            break;
        }
        let ratio;
        let accept;
        if greedy {
            accept = st.target.argmax == x;
            ratio = if accept { 1.0 } else { 0.0 };
        } else {
            let px = st.target.prob(s.target(i, x), inv_tt);
            let qx = match draft {
                Draft::Probs => s.draft_prob(i, x),
                Draft::Greedy => 1.0,
                Draft::Logits => st.draft.prob(s.draft_logit(i, x), inv_td),
            };
            if !valid_prob(px) || !valid_prob(qx) {
                flags |= VERIFY_NONFINITE;
                break;
            }
            if qx == 0.0 {
                // The draft gave its own token probability 0: it cannot have proposed it.
                flags |= VERIFY_BAD_DRAFT;
                break;
            }
            let r = px / qx;
            if !(0.0..f32::INFINITY).contains(&r) {
                flags |= VERIFY_NONFINITE;
                break;
            }
            ratio = if r < 1.0 { r } else { 1.0 };
            let u = philox::uniform_open(philox::bits(accept_seed, i, b, p.step));
            accept = u < ratio;
        }
        if tid == 0 && !p.ratios.is_null() {
            gpu::st(p.ratios, (b * gmax + i) as usize, ratio);
        }
        if !accept {
            k = i;
            rejected = true;
            emit = if greedy {
                st.target.argmax as i32
            } else {
                let r = residual_sample(&s, i, x, &st, inv_tt, inv_td, draft, key_shared);
                flags |= r.flags;
                r.idx as i32
            };
            break;
        }
        i += 1;
    }

    if flags == 0 && !rejected {
        // All γ_b accepted: the bonus token from p_{γ_b}.
        let r = bonus_sample(&s, g, greedy, inv_tt, pair_shared, key_shared);
        flags |= r.flags;
        emit = r.idx as i32;
    }

    if tid == 0 {
        let width = gmax + 1;
        let base = (b * width) as usize;
        let ok = flags == 0;
        let mut j = 0;
        while j < width {
            let tok = if !ok {
                -1
            } else if j < k {
                s.token(j)
            } else if j == k {
                emit
            } else {
                -1
            };
            gpu::st(p.emitted, base + j as usize, tok);
            if !p.counterfactual.is_null() {
                let c = if ok && j <= g {
                    (if k < j { k } else { j }) as i32 + 1
                } else {
                    -1
                };
                gpu::st(p.counterfactual, base + j as usize, c);
            }
            j += 1;
        }
        gpu::st(p.accepted, b as usize, if ok { k as i32 } else { 0 });
        gpu::st(
            p.emitted_count,
            b as usize,
            if ok { k as i32 + 1 } else { 0 },
        );
        gpu::st(p.seq_flags, b as usize, flags);
    }
}

/// A draw from norm(max(0, p_i − q_i)) by exponential race, or — when rounding left no positive
/// residual — from p_i itself (Gumbel-max), so a token is always emitted. With a greedy draft
/// q_i is one-hot at the drafted token `x`; with probabilities, every q_j read is validated
/// (`VERIFY_NONFINITE` when one is not in [0, 1]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn residual_sample<L: Logit>(
    s: &Seq<'_, L>,
    i: u32,
    x: u32,
    st: &RowPair,
    inv_tt: f32,
    inv_td: f32,
    draft: Draft,
    shared: *mut KeyMax,
) -> KeyMax {
    let p = s.p;
    let emit_seed = philox::derive(p.seed, philox::PURPOSE_EMIT, i);
    let key = philox::key(emit_seed);
    let mut km = KeyMax::EMPTY;
    let mut j = gpu::thread_idx_x();
    while j < p.vocab {
        let pj = st.target.prob(s.target(i, j), inv_tt);
        let qj = match draft {
            Draft::Probs => s.draft_prob(i, j),
            Draft::Greedy => {
                if j == x {
                    1.0
                } else {
                    0.0
                }
            }
            Draft::Logits => st.draft.prob(s.draft_logit(i, j), inv_td),
        };
        if !valid_prob(qj) || !valid_prob(pj) {
            km.flags |= VERIFY_NONFINITE;
        }
        let w = pj - qj;
        if w > 0.0 {
            let bits = philox::word(
                philox::philox4x32_10(philox::counter(j, s.b, p.step), key),
                j,
            );
            let e = -philox::ln_det(philox::uniform_open(bits));
            km.offer(w / e, j);
        }
        j += gpu::block_dim_x();
    }
    let km = block_all_reduce(km, (), shared);
    if km.flags != 0 || km.idx != u32::MAX {
        return km;
    }
    gumbel_target(s, i, false, inv_tt, shared)
}

/// The token after an all-accepted step: target argmax (greedy) or Gumbel-max of p_{γ}.
#[inline(always)]
unsafe fn bonus_sample<L: Logit>(
    s: &Seq<'_, L>,
    g: u32,
    greedy: bool,
    inv_tt: f32,
    pair_shared: *mut RowPair,
    key_shared: *mut KeyMax,
) -> KeyMax {
    if greedy {
        let mut st = RowPair::EMPTY;
        let mut j = gpu::thread_idx_x();
        while j < s.p.vocab {
            st.target.push(s.target(g, j), j, 1.0);
            j += gpu::block_dim_x();
        }
        let st = block_all_reduce(st, (1.0, 1.0), pair_shared);
        return KeyMax {
            key: 0.0,
            idx: st.target.argmax,
            flags: st.target.problems(),
            live: 1,
        };
    }
    gumbel_target(s, g, true, inv_tt, key_shared)
}

/// Gumbel-max over target row `i`: argmax_j (x_j / T + g_j), noise from the emission sub-stream
/// of position `i`. With `check`, flags NaN / +inf logits and an all −inf row.
#[inline(always)]
unsafe fn gumbel_target<L: Logit>(
    s: &Seq<'_, L>,
    i: u32,
    check: bool,
    inv_tt: f32,
    shared: *mut KeyMax,
) -> KeyMax {
    let p = s.p;
    let key = philox::key(philox::derive(p.seed, philox::PURPOSE_EMIT, i));
    let mut km = KeyMax::EMPTY;
    let mut j = gpu::thread_idx_x();
    while j < p.vocab {
        let x = s.target(i, j);
        if x.is_nan() || x == f32::INFINITY {
            km.flags |= VERIFY_NONFINITE;
        } else if x != f32::NEG_INFINITY {
            let bits = philox::word(
                philox::philox4x32_10(philox::counter(j, s.b, p.step), key),
                j,
            );
            km.offer(x * inv_tt + philox::gumbel(philox::uniform_open(bits)), j);
            km.live = 1;
        }
        j += gpu::block_dim_x();
    }
    let mut km = block_all_reduce(km, (), shared);
    if !check {
        km.flags = 0;
    } else if km.flags == 0 && km.live == 0 {
        km.flags = VERIFY_ALL_MASKED;
    }
    km
}

/// f32 logits.
///
/// # Safety
/// See [`verify`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn verify_f32(p: VerifyParams) {
    verify::<F32>(&p)
}

/// f16 logits.
///
/// # Safety
/// See [`verify`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn verify_f16(p: VerifyParams) {
    verify::<F16>(&p)
}

/// bf16 logits.
///
/// # Safety
/// See [`verify`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn verify_bf16(p: VerifyParams) {
    verify::<Bf16>(&p)
}

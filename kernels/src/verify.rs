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
    VerifyParams, VerifyV2Params, VERIFY_ALL_MASKED, VERIFY_BAD_DRAFT, VERIFY_BAD_GAMMA,
    VERIFY_BAD_TEMPERATURE, VERIFY_BAD_TOKEN, VERIFY_DRAFT_PROBS, VERIFY_NONFINITE,
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

// =============================================================================================
// v2: target rows reduced in parallel across blocks, a scalar acceptance walk, one split pass
// over the row that emits.

/// What `verify_v2_rows` decided for a sequence, read by `verify_v2_sample`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeqState {
    /// Accepted drafts.
    pub k: u32,
    /// The target row to draw the emitted token from.
    pub row: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// The drafted token at the rejected position (residual mode).
    pub x: u32,
}

/// No draw needed: the sequence's outputs are written (greedy, or flagged).
pub const MODE_DONE: u32 = 0;
/// Draw from norm(max(0, p − q)) at row `row`.
pub const MODE_RESIDUAL: u32 = 1;
/// Draw the bonus token from p at row `row`.
pub const MODE_BONUS: u32 = 2;

/// Byte offsets of the v2 workspace's parts (counters first, so zeroing the front is enough).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub row_counters: usize,
    pub seq_counters: usize,
    pub sample_counters: usize,
    pub row_partials: usize,
    pub row_summary: usize,
    pub seq_state: usize,
    pub sample_partials: usize,
    pub bytes: usize,
}

const fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

impl Layout {
    pub const fn new(batch: u32, gamma_max: u32, row_splits: u32, sample_splits: u32) -> Layout {
        let (b, rows) = (batch as usize, batch as usize * (gamma_max as usize + 1));
        let row_counters = 0;
        let seq_counters = row_counters + rows * 4;
        let sample_counters = seq_counters + b * 4;
        let row_partials = align16(sample_counters + b * 4);
        let rm = core::mem::size_of::<RowMax>();
        let row_summary = row_partials + rows * row_splits as usize * rm;
        let seq_state = row_summary + rows * rm;
        let sample_partials = seq_state + b * core::mem::size_of::<SeqState>();
        let bytes = sample_partials + b * sample_splits as usize * core::mem::size_of::<KeyMax>();
        Layout {
            row_counters,
            seq_counters,
            sample_counters,
            row_partials,
            row_summary,
            seq_state,
            sample_partials,
            bytes,
        }
    }

    /// Bytes that must be zero before the first launch (the counters).
    pub const fn counter_bytes(&self) -> usize {
        self.row_partials
    }
}

/// A v2 verification launch pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanV2 {
    pub row_splits: u32,
    pub row_chunk_vecs: u32,
    pub row_block: u32,
    pub row_grid: u32,
    pub sample_splits: u32,
    pub sample_chunk_vecs: u32,
    pub sample_block: u32,
    pub sample_grid: u32,
    pub shared_bytes: usize,
    pub workspace_bytes: usize,
}

/// The launches for `batch` sequences of up to `gamma_max` drafts over `vocab` elements of
/// `elem_bytes` bytes on a GPU with `sm_count` SMs. Host-side planning: not compiled into the PTX.
#[cfg(not(target_arch = "nvptx64"))]
pub const fn plan_v2(
    batch: u32,
    gamma_max: u32,
    vocab: u32,
    elem_bytes: usize,
    sm_count: u32,
) -> PlanV2 {
    let rows = batch * (gamma_max + 1);
    let r = crate::softmax_stats::plan_v2(rows, vocab, elem_bytes, sm_count);
    let s = crate::softmax_stats::plan_v2(batch, vocab, elem_bytes, sm_count);
    let block = if r.block > s.block { r.block } else { s.block };
    PlanV2 {
        row_splits: r.splits,
        row_chunk_vecs: r.chunk_vecs,
        row_block: r.block,
        row_grid: r.grid,
        sample_splits: s.splits,
        sample_chunk_vecs: s.chunk_vecs,
        sample_block: s.block,
        sample_grid: s.grid,
        shared_bytes: shared_bytes(block) + 16,
        workspace_bytes: Layout::new(batch, gamma_max, r.splits, s.splits).bytes,
    }
}

/// Typed pointers into the workspace.
struct Ws {
    row_counters: *mut u32,
    seq_counters: *mut u32,
    sample_counters: *mut u32,
    row_partials: *mut RowMax,
    row_summary: *mut RowMax,
    seq_state: *mut SeqState,
    sample_partials: *mut KeyMax,
}

impl Ws {
    fn new(p: &VerifyV2Params) -> Ws {
        let l = Layout::new(
            p.base.batch,
            p.base.gamma_max,
            p.row_splits,
            p.sample_splits,
        );
        let w = p.workspace;
        Ws {
            row_counters: w.wrapping_add(l.row_counters) as *mut u32,
            seq_counters: w.wrapping_add(l.seq_counters) as *mut u32,
            sample_counters: w.wrapping_add(l.sample_counters) as *mut u32,
            row_partials: w.wrapping_add(l.row_partials) as *mut RowMax,
            row_summary: w.wrapping_add(l.row_summary) as *mut RowMax,
            seq_state: w.wrapping_add(l.seq_state) as *mut SeqState,
            sample_partials: w.wrapping_add(l.sample_partials) as *mut KeyMax,
        }
    }
}

impl Reduce for RowMax {
    type Ctx = f32;
    const EMPTY: RowMax = RowMax::EMPTY;
    #[inline(always)]
    fn merge(&mut self, o: &Self, inv_t: f32) {
        RowMax::merge(self, o, inv_t)
    }
    #[inline(always)]
    fn shfl_xor(&self, mask: u32) -> Self {
        self.shfl(mask)
    }
}

/// A sequence's validated γ and temperatures (flags when invalid).
struct SeqIn {
    g: u32,
    tt: f32,
    td: f32,
    flags: u32,
}

#[inline(always)]
unsafe fn seq_in(p: &VerifyParams, b: u32) -> SeqIn {
    let probs_mode = p.flags & VERIFY_DRAFT_PROBS != 0;
    let g = gpu::ld_nc(p.gammas, b as usize);
    let tt = gpu::ld_nc(p.target_temperature, b as usize);
    let td = if probs_mode {
        1.0
    } else {
        gpu::ld_nc(p.draft_temperature, b as usize)
    };
    let mut flags = 0;
    if g < 0 || g as u32 > p.gamma_max {
        flags |= VERIFY_BAD_GAMMA;
    }
    if !valid_temperature(tt) || !valid_temperature(td) {
        flags |= VERIFY_BAD_TEMPERATURE;
    }
    SeqIn {
        g: if flags != 0 { 0 } else { g as u32 },
        tt,
        td,
        flags,
    }
}

/// Writes sequence `b`'s outputs (the accepted prefix, `emit`, counterfactuals, counts, flags).
#[inline(always)]
unsafe fn write_outputs(p: &VerifyParams, b: u32, g: u32, k: u32, emit: i32, flags: u32) {
    let gmax = p.gamma_max;
    let width = gmax + 1;
    let base = (b * width) as usize;
    let ok = flags == 0;
    let mut j = 0;
    while j < width {
        let tok = if !ok {
            -1
        } else if j < k {
            gpu::ld_nc(p.draft_tokens, (b * gmax + j) as usize)
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

/// `verify_v2_rows`: the target rows' (max, Σ, argmax), then the acceptance walk.
///
/// # Safety
/// The buffers of `p.base` as for [`verify`]; `p.draft_stats` as documented on `VerifyV2Params`;
/// the workspace as [`plan_v2`] sizes it, counters zero. Launch `grid.x = batch × (γmax + 1) ×
/// row_splits`, a block size that is a multiple of 32 and `plan.shared_bytes` of shared memory.
#[inline(always)]
pub unsafe fn verify_v2_rows<L: Logit>(p2: &VerifyV2Params) {
    let p = &p2.base;
    let splits = core::num::NonZeroU32::new(p2.row_splits).unwrap_or(core::num::NonZeroU32::MIN);
    let per_seq = core::num::NonZeroU32::new(p.gamma_max + 1).unwrap_or(core::num::NonZeroU32::MIN);
    let blk = gpu::block_idx_x();
    let row = blk / splits;
    let split = blk % splits;
    let b = row / per_seq;
    let i = row % per_seq;
    if b >= p.batch {
        return;
    }
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let ws = Ws::new(p2);
    let sq = seq_in(p, b);
    if sq.flags != 0 {
        if i == 0 && split == 0 && tid == 0 {
            let mut j = 0;
            while !p.ratios.is_null() && j < p.gamma_max {
                gpu::st(p.ratios, (b * p.gamma_max + j) as usize, f32::NAN);
                j += 1;
            }
            gpu::st(
                ws.seq_state,
                b as usize,
                SeqState {
                    k: 0,
                    row: 0,
                    mode: MODE_DONE,
                    x: 0,
                },
            );
            write_outputs(p, b, 0, 0, -1, sq.flags);
        }
        return;
    }
    if i > sq.g {
        return; // a row no decision of this sequence can read
    }
    let greedy = sq.tt == 0.0;
    let inv_tt = if greedy { 1.0 } else { 1.0 / sq.tt };
    let base = p
        .target_logits
        .wrapping_add((row as usize) * (p.target_stride as usize) * L::SIZE);
    let mut acc = RowAcc {
        st: RowMax::EMPTY,
        inv_t: inv_tt,
    };
    crate::rows::for_chunk::<L, RowAcc>(
        base,
        p.vocab,
        split,
        splits.get(),
        p2.row_chunk_vecs,
        &mut acc,
    );
    let st = acc.st;
    let shared = gpu::dynamic_shared::<RowMax>();
    let flag = (shared as *mut u8).wrapping_add(shared_bytes(block)) as *mut u32;
    let st = block_all_reduce(st, inv_tt, shared);
    let summary = if splits.get() == 1 {
        st
    } else {
        if !crate::rows::arrive_last(
            ws.row_partials,
            (row * splits.get() + split) as usize,
            st,
            ws.row_counters.wrapping_add(row as usize),
            splits.get(),
            flag,
        ) {
            return;
        }
        let mut m = RowMax::EMPTY;
        let mut k = tid;
        while k < splits.get() {
            m.merge(
                &gpu::ld(ws.row_partials, (row * splits.get() + k) as usize),
                inv_tt,
            );
            k += block;
        }
        let m = block_all_reduce(m, inv_tt, shared);
        if tid == 0 {
            gpu::st(ws.row_counters, row as usize, 0);
        }
        m
    };
    // The row is reduced; the last of the sequence's g + 1 rows runs the acceptance walk.
    if !crate::rows::arrive_last(
        ws.row_summary,
        row as usize,
        summary,
        ws.seq_counters.wrapping_add(b as usize),
        sq.g + 1,
        flag,
    ) {
        return;
    }
    if tid == 0 {
        gpu::st(ws.seq_counters, b as usize, 0);
        accept_walk::<L>(p2, &ws, b, &sq);
    }
}

/// The acceptance walk of sequence `b` (one thread): per position, p(x) and q(x) from one load
/// each; the outputs of greedy and flagged sequences, or the draw `verify_v2_sample` must make.
#[inline(always)]
unsafe fn accept_walk<L: Logit>(p2: &VerifyV2Params, ws: &Ws, b: u32, sq: &SeqIn) {
    let p = &p2.base;
    let gmax = p.gamma_max;
    let g = sq.g;
    let greedy = sq.tt == 0.0;
    let inv_tt = if greedy { 1.0 } else { 1.0 / sq.tt };
    let probs_mode = p.flags & VERIFY_DRAFT_PROBS != 0;
    let draft_greedy = !probs_mode && sq.td == 0.0;
    let inv_td = if probs_mode || draft_greedy {
        1.0
    } else {
        1.0 / sq.td
    };
    let accept_seed = philox::derive(p.seed, philox::PURPOSE_ACCEPT, 0);
    let seq = Seq::<L> {
        p,
        b,
        _l: core::marker::PhantomData,
    };
    let mut j = 0;
    while !p.ratios.is_null() && j < gmax {
        gpu::st(p.ratios, (b * gmax + j) as usize, f32::NAN);
        j += 1;
    }
    let mut flags = 0u32;
    let mut k = g;
    let mut rejected = false;
    let mut x_rej = 0u32;
    let mut i = 0u32;
    while i < g {
        let x = seq.token(i);
        if x < 0 || x as u32 >= p.vocab {
            flags |= VERIFY_BAD_TOKEN;
            break;
        }
        let x = x as u32;
        let rs = gpu::ld(ws.row_summary, (b * (gmax + 1) + i) as usize);
        flags |= rs.problems();
        if flags != 0 {
            break;
        }
        let (accept, ratio) = if greedy {
            let a = rs.argmax == x;
            (a, if a { 1.0 } else { 0.0 })
        } else {
            let px = rs.prob(seq.target(i, x), inv_tt);
            let qx = if probs_mode {
                seq.draft_prob(i, x)
            } else if draft_greedy {
                1.0
            } else {
                let ds = gpu::ld_nc(p2.draft_stats, (b * gmax + i) as usize);
                if ds.flags != 0 || !ds.lse.is_finite() {
                    flags |= VERIFY_NONFINITE;
                    break;
                }
                let xd = seq.draft_logit(i, x);
                if xd == f32::NEG_INFINITY {
                    0.0
                } else {
                    gpu::exp_approx(xd * inv_td - ds.lse)
                }
            };
            if !valid_prob(px) || !valid_prob(qx) {
                flags |= VERIFY_NONFINITE;
                break;
            }
            if qx == 0.0 {
                flags |= VERIFY_BAD_DRAFT;
                break;
            }
            let r = px / qx;
            if !(0.0..f32::INFINITY).contains(&r) {
                flags |= VERIFY_NONFINITE;
                break;
            }
            let ratio = if r < 1.0 { r } else { 1.0 };
            let u = philox::uniform_open(philox::bits(accept_seed, i, b, p.step));
            (u < ratio, ratio)
        };
        if !p.ratios.is_null() {
            gpu::st(p.ratios, (b * gmax + i) as usize, ratio);
        }
        if !accept {
            k = i;
            rejected = true;
            x_rej = x;
            break;
        }
        i += 1;
    }
    let done = SeqState {
        k,
        row: k,
        mode: MODE_DONE,
        x: x_rej,
    };
    if flags != 0 {
        gpu::st(ws.seq_state, b as usize, done);
        write_outputs(p, b, g, 0, -1, flags);
        return;
    }
    if greedy {
        // The emitted token is the argmax of row k (the mismatch, or the bonus row g).
        let rs = gpu::ld(ws.row_summary, (b * (gmax + 1) + k) as usize);
        let f = rs.problems();
        gpu::st(ws.seq_state, b as usize, done);
        write_outputs(p, b, g, k, rs.argmax as i32, f);
        return;
    }
    if !rejected {
        let rs = gpu::ld(ws.row_summary, (b * (gmax + 1) + g) as usize);
        let f = rs.problems();
        if f != 0 {
            gpu::st(ws.seq_state, b as usize, done);
            write_outputs(p, b, g, 0, -1, f);
            return;
        }
    }
    gpu::st(
        ws.seq_state,
        b as usize,
        SeqState {
            k,
            row: k,
            mode: if rejected { MODE_RESIDUAL } else { MODE_BONUS },
            x: x_rej,
        },
    );
}

/// `verify_v2_sample`: the emitted token of every sequence that needs a draw.
///
/// # Safety
/// As [`verify_v2_rows`], launched after it on the same stream with the same parameters; grid
/// `batch × sample_splits`.
#[inline(always)]
pub unsafe fn verify_v2_sample<L: Logit>(p2: &VerifyV2Params) {
    let p = &p2.base;
    let splits = core::num::NonZeroU32::new(p2.sample_splits).unwrap_or(core::num::NonZeroU32::MIN);
    let blk = gpu::block_idx_x();
    let b = blk / splits;
    let split = blk % splits;
    if b >= p.batch {
        return;
    }
    let ws = Ws::new(p2);
    let state = gpu::ld(ws.seq_state, b as usize);
    if state.mode == MODE_DONE {
        return;
    }
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let sq = seq_in(p, b);
    let inv_tt = 1.0 / sq.tt; // stochastic: tt > 0
    let gmax = p.gamma_max;
    let i = state.row;
    let rs = gpu::ld(ws.row_summary, (b * (gmax + 1) + i) as usize);
    let base = p
        .target_logits
        .wrapping_add(((b * (gmax + 1) + i) as usize) * (p.target_stride as usize) * L::SIZE);
    let seq = Seq::<L> {
        p,
        b,
        _l: core::marker::PhantomData,
    };
    let probs_mode = p.flags & VERIFY_DRAFT_PROBS != 0;
    let draft_greedy = !probs_mode && sq.td == 0.0;
    let inv_td = if probs_mode || draft_greedy {
        1.0
    } else {
        1.0 / sq.td
    };
    let lse_d = if probs_mode || draft_greedy || state.mode == MODE_BONUS {
        0.0
    } else {
        gpu::ld_nc(p2.draft_stats, (b * gmax + i) as usize).lse
    };
    let mut race = Race {
        seq: &seq,
        rs,
        inv_tt,
        inv_td,
        lse_d,
        probs_mode,
        draft_greedy,
        residual: state.mode == MODE_RESIDUAL,
        row: i,
        x: state.x,
        key: philox::key(philox::derive(p.seed, philox::PURPOSE_EMIT, i)),
        km: KeyMax::EMPTY,
    };
    let residual = race.residual;
    crate::rows::for_chunk::<L, Race<'_, '_, L>>(
        base,
        p.vocab,
        split,
        splits.get(),
        p2.sample_chunk_vecs,
        &mut race,
    );
    let km = race.km;
    let shared = gpu::dynamic_shared::<KeyMax>();
    let flag = (shared as *mut u8).wrapping_add(shared_bytes(block)) as *mut u32;
    let km = block_all_reduce(km, (), shared);
    let km = if splits.get() == 1 {
        km
    } else {
        if !crate::rows::arrive_last(
            ws.sample_partials,
            (b * splits.get() + split) as usize,
            km,
            ws.sample_counters.wrapping_add(b as usize),
            splits.get(),
            flag,
        ) {
            return;
        }
        let mut m = KeyMax::EMPTY;
        let mut k = tid;
        while k < splits.get() {
            m.merge(
                &gpu::ld(ws.sample_partials, (b * splits.get() + k) as usize),
                (),
            );
            k += block;
        }
        let m = block_all_reduce(m, (), shared);
        if tid == 0 {
            gpu::st(ws.sample_counters, b as usize, 0);
        }
        m
    };
    // Rounding left no positive residual: a Gumbel-max draw from p itself, as v1 does (rare; this
    // one block reads the row).
    let km = if residual && km.flags == 0 && km.idx == u32::MAX {
        gumbel_target(&seq, i, false, inv_tt, shared)
    } else {
        km
    };
    if tid == 0 {
        write_outputs(p, b, sq.g, state.k, km.idx as i32, km.flags);
    }
}

/// One sequence's draw in `verify_v2_sample`: the residual race w / E or the bonus Gumbel race.
struct Race<'a, 'p, L> {
    seq: &'a Seq<'p, L>,
    rs: RowMax,
    inv_tt: f32,
    inv_td: f32,
    lse_d: f32,
    probs_mode: bool,
    draft_greedy: bool,
    residual: bool,
    row: u32,
    x: u32,
    key: [u32; 2],
    km: KeyMax,
}

/// (max, Σ, argmax) of a target row chunk.
struct RowAcc {
    st: RowMax,
    inv_t: f32,
}

impl crate::rows::Visit for RowAcc {
    #[inline(always)]
    fn scalar(&mut self, x: f32, j: u32) {
        self.st.push(x, j, self.inv_t);
    }
}

impl<L: Logit> crate::rows::Visit for Race<'_, '_, L> {
    #[inline(always)]
    fn scalar(&mut self, x: f32, j: u32) {
        // SAFETY: the kernel's contract covers every row element the race reads.
        unsafe { self.visit(x, j) }
    }
}

impl<L: Logit> Race<'_, '_, L> {
    #[inline(always)]
    unsafe fn visit(&mut self, x: f32, j: u32) {
        let p = self.seq.p;
        let b = self.seq.b;
        if self.residual {
            let pj = self.rs.prob(x, self.inv_tt);
            let qj = if self.probs_mode {
                self.seq.draft_prob(self.row, j)
            } else if self.draft_greedy {
                if j == self.x {
                    1.0
                } else {
                    0.0
                }
            } else {
                let xd = self.seq.draft_logit(self.row, j);
                if xd == f32::NEG_INFINITY {
                    0.0
                } else {
                    gpu::exp_approx(xd * self.inv_td - self.lse_d)
                }
            };
            if !valid_prob(qj) || !valid_prob(pj) {
                self.km.flags |= VERIFY_NONFINITE;
            }
            let w = pj - qj;
            if w > 0.0 {
                let bits = philox::word(
                    philox::philox4x32_10(philox::counter(j, b, p.step), self.key),
                    j,
                );
                let e = -philox::ln_det(philox::uniform_open(bits));
                self.km.offer(w / e, j);
            }
        } else if x != f32::NEG_INFINITY {
            let z = x * self.inv_tt;
            // No Gumbel variate exceeds GUMBEL_BOUND: skip what cannot win (exactly).
            if z + crate::softmax_stats::GUMBEL_BOUND > self.km.key {
                let bits = philox::word(
                    philox::philox4x32_10(philox::counter(j, b, p.step), self.key),
                    j,
                );
                self.km
                    .offer(z + philox::gumbel(philox::uniform_open(bits)), j);
            }
        }
    }
}

macro_rules! entries_verify_v2 {
    ($($rows:ident, $sample:ident: $ty:ty;)*) => {$(
        /// # Safety
        /// See [`verify_v2_rows`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $rows(p: VerifyV2Params) {
            verify_v2_rows::<$ty>(&p)
        }
        /// # Safety
        /// See [`verify_v2_sample`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $sample(p: VerifyV2Params) {
            verify_v2_sample::<$ty>(&p)
        }
    )*};
}

entries_verify_v2! {
    verify_v2_rows_f32, verify_v2_sample_f32: F32;
    verify_v2_rows_f16, verify_v2_sample_f16: F16;
    verify_v2_rows_bf16, verify_v2_sample_bf16: Bf16;
}

/// Everything a stand-alone v2 verification needs: the draft rows' statistics first (logits mode;
/// an engine that kept them from drafting skips this launch), then the two verification launches,
/// and one workspace holding both scratches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullPlanV2 {
    pub verify: PlanV2,
    /// The draft-row statistics launch (`batch × γmax` rows).
    pub stats: crate::softmax_stats::PlanV2,
    /// Byte offsets in the workspace (verification scratch first, at 0).
    pub stats_counters: usize,
    pub stats_partials: usize,
    pub draft_stats: usize,
    /// Bytes that must be zero before the first launch: `[0, verify counters)` and
    /// `[stats_counters, stats_partials)`.
    pub bytes: usize,
}

/// Plans a stand-alone v2 verification (see [`FullPlanV2`]). Host-side only.
#[cfg(not(target_arch = "nvptx64"))]
pub const fn full_plan_v2(
    batch: u32,
    gamma_max: u32,
    vocab: u32,
    elem_bytes: usize,
    sm_count: u32,
) -> FullPlanV2 {
    let verify = plan_v2(batch, gamma_max, vocab, elem_bytes, sm_count);
    let rows = batch * gamma_max;
    let stats = crate::softmax_stats::plan_v2(
        if rows == 0 { 1 } else { rows },
        vocab,
        elem_bytes,
        sm_count,
    );
    let stats_counters = align16(verify.workspace_bytes);
    let stats_partials = align16(stats_counters + rows as usize * 4);
    let draft_stats = stats_partials
        + rows as usize * stats.splits as usize * core::mem::size_of::<crate::params::StatsState>();
    let bytes = draft_stats + rows as usize * core::mem::size_of::<crate::params::RowStats>();
    FullPlanV2 {
        verify,
        stats,
        stats_counters,
        stats_partials,
        draft_stats,
        bytes,
    }
}

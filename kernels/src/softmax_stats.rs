//! Fused draft statistics: one read of each row of logits gives its max logit, log-sum-exp,
//! entropy (nats) and top-1 probability of softmax(x / T), its argmax, optionally a token drawn from
//! softmax(x / T), and updates the row's sequence feature accumulator in place.
//!
//! Algorithm (v1): one block per row. Each thread walks its strided share of the row with an
//! online recurrence over (max, Σ e^{z−m}, Σ e^{z−m}(z−m)) — rescaled when the max moves — plus the
//! argmax and the best Gumbel key; the partial states merge with xor-shuffles inside each warp,
//! then through shared memory across warps. Entropy = ln S − U / S, confidence = 1 / S.
//!
//! Sampling is Gumbel-max: token = argmax_i(z_i + g_i), g_i = −ln(−ln u_i), u_i from Philox at
//! counter (i / 4, row, step). The keys use only correctly rounded IEEE arithmetic
//! ([`philox::gumbel`]), and the argmax breaks ties towards the lower index, so the token is the
//! same on the GPU, the emulator and the CPU backend, whatever the block size.
//!
//! Non-finite input is flagged, never averaged: a NaN or +inf logit (or x / T overflowing) sets
//! `ROW_NONFINITE`, a row of only −inf sets `ROW_ALL_MASKED`; −inf alone is a masked token with
//! probability 0. A temperature that is negative, NaN, infinite or below `f32::MIN_POSITIVE` (1/T
//! not finite) sets `ROW_BAD_TEMPERATURE`. Statistics are finite or flagged, never silently NaN.

use crate::gpu;
use crate::params::{
    FeatureAccum, RowStats, SoftmaxStatsParams, SoftmaxStatsV2Params, SoftmaxStatsV3Params,
    StatsState, ROW_ALL_MASKED, ROW_BAD_INDEX, ROW_BAD_TEMPERATURE, ROW_NONFINITE,
    STATS_ACCUMULATE, STATS_ACCUM_RESET, STATS_DECIDE, STATS_SAMPLE, STATS_STOP,
};
use crate::philox;
use crate::reduce::{block_all_reduce, Reduce};
use crate::verify::valid_temperature;

/// An element type the kernel reads: loads one logit as f32.
pub trait Logit {
    /// Bytes per element.
    const SIZE: usize;
    /// # Safety
    /// `base` plus `index` elements must be readable.
    unsafe fn load(base: *const u8, index: u64) -> f32;
    /// A 16-bit element's bits as f32 (f16 and bf16; unused for f32).
    fn half(bits: u16) -> f32;
}

pub struct F32;
pub struct F16;
pub struct Bf16;

// Logits are inputs no thread writes: loaded through the read-only path.
impl Logit for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn load(base: *const u8, index: u64) -> f32 {
        gpu::ld_nc(base as *const f32, index as usize)
    }
    #[inline(always)]
    fn half(_: u16) -> f32 {
        0.0
    }
}
impl Logit for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(base: *const u8, index: u64) -> f32 {
        gpu::f16_to_f32(gpu::ld_nc(base as *const u16, index as usize))
    }
    #[inline(always)]
    fn half(bits: u16) -> f32 {
        gpu::f16_to_f32(bits)
    }
}
impl Logit for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(base: *const u8, index: u64) -> f32 {
        gpu::bf16_to_f32(gpu::ld_nc(base as *const u16, index as usize))
    }
    #[inline(always)]
    fn half(bits: u16) -> f32 {
        gpu::bf16_to_f32(bits)
    }
}

/// Dynamic shared memory a launch with `block` threads needs.
pub const fn shared_bytes(block: u32) -> usize {
    (block.div_ceil(gpu::WARP_SIZE) as usize) * core::mem::size_of::<StatsState>()
}

impl StatsState {
    pub const EMPTY: StatsState = StatsState {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        u: 0.0,
        argmax: u32::MAX,
        key: f32::NEG_INFINITY,
        key_idx: u32::MAX,
        key_z: f32::NAN,
        flags: 0,
    };

    /// Takes element `i` with raw logit `x` into the state. `inv_t` is 1/T (1 in greedy mode).
    #[inline(always)]
    pub fn push(&mut self, x: f32, i: u32, inv_t: f32, key: f32) {
        if x == f32::NEG_INFINITY {
            return; // masked: probability 0
        }
        let z = x * inv_t;
        if !z.is_finite() {
            // NaN, +inf, or x / T overflowing (a temperature too small for these logits).
            self.flags |= ROW_NONFINITE;
            return;
        }
        if x > self.max {
            let m_new = z;
            if self.sum > 0.0 {
                let d = self.max * inv_t - m_new; // < 0
                let c = gpu::exp_approx(d);
                self.u = c * (self.u + d * self.sum);
                self.sum *= c;
            }
            self.max = x;
            self.argmax = i;
            self.sum += 1.0; // e^0, and (z − m) = 0 adds nothing to u
        } else {
            let d = z - self.max * inv_t;
            let e = gpu::exp_approx(d);
            self.sum += e;
            self.u += e * d;
        }
        if key > self.key {
            self.key = key;
            self.key_idx = i;
            self.key_z = z;
        }
    }

    /// Merges `o` into `self` (associative and commutative up to rounding; the argmax and the
    /// Gumbel winner are exactly order-independent thanks to the lowest-index tie-break).
    #[inline(always)]
    pub fn merge(&mut self, o: &StatsState, inv_t: f32) {
        self.flags |= o.flags;
        if o.key > self.key || (o.key == self.key && o.key_idx < self.key_idx) {
            self.key = o.key;
            self.key_idx = o.key_idx;
            self.key_z = o.key_z;
        }
        if o.sum == 0.0 {
            return;
        }
        if self.sum == 0.0 {
            self.max = o.max;
            self.argmax = o.argmax;
            self.sum = o.sum;
            self.u = o.u;
            return;
        }
        let take_other = o.max > self.max || (o.max == self.max && o.argmax < self.argmax);
        let m = if o.max > self.max { o.max } else { self.max };
        let mz = m * inv_t;
        let da = self.max * inv_t - mz;
        let db = o.max * inv_t - mz;
        let ca = gpu::exp_approx(da);
        let cb = gpu::exp_approx(db);
        self.u = ca * (self.u + da * self.sum) + cb * (o.u + db * o.sum);
        self.sum = self.sum * ca + o.sum * cb;
        self.max = m;
        if take_other {
            self.argmax = o.argmax;
        }
    }

    /// The row's statistics from its merged state.
    #[inline(always)]
    pub fn finish(
        &self,
        inv_t: f32,
        greedy: bool,
        sample: bool,
        bad_temperature: bool,
    ) -> RowStats {
        let mut flags = self.flags;
        if bad_temperature {
            flags |= ROW_BAD_TEMPERATURE;
        }
        if flags == 0 && self.sum == 0.0 {
            flags |= ROW_ALL_MASKED;
        }
        if flags != 0 {
            return RowStats::flagged(flags);
        }
        let ln_sum = gpu::ln_approx(self.sum);
        let entropy = ln_sum - self.u / self.sum;
        let confidence = 1.0 / self.sum;
        if !(entropy.is_finite() && confidence.is_finite() && ln_sum.is_finite()) {
            // Never for valid input; a result is either finite or flagged, never silently NaN.
            return RowStats::flagged(ROW_NONFINITE);
        }
        let mz = self.max * inv_t;
        let (sampled, sampled_prob) = if greedy {
            (self.argmax as i32, confidence)
        } else if sample {
            (
                self.key_idx as i32,
                gpu::exp_approx(self.key_z - mz) / self.sum,
            )
        } else {
            (-1, f32::NAN)
        };
        RowStats {
            max_logit: self.max,
            lse: mz + ln_sum,
            // Rounding can leave a one-hot row a hair below zero; entropy is never negative.
            entropy: if entropy > 0.0 { entropy } else { 0.0 },
            confidence,
            argmax: self.argmax as i32,
            sampled,
            sampled_prob,
            flags: 0,
        }
    }
}

impl Reduce for StatsState {
    type Ctx = f32; // 1 / T
    const EMPTY: StatsState = StatsState::EMPTY;
    #[inline(always)]
    fn merge(&mut self, o: &Self, inv_t: f32) {
        StatsState::merge(self, o, inv_t)
    }
    #[inline(always)]
    fn shfl_xor(&self, mask: u32) -> Self {
        StatsState {
            max: gpu::shfl_xor_f32(self.max, mask),
            sum: gpu::shfl_xor_f32(self.sum, mask),
            u: gpu::shfl_xor_f32(self.u, mask),
            argmax: gpu::shfl_xor_u32(self.argmax, mask),
            key: gpu::shfl_xor_f32(self.key, mask),
            key_idx: gpu::shfl_xor_u32(self.key_idx, mask),
            key_z: gpu::shfl_xor_f32(self.key_z, mask),
            flags: gpu::shfl_xor_u32(self.flags, mask),
        }
    }
}

/// The kernel body, generic over the logit type; the entry points below instantiate it.
///
/// # Safety
/// `p.logits` must hold `rows` rows at `row_stride` elements apart with `vocab` readable elements
/// each, `p.out` `rows` writable results, `p.accum` (when accumulating) `rows` writable
/// accumulators; launch with `grid.x == rows`, `block.x` a multiple of 32 (≤ 1024) and
/// [`shared_bytes`]`(block.x)` bytes of dynamic shared memory.
#[inline(always)]
pub unsafe fn softmax_stats<L: Logit>(p: &SoftmaxStatsParams) {
    let row = gpu::block_idx_x();
    if row >= p.rows {
        return;
    }
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let t = p.temperature;
    let bad_temperature = !valid_temperature(t);
    let greedy = t == 0.0 || bad_temperature;
    let inv_t = if greedy { 1.0 } else { 1.0 / t };
    let sample = !greedy && (p.flags & STATS_SAMPLE) != 0;

    let base = p
        .logits
        .wrapping_add((row as usize) * (p.row_stride as usize) * L::SIZE);
    let mut st = StatsState::EMPTY;
    let mut i = tid;
    if sample {
        let key = philox::key(p.seed);
        while i < p.vocab {
            let x = L::load(base, i as u64);
            let bits = philox::word(
                philox::philox4x32_10(philox::counter(i, row, p.step), key),
                i,
            );
            let g = philox::gumbel(philox::uniform_open(bits));
            st.push(x, i, inv_t, x * inv_t + g);
            i += block;
        }
    } else {
        while i < p.vocab {
            let x = L::load(base, i as u64);
            st.push(x, i, inv_t, f32::NEG_INFINITY);
            i += block;
        }
    }

    let s = block_all_reduce(st, inv_t, gpu::dynamic_shared::<StatsState>());
    if tid == 0 {
        let r = s.finish(inv_t, greedy, sample, bad_temperature);
        gpu::st(p.out, row as usize, r);
        if p.flags & STATS_ACCUMULATE != 0 && !p.accum.is_null() {
            let mut a = if p.flags & STATS_ACCUM_RESET != 0 {
                FeatureAccum::EMPTY
            } else {
                gpu::ld(p.accum, row as usize)
            };
            a.push(r.entropy, r.confidence, r.flags);
            gpu::st(p.accum, row as usize, a);
        }
    }
}

/// f32 logits.
///
/// # Safety
/// See [`softmax_stats`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn softmax_stats_f32(p: SoftmaxStatsParams) {
    softmax_stats::<F32>(&p)
}

/// f16 logits.
///
/// # Safety
/// See [`softmax_stats`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn softmax_stats_f16(p: SoftmaxStatsParams) {
    softmax_stats::<F16>(&p)
}

/// bf16 logits.
///
/// # Safety
/// See [`softmax_stats`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn softmax_stats_bf16(p: SoftmaxStatsParams) {
    softmax_stats::<Bf16>(&p)
}

// =============================================================================================
// v2: rows split across blocks, 16-byte loads, one Philox block per four elements, the γ
// decision fused into the final merge.
//
// A row is cut into a scalar head (elements before the first 16-byte-aligned address, at most 7),
// a body of 16-byte vectors, and a scalar tail. Block `s` of a row reads vectors
// `[s·chunk_vecs, (s+1)·chunk_vecs)` of the body (split 0 also the head, the last split the tail),
// `UNROLL` vectors per thread in flight. Per vector: its max first (one rescale per vector at most),
// then Σ e^{z−m} and Σ e^{z−m}(z−m) with one `ex2` per element. Sampling keys z + g are formed only
// where they can win: a Gumbel variate of 23-bit uniforms is below `GUMBEL_BOUND`, so an element
// with z + GUMBEL_BOUND ≤ the thread's best key is skipped, exactly (no key it could form wins);
// the Philox block of four elements is drawn once, when one of them needs it. The tokens are the
// v1 kernel's and the CPU backend's, bit for bit.

pub use crate::rows::{lanes, UNROLL};

/// Largest Gumbel variate −ln(−ln u) for u = `uniform_open(bits)` ≤ 1 − 2^-24: −ln(2^-24 − …) <
/// 16.64; the bound keeps a margin for `ln_det`'s rounding.
pub const GUMBEL_BOUND: f32 = 16.7;

/// How many blocks a v2 launch should have at least: two per SM, so batch 1 fills the GPU.
pub const CTAS_PER_SM: u32 = 2;

/// Fewest vectors a block is given (more blocks would only add merging).
pub const MIN_CHUNK_VECS: u32 = 16;

/// A v2 launch: `splits` blocks per row of `block` threads, `chunk_vecs` vectors each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanV2 {
    pub splits: u32,
    pub chunk_vecs: u32,
    pub block: u32,
    pub grid: u32,
    pub shared_bytes: usize,
}

/// The launch of `softmax_stats_v2` for `rows` rows of `vocab` elements of `elem_bytes` bytes on a
/// GPU with `sm_count` SMs: at least `CTAS_PER_SM × sm_count` blocks when the rows allow it, each
/// with at least `MIN_CHUNK_VECS` vectors, and a block size that keeps `UNROLL` vectors per thread
/// busy (32 to 256 threads). Host-side planning: not compiled into the PTX.
#[cfg(not(target_arch = "nvptx64"))]
pub const fn plan_v2(rows: u32, vocab: u32, elem_bytes: usize, sm_count: u32) -> PlanV2 {
    let w = lanes(elem_bytes);
    let vecs = vocab.div_ceil(w); // an upper bound of any row's body
    let want = (CTAS_PER_SM * if sm_count == 0 { 1 } else { sm_count }).div_ceil(if rows == 0 {
        1
    } else {
        rows
    });
    let most = {
        let m = vecs.div_ceil(MIN_CHUNK_VECS);
        if m == 0 {
            1
        } else {
            m
        }
    };
    let splits = if want < most { want } else { most };
    let splits = if splits == 0 { 1 } else { splits };
    let chunk_vecs = vecs.div_ceil(splits);
    // One warp per 32 × UNROLL vectors of the chunk, 1 to 8 warps.
    let warps = chunk_vecs.div_ceil(32 * UNROLL as u32);
    let warps = if warps < 1 {
        1
    } else if warps > 8 {
        8
    } else {
        warps
    };
    let block = warps * 32;
    PlanV2 {
        splits,
        chunk_vecs: if chunk_vecs == 0 { 1 } else { chunk_vecs },
        block,
        grid: rows * splits,
        shared_bytes: shared_bytes_v2(block),
    }
}

/// Dynamic shared memory of a v2 launch: the block reduction plus one word for the broadcast of
/// "this block merges the row".
pub const fn shared_bytes_v2(block: u32) -> usize {
    shared_bytes(block) + 16
}

/// A thread's v2 state: the statistics and the sampling race, plus the cached Philox block.
struct Thread {
    st: StatsState,
    inv_t: f32,
    sample: bool,
    key: [u32; 2],
    row: u32,
    step: u64,
    cached_group: u32,
    cached: [u32; 4],
}

impl crate::rows::Visit for Thread {
    #[inline(always)]
    fn scalar(&mut self, x: f32, i: u32) {
        Thread::scalar(self, x, i)
    }
    #[inline(always)]
    fn vector(&mut self, x: &[f32; 8], n: usize, i0: u32) {
        Thread::vector(self, x, n, i0)
    }
}

impl Thread {
    /// One scalar element (head or tail), as v1 takes it.
    #[inline(always)]
    fn scalar(&mut self, x: f32, i: u32) {
        let key = if self.sample {
            self.key_of(x, i)
        } else {
            f32::NEG_INFINITY
        };
        self.st.push(x, i, self.inv_t, key);
    }

    /// The sampling key of element `i`, or −inf where it cannot beat the thread's best.
    #[inline(always)]
    fn key_of(&mut self, x: f32, i: u32) -> f32 {
        if x == f32::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        let z = x * self.inv_t;
        // Cannot win (or z is not finite, which `push` flags): no key formed.
        let can_win = z + GUMBEL_BOUND > self.st.key;
        if !can_win {
            return f32::NEG_INFINITY;
        }
        let group = i / 4;
        if group != self.cached_group {
            self.cached = philox::philox4x32_10(philox::counter(i, self.row, self.step), self.key);
            self.cached_group = group;
        }
        z + philox::gumbel(philox::uniform_open(philox::word(self.cached, i)))
    }

    /// One vector of `n` elements starting at element `i0`.
    #[inline(always)]
    fn vector(&mut self, x: &[f32; 8], n: usize, i0: u32) {
        let inv_t = self.inv_t;
        // Validity and the vector's max (first occurrence).
        let mut bad = false;
        let mut vmax = f32::NEG_INFINITY;
        let mut vk = 0u32;
        crate::unroll!(k in 0..8 => {
            if k < n {
                let xk = x[k];
                bad |= xk != f32::NEG_INFINITY && !(xk * inv_t).is_finite();
                if xk > vmax {
                    vmax = xk;
                    vk = k as u32;
                }
            }
        });
        if bad {
            self.st.flags |= ROW_NONFINITE;
            return;
        }
        if vmax != f32::NEG_INFINITY {
            let st = &mut self.st;
            if vmax > st.max {
                if st.sum > 0.0 {
                    let d = st.max * inv_t - vmax * inv_t;
                    let c = gpu::exp_approx(d);
                    st.u = c * (st.u + d * st.sum);
                    st.sum *= c;
                }
                st.max = vmax;
                st.argmax = i0 + vk;
            }
            let mz = st.max * inv_t;
            let (mut s, mut u) = (0f32, 0f32);
            crate::unroll!(k in 0..8 => {
                if k < n {
                    let live = x[k] != f32::NEG_INFINITY;
                    let d = if live { x[k] * inv_t - mz } else { 0.0 };
                    let e = if live { gpu::exp_approx(d) } else { 0.0 };
                    s += e;
                    u += e * d;
                }
            });
            st.sum += s;
            st.u += u;
        }
        if self.sample {
            crate::unroll!(k in 0..8 => {
                if k < n {
                    let i = i0 + k as u32;
                    let key = self.key_of(x[k], i);
                    if key > self.st.key {
                        self.st.key = key;
                        self.st.key_idx = i;
                        self.st.key_z = x[k] * inv_t;
                    }
                }
            });
        }
    }
}

/// One block's share of a row, as v2 and v3 both reduce it.
struct RowJob {
    /// The row's first element.
    base: *const u8,
    vocab: u32,
    /// The launch row: its partials and arrival counter.
    row: u32,
    split: u32,
    splits: u32,
    chunk_vecs: u32,
    temperature: f32,
    sample: bool,
    seed: u64,
    step: u64,
    /// Philox stream of the draw.
    stream: u32,
}

/// A row's merged state and how it was read, on thread 0 of the block that finished it.
struct Merged {
    s: StatsState,
    inv_t: f32,
    greedy: bool,
    sample: bool,
    bad_temperature: bool,
}

/// Reduces this block's chunk of the row; every thread of the block calls it (it synchronises
/// the block). Returns the row's merged state on thread 0 of the block that merges the row — the
/// only block when `splits` is 1, else the last to arrive, which merges the partials in split
/// order (the same result whichever block that is) and leaves the row's counter zero.
///
/// # Safety
/// `j.base` holds `j.vocab` readable elements; `partials` `splits` states and `counter` one word
/// for this row, not shared with a concurrent launch; [`shared_bytes_v2`]`(block.x)` bytes of
/// dynamic shared memory.
#[inline(always)]
unsafe fn reduce_row<L: Logit>(
    j: &RowJob,
    partials: *mut StatsState,
    counter: *mut u32,
) -> Option<Merged> {
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let t = j.temperature;
    let bad_temperature = !valid_temperature(t);
    let greedy = t == 0.0 || bad_temperature;
    let inv_t = if greedy { 1.0 } else { 1.0 / t };
    let sample = !greedy && j.sample;
    let mut th = Thread {
        st: StatsState::EMPTY,
        inv_t,
        sample,
        key: philox::key(j.seed),
        row: j.stream,
        step: j.step,
        cached_group: u32::MAX,
        cached: [0; 4],
    };
    crate::rows::for_chunk::<L, Thread>(j.base, j.vocab, j.split, j.splits, j.chunk_vecs, &mut th);

    let reduce_shared = gpu::dynamic_shared::<StatsState>();
    let s = block_all_reduce(th.st, inv_t, reduce_shared);
    let merged = |s: StatsState| Merged {
        s,
        inv_t,
        greedy,
        sample,
        bad_temperature,
    };
    if j.splits == 1 {
        return if tid == 0 { Some(merged(s)) } else { None };
    }
    // Publish this block's partial; the last block of the row to arrive merges them all.
    let flag = (reduce_shared as *mut u8).wrapping_add(shared_bytes(block)) as *mut u32;
    if !crate::rows::arrive_last(
        partials,
        (j.row * j.splits + j.split) as usize,
        s,
        counter,
        j.splits,
        flag,
    ) {
        return None;
    }
    // Every thread merges a strided subset in split order, then the fixed-order block reduction:
    // the same result whichever block arrived last.
    let mut m = StatsState::EMPTY;
    let mut k = tid;
    while k < j.splits {
        m.merge(&gpu::ld(partials, (j.row * j.splits + k) as usize), inv_t);
        k += block;
    }
    let s = block_all_reduce(m, inv_t, reduce_shared);
    if tid != 0 {
        return None;
    }
    // Ready for the next launch.
    gpu::st(counter, 0, 0);
    Some(merged(s))
}

/// The v2 kernel body.
///
/// # Safety
/// `p.logits` must hold `rows` rows at `row_stride` elements apart with `vocab` readable elements
/// each, element-aligned; `p.out` `rows` results; `p.accum` (when accumulating) `rows`
/// accumulators; `p.partials` `rows × splits` states and `p.counters` `rows` words, zero at the
/// first launch and not shared with a concurrent launch; `p.decision` (with `STATS_DECIDE`) a
/// `GammaMlpParams` whose buffers have `rows` entries. Launch `grid.x = rows × splits`, `block.x` a
/// multiple of 32 (≤ 1024) and [`shared_bytes_v2`]`(block.x)` bytes of dynamic shared memory.
#[inline(always)]
pub unsafe fn softmax_stats_v2<L: Logit>(p: &SoftmaxStatsV2Params) {
    // A `NonZeroU32` divisor: no division-by-zero panic path reaches the PTX.
    let nz = core::num::NonZeroU32::new(p.splits).unwrap_or(core::num::NonZeroU32::MIN);
    let b = gpu::block_idx_x();
    let row = b / nz;
    if row >= p.rows {
        return;
    }
    let temperature = if p.temperatures.is_null() {
        p.temperature
    } else {
        let g =
            core::num::NonZeroU32::new(p.temperature_group).unwrap_or(core::num::NonZeroU32::MIN);
        gpu::ld_nc(p.temperatures, (row / g) as usize)
    };
    let job = RowJob {
        base: p
            .logits
            .wrapping_add((row as usize) * (p.row_stride as usize) * L::SIZE),
        vocab: p.vocab,
        row,
        split: b % nz,
        splits: nz.get(),
        chunk_vecs: p.chunk_vecs,
        temperature,
        sample: p.flags & STATS_SAMPLE != 0,
        seed: p.seed,
        step: p.step,
        stream: row,
    };
    let counter = p.counters.wrapping_add(row as usize);
    if let Some(m) = reduce_row::<L>(&job, p.partials, counter) {
        finish_row(p, row, &m.s, m.inv_t, m.greedy, m.sample, m.bad_temperature);
    }
}

/// The row's statistics, its accumulator and (with `STATS_DECIDE`) its sequence's next γ, or
/// (with `STATS_STOP`) whether its sequence drafts on.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_row(
    p: &SoftmaxStatsV2Params,
    row: u32,
    s: &StatsState,
    inv_t: f32,
    greedy: bool,
    sample: bool,
    bad_temperature: bool,
) {
    let r = s.finish(inv_t, greedy, sample, bad_temperature);
    gpu::st(p.out, row as usize, r);
    if p.flags & STATS_ACCUMULATE != 0
        && p.flags & STATS_STOP != 0
        && !p.accum.is_null()
        && !p.stop.is_null()
    {
        let reset = p.flags & STATS_ACCUM_RESET != 0;
        crate::stop_rule::epilogue(p, p.stop, row, r.entropy, r.confidence, r.flags, reset);
    } else if p.flags & STATS_ACCUMULATE != 0 && !p.accum.is_null() {
        let reset = p.flags & STATS_ACCUM_RESET != 0;
        let a = crate::stop_rule::accumulate_row(
            p.accum,
            row as usize,
            reset,
            r.entropy,
            r.confidence,
            r.flags,
        );
        if p.flags & STATS_DECIDE != 0 && !p.decision.is_null() {
            let d = gpu::ld(p.decision, 0);
            crate::gamma_mlp::decide_into(&d, row, &a);
        }
    }
}

macro_rules! entries_v2 {
    ($($name:ident: $ty:ty;)*) => {$(
        /// # Safety
        /// See [`softmax_stats_v2`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: SoftmaxStatsV2Params) {
            softmax_stats_v2::<$ty>(&p)
        }
    )*};
}

entries_v2! {
    softmax_stats_v2_f32: F32;
    softmax_stats_v2_f16: F16;
    softmax_stats_v2_bf16: Bf16;
}

// =============================================================================================
// v3: v2's split rows, each launch row described in device memory (`StatsRow`: which logits row,
// its seed, step, stream, temperature, flags and accumulator). A batch of sequences, each at its
// own place in its speculation step, gets every row's statistics from one launch — where v2,
// whose options are the launch's, needs one launch per sequence. v3 does not decide γ or stop
// (those epilogues read per-launch parameters): use v2 for them.

/// v3's launch is v2's plan for the same number of rows.
#[cfg(not(target_arch = "nvptx64"))]
pub const fn plan_v3(rows: u32, vocab: u32, elem_bytes: usize, sm_count: u32) -> PlanV2 {
    plan_v2(rows, vocab, elem_bytes, sm_count)
}

/// The v3 kernel body.
///
/// # Safety
/// `p.row_params` must hold `rows` descriptions and `p.out` `rows` results; `p.logits`
/// `logit_rows` rows at `row_stride` elements apart with `vocab` readable elements each,
/// element-aligned; `p.accum` `accum_slots` accumulators (or be null); no two accumulating rows
/// may name the same slot; `p.partials` `rows × splits` states and `p.counters` `rows` words,
/// zero at the first launch and not shared with a concurrent launch. Launch `grid.x = rows ×
/// splits`, `block.x` a multiple of 32 (≤ 1024) and [`shared_bytes_v2`]`(block.x)` bytes of
/// dynamic shared memory. A description naming a logits row or slot the launch lacks is flagged
/// (`ROW_BAD_INDEX`), not followed.
#[inline(always)]
pub unsafe fn softmax_stats_v3<L: Logit>(p: &SoftmaxStatsV3Params) {
    let nz = core::num::NonZeroU32::new(p.splits).unwrap_or(core::num::NonZeroU32::MIN);
    let b = gpu::block_idx_x();
    let k = b / nz;
    if k >= p.rows {
        return;
    }
    let split = b % nz;
    // Field by field through the pointer: the description stays in registers.
    let d = p.row_params.wrapping_add(k as usize);
    let row = gpu::ld_nc(core::ptr::addr_of!((*d).row), 0);
    let flags = gpu::ld_nc(core::ptr::addr_of!((*d).flags), 0);
    let slot = gpu::ld_nc(core::ptr::addr_of!((*d).accum_slot), 0);
    let accumulate = flags & STATS_ACCUMULATE != 0;
    // Uniform across the block (every thread read the same description): no barrier is skipped
    // by some threads only. An accumulating row without accumulators names a slot it lacks too.
    if row >= p.logit_rows || (accumulate && (p.accum.is_null() || slot >= p.accum_slots)) {
        if split == 0 && gpu::thread_idx_x() == 0 {
            gpu::st(p.out, k as usize, RowStats::flagged(ROW_BAD_INDEX));
        }
        return;
    }
    let job = RowJob {
        base: p
            .logits
            .wrapping_add((row as usize) * (p.row_stride as usize) * L::SIZE),
        vocab: p.vocab,
        row: k,
        split,
        splits: nz.get(),
        chunk_vecs: p.chunk_vecs,
        temperature: gpu::ld_nc(core::ptr::addr_of!((*d).temperature), 0),
        sample: flags & STATS_SAMPLE != 0,
        seed: gpu::ld_nc(core::ptr::addr_of!((*d).seed), 0),
        step: gpu::ld_nc(core::ptr::addr_of!((*d).step), 0),
        stream: gpu::ld_nc(core::ptr::addr_of!((*d).stream), 0),
    };
    let counter = p.counters.wrapping_add(k as usize);
    if let Some(m) = reduce_row::<L>(&job, p.partials, counter) {
        let r = m.s.finish(m.inv_t, m.greedy, m.sample, m.bad_temperature);
        gpu::st(p.out, k as usize, r);
        if accumulate {
            let mut a = if flags & STATS_ACCUM_RESET != 0 {
                FeatureAccum::EMPTY
            } else {
                gpu::ld(p.accum, slot as usize)
            };
            a.push(r.entropy, r.confidence, r.flags);
            gpu::st(p.accum, slot as usize, a);
        }
    }
}

macro_rules! entries_v3 {
    ($($name:ident: $ty:ty;)*) => {$(
        /// # Safety
        /// See [`softmax_stats_v3`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: SoftmaxStatsV3Params) {
            softmax_stats_v3::<$ty>(&p)
        }
    )*};
}

entries_v3! {
    softmax_stats_v3_f32: F32;
    softmax_stats_v3_f16: F16;
    softmax_stats_v3_bf16: Bf16;
}

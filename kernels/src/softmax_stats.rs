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
    FeatureAccum, RowStats, SoftmaxStatsParams, StatsState, ROW_ALL_MASKED, ROW_BAD_TEMPERATURE,
    ROW_NONFINITE, STATS_ACCUMULATE, STATS_ACCUM_RESET, STATS_SAMPLE,
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
}
impl Logit for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(base: *const u8, index: u64) -> f32 {
        gpu::f16_to_f32(gpu::ld_nc(base as *const u16, index as usize))
    }
}
impl Logit for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(base: *const u8, index: u64) -> f32 {
        gpu::bf16_to_f32(gpu::ld_nc(base as *const u16, index as usize))
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

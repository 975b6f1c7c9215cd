//! Causal grouped-query attention of the new positions over the f16 KV cache (decode and
//! verification: 1 to 16 queries per sequence).
//!
//! One block per (query position, head). Each warp walks every `warps`-th cache position with an
//! online softmax (running max, running sum, running weighted sum of v), its lanes holding
//! `head_dim / 32` elements of q, k and v (one load of 2, 4, 8 or 16 bytes per row); the q·k dot
//! product is a warp butterfly, so every lane agrees on the score. The warps' states meet in shared
//! memory and are merged in warp order: the result does not depend on scheduling.
//!
//! v1: the grid is `m · heads` blocks, fewer than an H200's SMs at batch 1 (a 1.5B Qwen2 has 12
//! heads). v2 (below; what the backends launch) splits each pair's cache positions across blocks.

use crate::gpu;
use crate::params::{AttentionParams, AttentionV2Params};

/// The widest head this kernel takes (8 elements per lane).
pub const MAX_HEAD_DIM: u32 = 256;

/// Elements of a head each lane holds, or None for a head size the kernel does not take (8, 16 or
/// 32 use one element per lane and leave lanes idle; 64, 128, 256 use 2, 4, 8).
pub const fn per_lane(head_dim: u32) -> Option<u32> {
    match head_dim {
        8 | 16 | 32 => Some(1),
        64 => Some(2),
        128 => Some(4),
        256 => Some(8),
        _ => None,
    }
}

/// Dynamic shared memory of a launch with `block` threads: per warp its max, its sum and its
/// `head_dim` weighted sums.
pub const fn shared_bytes(block: u32, head_dim: u32) -> usize {
    (block / 32) as usize * (2 + head_dim as usize) * 4
}

/// `EPL` f16 elements from `base[at..]` as f32 (one 2-, 4-, 8- or 16-byte load).
#[inline(always)]
unsafe fn halves<const EPL: usize>(base: *const u16, at: usize) -> [f32; EPL] {
    let mut out = [0f32; EPL];
    if EPL == 1 {
        crate::unroll!(j in 0..2 => {
            if j < EPL {
                out[j] = gpu::f16_to_f32(gpu::ld_nc(base, at));
            }
        });
    } else if EPL == 2 {
        let w: u32 = gpu::ld_nc(base as *const u32, at / 2);
        crate::unroll!(j in 0..2 => {
            if j < EPL {
                out[j] = gpu::f16_to_f32((w >> (16 * j)) as u16);
            }
        });
    } else if EPL == 4 {
        let w: u64 = gpu::ld_nc(base as *const u64, at / 4);
        crate::unroll!(j in 0..4 => {
            if j < EPL {
                out[j] = gpu::f16_to_f32((w >> (16 * j)) as u16);
            }
        });
    } else {
        let w = gpu::ld_v4(base, at);
        crate::unroll!(j in 0..8 => {
            if j < EPL {
                out[j] = gpu::f16_to_f32((w[j / 2] >> (16 * (j % 2))) as u16);
            }
        });
    }
    out
}

/// One (query position, head) pair as a block sees it.
struct Pair {
    /// Row of the query in the launch (position i of sequence b is row b·m + i), its head.
    row: usize,
    h: usize,
    /// The first element of the sequence's cache (`b · capacity · kvw`).
    cache: usize,
    heads: usize,
    hd: usize,
    /// Offset of this lane's elements in a cache row (`kv_head · head_dim + e0`).
    lane_col: usize,
    kvw: usize,
    /// Positions the query sees (`cache_len + i + 1`).
    n: usize,
    lane: usize,
    warp: usize,
    warps: usize,
    /// This lane's first element, and whether it holds any (`head_dim < 32` leaves lanes idle).
    e0: usize,
    live: bool,
}

/// The pair `pair` (`row · heads + h`) of a launch over `seqs` sequences of `m` positions, or None
/// when it is past the step or its length past the cache (the host checks first; every block of
/// the pair agrees).
#[inline(always)]
unsafe fn pair_of<const EPL: usize>(p: &AttentionParams, pair: usize, seqs: usize) -> Option<Pair> {
    let heads_nz =
        core::num::NonZeroUsize::new(p.heads as usize).unwrap_or(core::num::NonZeroUsize::MIN);
    let (row, h) = (pair / heads_nz, pair % heads_nz);
    let m_nz = core::num::NonZeroUsize::new(p.m as usize)?;
    if row >= seqs * m_nz.get() {
        return None;
    }
    let (seq, i) = (row / m_nz, row % m_nz);
    let heads = heads_nz.get();
    let group = core::num::NonZeroUsize::new(heads / (p.kv_heads as usize).max(1))
        .unwrap_or(core::num::NonZeroUsize::MIN);
    let hd = p.head_dim as usize;
    let n = gpu::ld(p.cache_len, seq) as usize + i + 1;
    if n > p.capacity as usize {
        return None;
    }
    let lane = gpu::lane_id() as usize;
    let e0 = lane * EPL;
    let kvw = p.kv_heads as usize * hd;
    Some(Pair {
        row,
        h,
        cache: seq * p.capacity as usize * kvw,
        heads,
        hd,
        lane_col: (h / group) * hd + e0,
        kvw,
        n,
        lane,
        warp: gpu::warp_id() as usize,
        warps: (gpu::block_dim_x() / gpu::WARP_SIZE) as usize,
        e0,
        live: e0 < hd,
    })
}

/// One warp's online softmax over the cache positions `start + warp, start + warp + warps, … <
/// end`: its running max and sum (base 2) and its weighted sums of v. `pos` depends on the warp only,
/// so every lane of a warp runs the same iterations (the shuffles need them all).
#[inline(always)]
unsafe fn warp_pass<const EPL: usize>(
    p: &AttentionParams,
    s: &Pair,
    start: usize,
    end: usize,
) -> (f32, f32, [f32; EPL]) {
    // q scaled so the scores are in base 2 (ex2).
    let qs = p.scale * core::f32::consts::LOG2_E;
    let mut q = [0f32; EPL];
    if s.live {
        let at = (s.row * s.heads + s.h) * s.hd + s.e0;
        crate::unroll!(j in 0..8 => {
            if j < EPL {
                q[j] = gpu::ld_nc(p.q, at + j) * qs;
            }
        });
    }
    let (mut mx, mut sum, mut acc) = (f32::NEG_INFINITY, 0f32, [0f32; EPL]);
    let mut pos = start + s.warp;
    while pos < end {
        let row = s.cache + pos * s.kvw + s.lane_col;
        let mut d = 0f32;
        if s.live {
            let k = halves::<EPL>(p.k_cache, row);
            crate::unroll!(j in 0..8 => {
                if j < EPL {
                    d += q[j] * k[j];
                }
            });
        }
        let mut mask = 16;
        while mask > 0 {
            d += gpu::shfl_xor_f32(d, mask);
            mask /= 2;
        }
        let m_new = if d > mx { d } else { mx };
        let corr = gpu::exp2_approx(mx - m_new);
        let w = gpu::exp2_approx(d - m_new);
        sum = sum * corr + w;
        if s.live {
            let v = halves::<EPL>(p.v_cache, row);
            crate::unroll!(j in 0..8 => {
                if j < EPL {
                    acc[j] = acc[j] * corr + w * v[j];
                }
            });
        }
        mx = m_new;
        pos += s.warps;
    }
    (mx, sum, acc)
}

/// Puts a warp's state in shared memory (`2 + head_dim` floats per warp: max, sum, weighted sums)
/// and waits for the block.
#[inline(always)]
unsafe fn stash<const EPL: usize>(sh: *mut f32, s: &Pair, state: (f32, f32, [f32; EPL])) {
    let (mx, sum, acc) = state;
    let stride = 2 + s.hd;
    if s.lane == 0 {
        gpu::sh_st(sh, s.warp * stride, mx);
        gpu::sh_st(sh, s.warp * stride + 1, sum);
    }
    if s.live {
        crate::unroll!(j in 0..8 => {
            if j < EPL {
                gpu::sh_st(sh, s.warp * stride + 2 + s.e0 + j, acc[j]);
            }
        });
    }
    gpu::sync_threads();
}

/// The largest of `count` maxima, the k-th read by `load(k)` (from shared memory or the workspace).
#[inline(always)]
fn top_of(count: usize, load: impl Fn(usize) -> f32) -> f32 {
    let mut top = f32::NEG_INFINITY;
    let mut w = 0;
    while w < count {
        let m = load(w);
        top = if m > top { m } else { top };
        w += 1;
    }
    top
}

/// Σ_w load(w, slot) · 2^(max_w − top) over the `count` states whose max is finite (a state that
/// saw no position holds −∞ and adds nothing).
#[inline(always)]
fn merged(
    count: usize,
    top: f32,
    max_of: impl Fn(usize) -> f32,
    load: impl Fn(usize) -> f32,
) -> f32 {
    let mut total = 0f32;
    let mut w = 0;
    while w < count {
        let m = max_of(w);
        if m > f32::NEG_INFINITY {
            total += load(w) * gpu::exp2_approx(m - top);
        }
        w += 1;
    }
    total
}

/// The kernel body for `EPL` elements per lane ([`per_lane`]).
///
/// # Safety
/// q and out hold `m × heads·head_dim` f32, the caches `capacity × kv_heads·head_dim` f16 (rows
/// `0 ..= cache_len + m − 1` written), `heads` a multiple of `kv_heads`, `per_lane(head_dim) ==
/// EPL`; the documented launch.
#[inline(always)]
pub unsafe fn attention<const EPL: usize>(p: &AttentionParams) {
    let Some(s) = pair_of::<EPL>(p, gpu::block_idx_x() as usize, 1) else {
        return;
    };
    let sh = gpu::dynamic_shared::<f32>();
    stash(sh, &s, warp_pass::<EPL>(p, &s, 0, s.n));
    let stride = 2 + s.hd;
    let max_of = |w: usize| gpu::sh_ld(sh, w * stride);
    let top = top_of(s.warps, max_of);
    let den = merged(s.warps, top, max_of, |w| gpu::sh_ld(sh, w * stride + 1));
    let mut e = gpu::thread_idx_x() as usize;
    while e < s.hd {
        let num = merged(s.warps, top, max_of, |w| gpu::sh_ld(sh, w * stride + 2 + e));
        gpu::st(p.out, (s.row * s.heads + s.h) * s.hd + e, num / den);
        e += gpu::block_dim_x() as usize;
    }
}

macro_rules! entries {
    ($($name:ident: $epl:literal;)*) => {$(
        /// # Safety
        /// See [`attention`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: AttentionParams) {
            attention::<$epl>(&p)
        }
    )*};
}

entries! {
    attention_f32_e1: 1; attention_f32_e2: 2; attention_f32_e4: 4; attention_f32_e8: 8;
}

// =============================================================================================
// v2: the cache positions of each (query position, head) split across `splits` blocks
// (flash-decoding), so a step at batch 1 fills the GPU: v1 gives a 12-head model 12 blocks. Each
// block reads the cache length, takes its share of the positions (ceil(n / splits), so every split
// has work at any length and a replayed step needs no new parameters), reduces it as v1 does, and
// writes its (max, sum, weighted sums) to the workspace; the last block of the pair to arrive merges
// the splits in split order, so the result does not depend on the schedule.

/// Blocks a v2 launch gives each (position, head) pair for `pairs` pairs on `sm_count` SMs: at least
/// two blocks per SM in all, at most [`MAX_SPLITS`].
pub const fn splits_v2(pairs: u32, sm_count: u32) -> u32 {
    let want = (2 * sm_count).div_ceil(if pairs == 0 { 1 } else { pairs });
    if want > MAX_SPLITS {
        MAX_SPLITS
    } else if want == 0 {
        1
    } else {
        want
    }
}

/// The most splits per pair (a split below ~8 positions per warp gains nothing).
pub const MAX_SPLITS: u32 = 32;

/// Workspace bytes of a v2 launch: one arrival counter per pair (padded to 16 bytes), then per
/// (pair, split) its max, sum and `head_dim` weighted sums.
pub const fn workspace_bytes_v2(pairs: u32, splits: u32, head_dim: u32) -> usize {
    counters_bytes(pairs) + (pairs * splits) as usize * (2 + head_dim as usize) * 4
}

const fn counters_bytes(pairs: u32) -> usize {
    (pairs as usize * 4).div_ceil(16) * 16
}

/// The v2 kernel body for `EPL` elements per lane.
///
/// # Safety
/// As [`attention`] for each of max(seqs, 1) sequences (q, out, the caches and `cache_len` holding
/// all of them, as [`AttentionV2Params`] lays them out), with `p2.workspace` of
/// [`workspace_bytes_v2`] bytes for `seqs · m · heads` pairs (counters zero; left zero), `splits ≥
/// 1` and the grid `seqs · m · heads · splits`.
#[inline(always)]
pub unsafe fn attention_v2<const EPL: usize>(p2: &AttentionV2Params) {
    let p = &p2.base;
    let splits_nz =
        core::num::NonZeroUsize::new(p2.splits as usize).unwrap_or(core::num::NonZeroUsize::MIN);
    let splits = splits_nz.get();
    let b = gpu::block_idx_x() as usize;
    let (pair, split) = (b / splits_nz, b % splits_nz);
    let seqs = if p2.seqs == 0 { 1 } else { p2.seqs };
    let Some(s) = pair_of::<EPL>(p, pair, seqs as usize) else {
        return;
    };
    let chunk = s.n.div_ceil(splits);
    let start = split * chunk;
    let end = if start + chunk < s.n {
        start + chunk
    } else {
        s.n
    };
    let sh = gpu::dynamic_shared::<f32>();
    stash(sh, &s, warp_pass::<EPL>(p, &s, start, end));
    // This block's state, merged over its warps, into the workspace.
    let stride = 2 + s.hd;
    let counters = p2.workspace as *mut u32;
    let partials = p2
        .workspace
        .wrapping_add(counters_bytes(seqs * p.m * p.heads)) as *mut f32;
    let mine = (pair * splits + split) * stride;
    let max_of = |w: usize| gpu::sh_ld(sh, w * stride);
    let top = top_of(s.warps, max_of);
    let tid = gpu::thread_idx_x() as usize;
    let block = gpu::block_dim_x() as usize;
    if tid == 0 {
        gpu::st(partials, mine, top);
        let den = merged(s.warps, top, max_of, |w| gpu::sh_ld(sh, w * stride + 1));
        gpu::st(partials, mine + 1, den);
    }
    let mut e = tid;
    while e < s.hd {
        let num = merged(s.warps, top, max_of, |w| gpu::sh_ld(sh, w * stride + 2 + e));
        gpu::st(partials, mine + 2 + e, num);
        e += block;
    }
    // Arrive; the last block of the pair merges every split's state in split order (an empty
    // split, n < splits, holds −∞ and adds nothing).
    let flag = sh.wrapping_add(s.warps * stride) as *mut u32;
    gpu::threadfence();
    gpu::sync_threads();
    if tid == 0 {
        let arrived = gpu::atomic_add_u32(counters.wrapping_add(pair), 1);
        gpu::sh_st(flag, 0, (arrived + 1 == p2.splits) as u32);
    }
    gpu::sync_threads();
    if gpu::sh_ld(flag, 0) == 0 {
        return;
    }
    gpu::threadfence();
    let first = pair * splits * stride;
    let split_max = |k: usize| gpu::ld(partials, first + k * stride);
    let top = top_of(splits, split_max);
    let den = merged(splits, top, split_max, |k| {
        gpu::ld(partials, first + k * stride + 1)
    });
    let mut e = tid;
    while e < s.hd {
        let num = merged(splits, top, split_max, |k| {
            gpu::ld(partials, first + k * stride + 2 + e)
        });
        gpu::st(p.out, (s.row * s.heads + s.h) * s.hd + e, num / den);
        e += block;
    }
    gpu::sync_threads();
    if tid == 0 {
        gpu::st(counters, pair, 0);
    }
}

/// Dynamic shared memory of a v2 launch: v1's, plus the flag word (16-byte padded).
pub const fn shared_bytes_v2(block: u32, head_dim: u32) -> usize {
    shared_bytes(block, head_dim) + 16
}

macro_rules! entries_v2 {
    ($($name:ident: $epl:literal;)*) => {$(
        /// # Safety
        /// See [`attention_v2`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: AttentionV2Params) {
            attention_v2::<$epl>(&p)
        }
    )*};
}

entries_v2! {
    attention_v2_f32_e1: 1; attention_v2_f32_e2: 2; attention_v2_f32_e4: 4; attention_v2_f32_e8: 8;
}

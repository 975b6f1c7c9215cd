//! Block-wide reductions shared by the kernels: xor-butterfly inside each warp, then every thread
//! merges the per-warp partials from shared memory in the same order, so every thread of the block
//! ends with the same (bit-identical) result without a broadcast step.

use crate::gpu;

/// A partial state that merges associatively (up to rounding) and moves between lanes.
pub trait Reduce: Copy {
    /// Whatever the merge needs besides the two states (a temperature, say).
    type Ctx: Copy;
    /// The identity of `merge`.
    const EMPTY: Self;
    fn merge(&mut self, other: &Self, ctx: Self::Ctx);
    /// This state as held by lane (lane ^ `mask`).
    fn shfl_xor(&self, mask: u32) -> Self;
}

/// Merges `s` across the warp; every lane ends with the warp's result.
#[inline(always)]
pub fn warp_all_reduce<S: Reduce>(mut s: S, ctx: S::Ctx) -> S {
    let mut mask = gpu::WARP_SIZE / 2;
    while mask > 0 {
        let o = s.shfl_xor(mask);
        s.merge(&o, ctx);
        mask /= 2;
    }
    s
}

/// Merges `s` across the block; every thread returns the block's result.
///
/// # Safety
/// Every thread of the block must call it (it synchronises twice), the block size must be a
/// multiple of 32, and `shared` must hold `block / 32` states of dynamic shared memory that no
/// other code touches between the two barriers.
#[inline(always)]
pub unsafe fn block_all_reduce<S: Reduce>(s: S, ctx: S::Ctx, shared: *mut S) -> S {
    let s = warp_all_reduce(s, ctx);
    let warps = gpu::block_dim_x() / gpu::WARP_SIZE;
    if gpu::lane_id() == 0 {
        gpu::sh_st(shared, gpu::warp_id() as usize, s);
    }
    gpu::sync_threads();
    let mut r = gpu::sh_ld(shared, 0);
    let mut w = 1;
    while w < warps {
        r.merge(&gpu::sh_ld(shared, w as usize), ctx);
        w += 1;
    }
    gpu::sync_threads(); // `shared` may be reused after this
    r
}

/// The largest key and its index, ties to the lower index: the Gumbel-max / exponential-race
/// winner of a sampling pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyMax {
    pub key: f32,
    pub idx: u32,
    /// Sticky `ROW_*`-style flags seen during the pass.
    pub flags: u32,
    /// How many finite (not −inf) candidates were seen (saturating).
    pub live: u32,
}

impl KeyMax {
    #[inline(always)]
    pub fn offer(&mut self, key: f32, idx: u32) {
        if key > self.key {
            self.key = key;
            self.idx = idx;
        }
    }
}

impl Reduce for KeyMax {
    type Ctx = ();
    const EMPTY: KeyMax = KeyMax {
        key: f32::NEG_INFINITY,
        idx: u32::MAX,
        flags: 0,
        live: 0,
    };
    #[inline(always)]
    fn merge(&mut self, o: &Self, _: ()) {
        if o.key > self.key || (o.key == self.key && o.idx < self.idx) {
            self.key = o.key;
            self.idx = o.idx;
        }
        self.flags |= o.flags;
        self.live = self.live.saturating_add(o.live);
    }
    #[inline(always)]
    fn shfl_xor(&self, mask: u32) -> Self {
        KeyMax {
            key: gpu::shfl_xor_f32(self.key, mask),
            idx: gpu::shfl_xor_u32(self.idx, mask),
            flags: gpu::shfl_xor_u32(self.flags, mask),
            live: gpu::shfl_xor_u32(self.live, mask),
        }
    }
}

//! Fused dequantise + GEMV / small-M GEMM for the three weight regimes: y[m, o] = Σ_k x[m, k]·W[o, k]
//! with W stored as FP16, INT8 (per-row scale) or NF4 (64-element blocks, absmax), dequantised in
//! registers as it is read, accumulated in f32. M ≤ 16 covers the γ + 1 positions one verification
//! pass scores.
//!
//! One warp per output row: lanes stride over k (coalesced reads of W), each lane keeps `MT`
//! accumulators (one per row of x — a compile-time tile, so they stay in registers), then a warp
//! butterfly per accumulator. W is read once whatever M is; x is re-read by every warp from cache.

use crate::gpu;
use crate::params::{GemvParams, NF4_BLOCK, NF4_CODE};

/// A weight storage format: element (row, k) as f32.
pub trait WeightFormat {
    /// # Safety
    /// `(row, k)` inside the matrix `p` describes.
    unsafe fn load(p: &GemvParams, row: u32, k: u32) -> f32;
}

pub struct Fp16;
pub struct Int8;
pub struct Nf4;

impl WeightFormat for Fp16 {
    #[inline(always)]
    unsafe fn load(p: &GemvParams, row: u32, k: u32) -> f32 {
        let i = row as usize * p.in_features as usize + k as usize;
        gpu::f16_to_f32(gpu::ld_nc(p.weight as *const u16, i))
    }
}

impl WeightFormat for Int8 {
    #[inline(always)]
    unsafe fn load(p: &GemvParams, row: u32, k: u32) -> f32 {
        let i = row as usize * p.in_features as usize + k as usize;
        gpu::ld_nc(p.weight as *const i8, i) as f32 * gpu::ld_nc(p.scales, row as usize)
    }
}

impl WeightFormat for Nf4 {
    #[inline(always)]
    unsafe fn load(p: &GemvParams, row: u32, k: u32) -> f32 {
        let e = row as usize * p.in_features as usize + k as usize;
        let byte: u8 = gpu::ld_nc(p.weight, e / 2);
        let nib = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        NF4_CODE[(nib & 0x0f) as usize] * gpu::ld_nc(p.scales, e / NF4_BLOCK)
    }
}

/// The kernel body for a tile of `MT` rows of x.
///
/// # Safety
/// The buffers of `p` must match its sizes (see [`GemvParams`]), `1 ≤ p.m ≤ MT`, and the launch
/// must be the documented one.
#[inline(always)]
pub unsafe fn gemv<W: WeightFormat, const MT: usize>(p: &GemvParams) {
    let warps = gpu::block_dim_x() / gpu::WARP_SIZE;
    let row = gpu::block_idx_x() * warps + gpu::warp_id();
    if row >= p.out_features {
        return; // the whole warp leaves together
    }
    let lane = gpu::lane_id();
    let m = if (p.m as usize) < MT {
        p.m as usize
    } else {
        MT
    };
    let kdim = p.in_features as usize;
    let mut acc = [0f32; MT];
    let mut k = lane;
    while k < p.in_features {
        let w = W::load(p, row, k);
        for (r, a) in acc.iter_mut().enumerate() {
            if r < m {
                *a += w * gpu::ld_nc(p.x, r * kdim + k as usize);
            }
        }
        k += gpu::WARP_SIZE;
    }
    for (r, a) in acc.iter_mut().enumerate() {
        let mut mask = gpu::WARP_SIZE / 2;
        while mask > 0 {
            *a += gpu::shfl_xor_f32(*a, mask);
            mask /= 2;
        }
        if lane == 0 && r < m {
            gpu::st(p.y, r * p.out_features as usize + row as usize, *a);
        }
    }
}

/// Dispatch tiles: the smallest of 1, 2, 4, 8, 16 covering `m`.
pub const TILES: [u32; 5] = [1, 2, 4, 8, 16];

/// The tile a launch with `m` rows of x uses (None above 16).
pub fn tile_for(m: u32) -> Option<u32> {
    TILES.iter().copied().find(|&t| t >= m)
}

macro_rules! entries {
    ($($name:ident: $fmt:ty, $mt:literal;)*) => {$(
        /// # Safety
        /// See [`gemv`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: GemvParams) {
            gemv::<$fmt, $mt>(&p)
        }
    )*};
}

entries! {
    gemv_fp16_m1: Fp16, 1; gemv_fp16_m2: Fp16, 2; gemv_fp16_m4: Fp16, 4; gemv_fp16_m8: Fp16, 8; gemv_fp16_m16: Fp16, 16;
    gemv_int8_m1: Int8, 1; gemv_int8_m2: Int8, 2; gemv_int8_m4: Int8, 4; gemv_int8_m8: Int8, 8; gemv_int8_m16: Int8, 16;
    gemv_nf4_m1: Nf4, 1; gemv_nf4_m2: Nf4, 2; gemv_nf4_m4: Nf4, 4; gemv_nf4_m8: Nf4, 8; gemv_nf4_m16: Nf4, 16;
}

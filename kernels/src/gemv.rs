//! Fused dequantise + GEMV / small-M GEMM for the three weight regimes: y[m, o] = Σ_k x[m, k]·W[o, k]
//! with W stored as FP16, INT8 (per-row scale) or NF4 (64-element blocks, absmax), dequantised in
//! registers as it is read, accumulated in f32. M ≤ 16 covers the γ + 1 positions one verification
//! pass scores.
//!
//! One warp per output row: lanes stride over k (coalesced reads of W), each lane keeps `MT`
//! accumulators (one per row of x — a compile-time tile, so they stay in registers), then a warp
//! butterfly per accumulator. W is read once whatever M is; x is re-read by every warp from cache.

use crate::gpu::{self, F4};
use crate::params::{GemvParams, GemvV2Params, GEMV_ACCUMULATE, NF4_BLOCK, NF4_CODE};
use crate::reduce::block_all_reduce;
use crate::rms_norm::Sum;
use crate::silu_mul::silu_times;

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

/// Writes output `i`: y[i] = v, or y[i] + v under [`GEMV_ACCUMULATE`] (in that order: the residual
/// stream plus the projection, as a separate add would compute it).
///
/// # Safety
/// `i` is inside y, and this thread is the only one touching y[i] in the launch.
#[inline(always)]
unsafe fn store_y(p: &GemvParams, i: usize, v: f32) {
    let v = if p.flags & GEMV_ACCUMULATE != 0 {
        gpu::ld(p.y as *const f32, i) + v
    } else {
        v
    };
    gpu::st(p.y, i, v);
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

// =============================================================================================
// v2: 16-byte weight loads with several in flight, x staged once per block in shared memory,
// several rows per warp, K split across blocks for narrow outputs (partial sums merged in split
// order by the last block of a row tile), the NF4 code book in lane registers read by shuffles
// with one absmax per 32- or 64-element block, M a compile-time tile with its accumulators in
// registers; and a tensor-core path (`mma.sync` m16n8k16, weights dequantised to f16 in
// registers) for the verification batch M = 2..16.

/// CUDA-core v2: warps per block and output rows per warp.
pub const V2_WARPS: u32 = 8;
pub const V2_ROWS_PER_WARP: u32 = 2;
/// Tensor-core v2: warps per block (16 output rows each).
pub const TC_WARPS: u32 = 4;
/// Shared memory budget of x's staging (no opt-in attribute needed below 48 KiB).
pub const X_STAGE_BYTES: usize = 32 * 1024;
/// Zero elements after each staged row of x on the tensor-core path: one span of the widest
/// format (4 lanes × 32 NF4 elements), so a lane past the end of its split reads zeros without a
/// branch. A branch there let LLVM duplicate the `mma.sync.aligned` after it into both arms (the
/// inline asm is not marked convergent), and lanes of one warp that took different arms hung the
/// warp on the GPU (seen on an H200 with NF4, M = 16, K = 4096); the PTX test counts the `mma`s.
pub const TC_PAD: usize = 128;
/// Loads in flight per lane (CUDA-core path: vectors per row per iteration).
pub const V2_UNROLL: usize = 2;

/// A weight format as the v2 kernels read it: 16-byte vectors of `VEC` elements.
pub trait FormatV2: WeightFormat {
    /// Elements per 16-byte vector.
    const VEC: u32;
    /// Tensor-core path: elements of one lane's 16-byte chunk (= `VEC`) and m16n8k16 tiles in it.
    const TILES: usize;
    /// The byte offset of flat element `e` (a multiple of `VEC`).
    fn byte_of(e: usize) -> usize;
    /// What a zero vector of weights looks like (masked lanes).
    const ZERO: [u32; 4];
    /// Element (row, k) without the per-row scale (INT8 applies it once per row, at the end).
    ///
    /// # Safety
    /// As [`WeightFormat::load`].
    #[inline(always)]
    unsafe fn load_unscaled(p: &GemvParams, row: u32, k: u32) -> f32 {
        Self::load(p, row, k)
    }
}

impl FormatV2 for Fp16 {
    const VEC: u32 = 8;
    const TILES: usize = 2;
    #[inline(always)]
    fn byte_of(e: usize) -> usize {
        e * 2
    }
    const ZERO: [u32; 4] = [0; 4];
}

impl FormatV2 for Int8 {
    const VEC: u32 = 16;
    const TILES: usize = 4;
    #[inline(always)]
    unsafe fn load_unscaled(p: &GemvParams, row: u32, k: u32) -> f32 {
        let i = row as usize * p.in_features as usize + k as usize;
        gpu::ld_nc(p.weight as *const i8, i) as f32
    }
    #[inline(always)]
    fn byte_of(e: usize) -> usize {
        e
    }
    const ZERO: [u32; 4] = [0; 4];
}

impl FormatV2 for Nf4 {
    const VEC: u32 = 32;
    const TILES: usize = 8;
    #[inline(always)]
    fn byte_of(e: usize) -> usize {
        e / 2
    }
    /// Nibble 7 is the code 0.0.
    const ZERO: [u32; 4] = [0x7777_7777; 4];
}

/// Which kernel a v2 launch uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathV2 {
    /// CUDA cores, M tile `mt` (1, 2, 4, 8, 16).
    Cores { mt: u32 },
    /// Tensor cores, `nt` n-tiles of 8 (1 or 2).
    Tensor { nt: u32 },
    /// v3's streaming kernel (M = 1).
    Stream,
    /// v4's integer kernel (M = 1, INT8 and NF4).
    Integer,
}

/// A v2 GEMV launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvPlanV2 {
    pub path: PathV2,
    pub rows_per_block: u32,
    pub row_tiles: u32,
    pub ksplits: u32,
    pub kt: u32,
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: usize,
    /// Workspace bytes (0 when `ksplits == 1`).
    pub workspace_bytes: usize,
    /// Byte offset of the partial sums in the workspace.
    pub partials_offset: usize,
}

/// Plans a v2 GEMV of `m` rows of x against an `out × inp` matrix of `format` (0 fp16, 1 int8, 2
/// nf4) on a GPU with `sm_count` SMs: tensor cores for m ≥ 2 when `inp` is a multiple of 64,
/// CUDA cores otherwise; K split so the grid has at least two blocks per SM where the matrix
/// allows (each split at least 256 elements of K), and x's staging fits `X_STAGE_BYTES`.
/// Host-side planning: not compiled into the PTX.
#[cfg(not(target_arch = "nvptx64"))]
pub fn plan_v2(format: u32, out: u32, inp: u32, m: u32, sm_count: u32) -> GemvPlanV2 {
    let m = m.clamp(1, 16);
    let tensor = m >= 2 && inp.is_multiple_of(64);
    let (path, rows_per_block, block, x_bytes_per_k) = if tensor {
        let nt = if m <= 8 { 1 } else { 2 };
        (
            PathV2::Tensor { nt },
            TC_WARPS * 16,
            TC_WARPS * 32,
            nt as usize * 8 * 2,
        )
    } else {
        let mt = tile_for(m).unwrap_or(16);
        (
            PathV2::Cores { mt },
            V2_WARPS * V2_ROWS_PER_WARP,
            V2_WARPS * 32,
            mt as usize * 4,
        )
    };
    let row_tiles = out.div_ceil(rows_per_block).max(1);
    let kt_max = ((X_STAGE_BYTES / x_bytes_per_k) as u32 / 64 * 64).max(64);
    let want = (2 * sm_count.max(1)).div_ceil(row_tiles);
    let most = inp.div_ceil(256).max(1);
    let splits = inp.div_ceil(kt_max).max(want.min(most)).max(1);
    let kt = inp.div_ceil(splits).div_ceil(64) * 64;
    let ksplits = inp.div_ceil(kt).max(1);
    let counters = (row_tiles as usize * 4).div_ceil(16) * 16;
    let _ = format;
    GemvPlanV2 {
        path,
        rows_per_block,
        row_tiles,
        ksplits,
        kt,
        grid: row_tiles * ksplits,
        block,
        shared_bytes: (kt as usize + if tensor { TC_PAD } else { 0 }) * x_bytes_per_k + 16,
        workspace_bytes: if ksplits == 1 {
            0
        } else {
            counters + ksplits as usize * m as usize * out as usize * 4
        },
        partials_offset: counters,
    }
}

/// The split-K epilogue: this block's partial sums are written (each writer fenced); the last
/// block of the row tile to arrive sums every split's partials, in split order, into y.
///
/// # Safety
/// Every thread of the block calls it after its own partial writes; `flag` is a free shared word.
#[inline(always)]
unsafe fn merge_splits(
    p2: &GemvV2Params,
    tile: u32,
    rows_per_block: u32,
    m: usize,
    flag: *mut u32,
) {
    let p = &p2.base;
    let out = p.out_features as usize;
    let counter = (p2.workspace as *mut u32).wrapping_add(tile as usize);
    let partials = p2
        .workspace
        .wrapping_add((p.out_features.div_ceil(rows_per_block) as usize * 4).div_ceil(16) * 16)
        as *mut f32;
    gpu::sync_threads();
    if gpu::thread_idx_x() == 0 {
        gpu::threadfence();
        let arrived = gpu::atomic_add_u32(counter, 1);
        gpu::sh_st(flag, 0, (arrived + 1 == p2.ksplits) as u32);
    }
    gpu::sync_threads();
    let last = gpu::sh_ld(flag, 0) != 0;
    gpu::sync_threads();
    if !last {
        return;
    }
    gpu::threadfence();
    let row0 = (tile * rows_per_block) as usize;
    let n = rows_per_block as usize * m;
    let mut i = gpu::thread_idx_x() as usize;
    while i < n {
        let (mm, rr) = (i / rows_per_block as usize, i % rows_per_block as usize);
        let row = row0 + rr;
        if row < out {
            let mut s = 0f32;
            let mut k = 0;
            while k < p2.ksplits as usize {
                s += gpu::ld(partials, (k * m + mm) * out + row);
                k += 1;
            }
            store_y(p, mm * out + row, s);
        }
        i += gpu::block_dim_x() as usize;
    }
    if gpu::thread_idx_x() == 0 {
        gpu::st(counter, 0, 0);
    }
}

/// This block's row tile and K split, and the split's range `[k0, k1)` of K (blocks are tile-major:
/// block = tile · ksplits + split); None for a split that starts past K, which the plans never make.
#[inline(always)]
fn block_split(p2: &GemvV2Params) -> Option<(u32, u32, usize, usize)> {
    let ksplits = core::num::NonZeroU32::new(p2.ksplits).unwrap_or(core::num::NonZeroU32::MIN);
    let blk = gpu::block_idx_x();
    let (tile, split) = (blk / ksplits, blk % ksplits);
    let kdim = p2.base.in_features as usize;
    let k0 = (split * p2.kt) as usize;
    if k0 >= kdim {
        return None;
    }
    Some((tile, split, k0, kdim.min(k0 + p2.kt as usize)))
}

/// Writes the finished dot product of (row, m) for this split: into y when K is not split, into
/// the split's partial sums otherwise (fenced, for the merging block).
#[inline(always)]
unsafe fn put(
    p2: &GemvV2Params,
    split: u32,
    rows_per_block: u32,
    m: usize,
    mm: usize,
    row: usize,
    v: f32,
) {
    let p = &p2.base;
    let out = p.out_features as usize;
    if p2.ksplits <= 1 {
        store_y(p, mm * out + row, v);
    } else {
        let partials = p2
            .workspace
            .wrapping_add((p.out_features.div_ceil(rows_per_block) as usize * 4).div_ceil(16) * 16)
            as *mut f32;
        gpu::st(partials, (split as usize * m + mm) * out + row, v);
        gpu::threadfence();
    }
}

/// The CUDA-core v2 kernel body for an M tile of `MT` rows of x.
///
/// # Safety
/// v1's buffers (see [`GemvParams`]), the weight buffer 16-byte aligned, `1 ≤ m ≤ MT`; the
/// workspace as [`plan_v2`] sizes it (counters zero); the plan's launch shape.
#[inline(always)]
pub unsafe fn gemv_v2<W: FormatV2, const MT: usize>(p2: &GemvV2Params) {
    let p = &p2.base;
    let rows_per_block = V2_WARPS * V2_ROWS_PER_WARP;
    let kdim = p.in_features as usize;
    let Some((tile, split, k0, k1)) = block_split(p2) else {
        return;
    };
    let kt_nz =
        core::num::NonZeroUsize::new(p2.kt as usize).unwrap_or(core::num::NonZeroUsize::MIN);
    let kt = kt_nz.get();
    let m = if (p.m as usize) < MT {
        p.m as usize
    } else {
        MT
    };
    let tid = gpu::thread_idx_x() as usize;
    let block = gpu::block_dim_x() as usize;
    // Stage x[0..m][k0..k1) once: every warp reads it for every row.
    let xs = gpu::dynamic_shared::<f32>();
    let mut i = tid;
    while i < m * kt {
        let (r, kk) = (i / kt_nz, i % kt_nz);
        let v = if k0 + kk < k1 {
            gpu::ld_nc(p.x, r * kdim + k0 + kk)
        } else {
            0.0
        };
        gpu::sh_st(xs, r * kt + kk, v);
        i += block;
    }
    let flag = (xs as *mut u8).wrapping_add(kt * MT * 4) as *mut u32;
    gpu::sync_threads();

    let lane = gpu::lane_id() as usize;
    let warp = gpu::warp_id();
    let code = NF4_CODE[lane & 15];
    let out = p.out_features as usize;
    let vec = W::VEC as usize;
    crate::unroll!(rw in 0..2 => {
        let row = (tile * rows_per_block + warp * V2_ROWS_PER_WARP) as usize + rw;
        // A warp-uniform condition: the whole warp takes the row or skips it.
        if row < out {
            let mut acc = [0f32; MT];
            let e0 = row * kdim;
            // Body: 16-byte vectors from the first aligned element at or after k0.
            let mis = (e0 + k0) % vec;
            let kb = {
                let kb = k0 + (vec - mis) % vec;
                if kb < k1 { kb } else { k1 }
            };
            let nvec = (k1 - kb) / vec;
            let ke = kb + nvec * vec;
            // Head and tail, element by element.
            let mut k = k0 + lane;
            while k < kb {
                let w = W::load_unscaled(p, row as u32, k as u32);
                crate::unroll!(r in 0..16 => {
                    if r < MT && r < m {
                        acc[r] += w * gpu::sh_ld(xs, r * kt + (k - k0));
                    }
                });
                k += 32;
            }
            let mut k = ke + lane;
            while k < k1 {
                let w = W::load_unscaled(p, row as u32, k as u32);
                crate::unroll!(r in 0..16 => {
                    if r < MT && r < m {
                        acc[r] += w * gpu::sh_ld(xs, r * kt + (k - k0));
                    }
                });
                k += 32;
            }
            // Body: every lane runs the same number of iterations (NF4's shuffles need the whole
            // warp), V2_UNROLL vectors in flight each.
            let mut v0 = 0usize;
            while v0 < nvec {
                let mut raw = [W::ZERO; V2_UNROLL];
                let mut valid = [false; V2_UNROLL];
                crate::unroll!(u in 0..4 => {
                    if u < V2_UNROLL {
                        let v = v0 + u * 32 + lane;
                        if v < nvec {
                            valid[u] = true;
                            raw[u] = gpu::ld_v4(p.weight, W::byte_of(e0 + kb + v * vec));
                        }
                    }
                });
                crate::unroll!(u in 0..4 => {
                    if u < V2_UNROLL {
                        let v = v0 + u * 32 + lane;
                        let kk = kb + v * vec - k0; // offset in the staged x
                        dot_vec::<W, MT>(p, &mut acc, raw[u], valid[u], row, e0 + kb + v * vec, xs, kt, kk, m, code);
                    }
                });
                v0 += V2_UNROLL * 32;
            }
            // Butterfly, scale, and out.
            let scale = if W::VEC == 16 { gpu::ld_nc(p.scales, row) } else { 1.0 };
            crate::unroll!(r in 0..16 => {
                if r < MT {
                    let mut a = acc[r];
                    let mut mask = 16;
                    while mask > 0 {
                        a += gpu::shfl_xor_f32(a, mask);
                        mask /= 2;
                    }
                    if lane == 0 && r < m {
                        put(p2, split, rows_per_block, m, r, row, a * scale);
                    }
                }
            });
        }
    });
    if p2.ksplits > 1 {
        merge_splits(p2, tile, rows_per_block, m, flag);
    }
}

/// One 16-byte vector of weights (flat element `e` first) into the accumulators. Every lane calls
/// it, valid or not (NF4 decodes by warp shuffles).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_vec<W: FormatV2, const MT: usize>(
    p: &GemvParams,
    acc: &mut [f32; MT],
    raw: [u32; 4],
    valid: bool,
    _row: usize,
    e: usize,
    xs: *mut f32,
    kt: usize,
    kk: usize,
    m: usize,
    code: f32,
) {
    let aligned4 = kk.is_multiple_of(4);
    if W::VEC == 8 {
        // fp16: eight halves.
        let mut w = [0f32; 8];
        crate::unroll!(j in 0..4 => {
            w[2 * j] = gpu::f16_to_f32((raw[j] & 0xffff) as u16);
            w[2 * j + 1] = gpu::f16_to_f32((raw[j] >> 16) as u16);
        });
        if valid {
            crate::unroll!(r in 0..16 => {
                if r < MT && r < m {
                    acc[r] += dot8(&w, xs, r * kt + kk, aligned4);
                }
            });
        }
    } else if W::VEC == 16 {
        // int8: sixteen signed bytes (the row scale is applied once, at the end).
        if valid {
            crate::unroll!(h in 0..2 => {
                let mut w = [0f32; 8];
                crate::unroll!(j in 0..2 => {
                    let word = raw[2 * h + j];
                    crate::unroll!(q in 0..4 => {
                        w[4 * j + q] = ((word >> (8 * q)) as u8 as i8) as f32;
                    });
                });
                crate::unroll!(r in 0..16 => {
                    if r < MT && r < m {
                        acc[r] += dot8(&w, xs, r * kt + kk + 8 * h, aligned4);
                    }
                });
            });
        }
    } else {
        // nf4: 32 nibbles (element 2j in the high nibble of byte j), one absmax for all of them
        // (a 32-aligned run of 32 elements lies in one 64-element block); the code book is read
        // from the lanes' registers by shuffles, so every lane takes part.
        let absmax = if valid {
            gpu::ld_nc(p.scales, e / NF4_BLOCK)
        } else {
            0.0
        };
        crate::unroll!(h in 0..4 => {
            let mut w = [0f32; 8];
            let word0 = raw[h];
            crate::unroll!(j in 0..4 => {
                let byte = (word0 >> (8 * j)) & 0xff;
                w[2 * j] = gpu::shfl_idx_f32(code, byte >> 4);
                w[2 * j + 1] = gpu::shfl_idx_f32(code, byte & 0x0f);
            });
            if valid {
                crate::unroll!(r in 0..16 => {
                    if r < MT && r < m {
                        acc[r] += absmax * dot8(&w, xs, r * kt + kk + 8 * h, aligned4);
                    }
                });
            }
        });
    }
}

/// Σ w[j] · x[at + j] for eight staged x (two 16-byte shared loads when `at` is 4-aligned).
#[inline(always)]
unsafe fn dot8(w: &[f32; 8], xs: *mut f32, at: usize, aligned4: bool) -> f32 {
    let mut x = [0f32; 8];
    if aligned4 {
        let a = gpu::sh_ld(xs as *const F4, at / 4);
        let b = gpu::sh_ld(xs as *const F4, at / 4 + 1);
        x = [
            a.0[0], a.0[1], a.0[2], a.0[3], b.0[0], b.0[1], b.0[2], b.0[3],
        ];
    } else {
        crate::unroll!(j in 0..8 => {
            x[j] = gpu::sh_ld(xs, at + j);
        });
    }
    let mut s = 0f32;
    crate::unroll!(j in 0..8 => {
        s += w[j] * x[j];
    });
    s
}

/// f16 pair (low, high) packed in a u32.
#[inline(always)]
fn pack2(lo: f32, hi: f32) -> u32 {
    (gpu::f32_to_f16(lo) as u32) | ((gpu::f32_to_f16(hi) as u32) << 16)
}

/// The tensor-core v2 kernel body for `NT` n-tiles of 8 rows of x (M ≤ 8·NT): each warp owns 16
/// output rows; lane (g, t) loads 16 bytes of rows g and g + 8 at k = 8t·(VEC/8) of each span, which
/// — with x read from shared memory in the same order — are its A and B fragments for
/// `W::TILES` m16n8k16 products (the k order inside a span is permuted alike in A and B, so the
/// dot product is unchanged); weights and x enter the products as f16, the sums are f32.
///
/// # Safety
/// As [`gemv_v2`], with `in_features` a multiple of 64 and `1 ≤ m ≤ 8·NT`.
#[inline(always)]
pub unsafe fn gemv_tc<W: FormatV2, const NT: usize>(p2: &GemvV2Params) {
    let p = &p2.base;
    let rows_per_block = TC_WARPS * 16;
    let kdim = p.in_features as usize;
    let Some((tile, split, k0, k1)) = block_split(p2) else {
        return;
    };
    let kt_nz =
        core::num::NonZeroUsize::new(p2.kt as usize).unwrap_or(core::num::NonZeroUsize::MIN);
    let m = if (p.m as usize) < NT * 8 {
        p.m as usize
    } else {
        NT * 8
    };
    let tid = gpu::thread_idx_x() as usize;
    let block = gpu::block_dim_x() as usize;
    // Stage x as f16, rows `kts` = kt + TC_PAD apart: rows ≥ m, k ≥ k1 and the pad are zero.
    let kts_nz = kt_nz.saturating_add(TC_PAD);
    let kts = kts_nz.get();
    let xs = gpu::dynamic_shared::<u16>();
    let mut i = tid;
    while i < NT * 8 * kts {
        let (r, kk) = (i / kts_nz, i % kts_nz);
        let v = if r < m && k0 + kk < k1 {
            gpu::ld_nc(p.x, r * kdim + k0 + kk)
        } else {
            0.0
        };
        gpu::sh_st(xs, r * kts + kk, gpu::f32_to_f16(v));
        i += block;
    }
    let flag = (xs as *mut u8).wrapping_add(kts * NT * 8 * 2) as *mut u32;
    gpu::sync_threads();

    let lane = gpu::lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let warp = gpu::warp_id() as usize;
    let out = p.out_features as usize;
    let row_lo = (tile * rows_per_block) as usize + warp * 16 + g;
    let row_hi = row_lo + 8;
    let vec = W::VEC as usize;
    let span = 4 * vec;
    let code = NF4_CODE[lane & 15];
    let mut c = [[0f32; 4]; NT];
    let mut k = k0;
    while k < k1 {
        let kk = k + t * vec; // this lane's 16-byte chunk of rows g and g + 8
        let live = kk < k1;
        let lo = if live && row_lo < out {
            gpu::ld_v4(p.weight, W::byte_of(row_lo * kdim + kk))
        } else {
            W::ZERO
        };
        let hi = if live && row_hi < out {
            gpu::ld_v4(p.weight, W::byte_of(row_hi * kdim + kk))
        } else {
            W::ZERO
        };
        let (s_lo, s_hi) = if W::VEC == 32 {
            (
                if live && row_lo < out {
                    gpu::ld_nc(p.scales, (row_lo * kdim + kk) / NF4_BLOCK)
                } else {
                    0.0
                },
                if live && row_hi < out {
                    gpu::ld_nc(p.scales, (row_hi * kdim + kk) / NF4_BLOCK)
                } else {
                    0.0
                },
            )
        } else {
            (1.0, 1.0)
        };
        let xrel = kk - k0; // the staged x of this lane's chunk
        crate::unroll!(j in 0..8 => {
            if j < W::TILES {
                // Tile j: this lane's columns (2t, 2t+1 | 2t+8, 2t+9) hold its chunk's elements
                // 4j..4j+4 (pairs 4j,4j+1 and 4j+2,4j+3).
                let (a0, a1, a2, a3) = frag::<W>(lo, hi, j, code, s_lo, s_hi);
                crate::unroll!(nt in 0..2 => {
                    if nt < NT {
                        // A lane past k1 (the last span of a split) has zero weights and reads
                        // the zero pad after its staged row: no branch, so every lane of the
                        // warp reaches the same mma instruction.
                        let at = (g + 8 * nt) * kts + xrel + 4 * j;
                        let pair = |i: usize| gpu::sh_ld(xs as *const u32, i / 2);
                        let (b0, b1) = (pair(at), pair(at + 2));
                        c[nt] = gpu::mma_m16n8k16([a0, a1, a2, a3], [b0, b1], c[nt]);
                    }
                });
            }
        });
        k += span;
    }
    // c[nt]: rows g (elements 0, 1) and g + 8 (2, 3), x rows 8nt + 2t (+1).
    crate::unroll!(nt in 0..2 => {
        if nt < NT {
            crate::unroll!(e in 0..4 => {
                let row = if e < 2 { row_lo } else { row_hi };
                let mm = 8 * nt + 2 * t + (e % 2);
                if row < out && mm < m {
                    let scale = if W::VEC == 16 { gpu::ld_nc(p.scales, row) } else { 1.0 };
                    put(p2, split, rows_per_block, m, mm, row, c[nt][e] * scale);
                }
            });
        }
    });
    if p2.ksplits > 1 {
        merge_splits(p2, tile, rows_per_block, m, flag);
    }
}

/// The A fragment of tile `j` from a lane's two 16-byte chunks (rows g and g + 8).
#[inline(always)]
fn frag<W: FormatV2>(
    lo: [u32; 4],
    hi: [u32; 4],
    j: usize,
    code: f32,
    s_lo: f32,
    s_hi: f32,
) -> (u32, u32, u32, u32) {
    if W::VEC == 8 {
        // fp16: words 2j (elements 4j, 4j+1) and 2j+1 (4j+2, 4j+3), already f16 pairs.
        (lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1])
    } else if W::VEC == 16 {
        // int8: word j holds elements 4j..4j+4, exact in f16.
        let cv = |w: u32, q: u32| ((w >> (8 * q)) as u8 as i8) as f32;
        (
            pack2(cv(lo[j], 0), cv(lo[j], 1)),
            pack2(cv(hi[j], 0), cv(hi[j], 1)),
            pack2(cv(lo[j], 2), cv(lo[j], 3)),
            pack2(cv(hi[j], 2), cv(hi[j], 3)),
        )
    } else {
        // nf4: elements 4j..4j+4 are bytes 2j (4j high, 4j+1 low) and 2j+1 of the chunk; every
        // lane decodes (shuffles), scaled by its row's absmax.
        let nib = |w: [u32; 4], q: usize| -> u32 {
            let byte = (w[q / 8] >> (8 * ((q / 2) % 4))) & 0xff;
            if q.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            }
        };
        let d = |w: [u32; 4], q: usize, s: f32| gpu::shfl_idx_f32(code, nib(w, q)) * s;
        let q = 4 * j;
        (
            pack2(d(lo, q, s_lo), d(lo, q + 1, s_lo)),
            pack2(d(hi, q, s_hi), d(hi, q + 1, s_hi)),
            pack2(d(lo, q + 2, s_lo), d(lo, q + 3, s_lo)),
            pack2(d(hi, q + 2, s_hi), d(hi, q + 3, s_hi)),
        )
    }
}

// =============================================================================================
// v3: the decode-time GEMV (M = 1) as a stream. v2's M = 1 kernel keeps two 16-byte loads in flight
// per lane and stages x through shared memory behind a barrier; one H200 run measured it at 27 %
// of the copy bandwidth on a 4096 × 4096 FP16 matrix. v3 gives each warp V3_ROWS_PER_WARP rows at
// once and issues every row's weight vectors of an iteration before it multiplies any (128 bytes
// per lane in flight for FP16 and INT8, 64 for NF4), reads x straight from global memory into
// registers (it is small and cached) so no barrier precedes the stream, and converts INT8 by a
// float trick instead of the quarter-rate integer-to-float conversion. The K split, the workspace
// and the last-block merge are v2's.

/// v3: warps per block and output rows per warp.
pub const V3_WARPS: u32 = 8;
pub const V3_ROWS_PER_WARP: u32 = 4;
/// v3: the smallest split of K (elements); every lane then has at least two FP16 vectors a row.
pub const V3_MIN_SPLIT: u32 = 512;
/// The head of v3's and v4's dynamic shared memory: the merge's flag (16 bytes), then the norm's
/// block reduction (one f32 per warp) for the `_norm` entries.
pub const M1_HEAD_BYTES: usize = 16 + V3_WARPS as usize * 4;

/// What v3 and v4 do to x as they read it (a const parameter of their bodies: one entry point
/// each). Plain: x as it is.
pub const X_PLAIN: u32 = 0;
/// `_norm`: x / √(mean(x²) + eps) · gains, as `rms_norm_f32` writes it (see [`norm_scale`]).
pub const X_NORM: u32 = 1;
/// `_silu`: x is the fused gate / up projection `[2·in]` and is read as silu(gate) · up, as
/// `silu_mul_f32` writes it (the same expression, so the same bits).
pub const X_SILU: u32 = 2;

/// The scale 1 / √(mean(x²) + eps) of the `_norm` entries' x, computed as `rms_norm_f32` computes it
/// at v3's block size (its launch's): each thread's strided sum of squares over 16-byte vectors,
/// then the block reduction in a fixed order — so the normalised x is the one that kernel would
/// have written, bit for bit, and every block of the launch gets the same scale.
///
/// # Safety
/// Every thread of the block calls it (two barriers); x holds `in_features` f32, 16-byte aligned,
/// `in_features` a multiple of 4; `head` is the block's dynamic shared memory ([`M1_HEAD_BYTES`]).
#[inline(always)]
unsafe fn norm_scale(p2: &GemvV2Params, head: *mut u32) -> f32 {
    let inp = p2.base.in_features;
    let vecs = (inp / 4) as usize;
    let x = p2.base.x as *const F4;
    let block = gpu::block_dim_x() as usize;
    let mut ss = 0f32;
    let mut v = gpu::thread_idx_x() as usize;
    while v < vecs {
        let a: F4 = gpu::ld(x, v);
        crate::unroll!(j in 0..4 => {
            ss += a.0[j] * a.0[j];
        });
        v += block;
    }
    let scratch = (head as *mut u8).wrapping_add(16) as *mut Sum;
    let total = block_all_reduce(Sum(ss), (), scratch).0;
    1.0 / gpu::sqrt_rn(total / inp as f32 + p2.eps)
}

/// Plans a v3 GEMV: the streaming kernel for `m == 1` when `inp` is a multiple of 64 (every
/// 16-byte vector then aligned, and no head or tail), v2's plan otherwise. K is split so the grid
/// has at least two blocks per SM where the matrix allows (each split at least
/// [`V3_MIN_SPLIT`] elements, a multiple of 64). Host-side planning: not compiled into the PTX.
#[cfg(not(target_arch = "nvptx64"))]
pub fn plan_v3(format: u32, out: u32, inp: u32, m: u32, sm_count: u32) -> GemvPlanV2 {
    if m != 1 || inp == 0 || !inp.is_multiple_of(64) {
        return plan_v2(format, out, inp, m, sm_count);
    }
    let rows_per_block = V3_WARPS * V3_ROWS_PER_WARP;
    let row_tiles = out.div_ceil(rows_per_block).max(1);
    let want = (2 * sm_count.max(1)).div_ceil(row_tiles);
    let most = (inp / V3_MIN_SPLIT).max(1);
    let splits = want.min(most).max(1);
    let kt = inp.div_ceil(splits).div_ceil(64) * 64;
    let ksplits = inp.div_ceil(kt).max(1);
    let counters = (row_tiles as usize * 4).div_ceil(16) * 16;
    GemvPlanV2 {
        path: PathV2::Stream,
        rows_per_block,
        row_tiles,
        ksplits,
        kt,
        grid: row_tiles * ksplits,
        block: V3_WARPS * 32,
        shared_bytes: M1_HEAD_BYTES,
        workspace_bytes: if ksplits == 1 {
            0
        } else {
            counters + ksplits as usize * out as usize * 4
        },
        partials_offset: counters,
    }
}

/// `(b ^ 0x80) | 0x4B00_0000` read as f32 is 2^23 + b + 128 exactly, so subtracting 2^23 + 128
/// gives the signed byte `b` as f32: two full-rate instructions instead of a quarter-rate I2F.
#[inline(always)]
fn i8_as_f32(word_xor80: u32, q: u32) -> f32 {
    f32::from_bits(((word_xor80 >> (8 * q)) & 0xff) | 0x4B00_0000) - 8_388_736.0
}

/// The v3 kernel body (M = 1); x read as `XR` says ([`X_PLAIN`], [`X_NORM`], [`X_SILU`]).
///
/// # Safety
/// v2's buffers with `m == 1`, `in_features` a multiple of 64, x 16-byte aligned (with
/// [`X_NORM`], the gains `[in]` too; with [`X_SILU`], x holds `2 · in`); the workspace as
/// [`plan_v3`] sizes it (counters zero); the plan's launch shape.
#[inline(always)]
pub unsafe fn gemv_v3<W: FormatV2, const XR: u32>(p2: &GemvV2Params) {
    let p = &p2.base;
    let rows_per_block = V3_WARPS * V3_ROWS_PER_WARP;
    let kdim = p.in_features as usize;
    let Some((tile, split, k0, k1)) = block_split(p2) else {
        return;
    };
    let flag = gpu::dynamic_shared::<u32>();
    let inv = if XR == X_NORM {
        norm_scale(p2, flag)
    } else {
        1.0
    };
    let vec = W::VEC as usize;
    // k0 and k1 are multiples of 64, so of every VEC.
    let nvec = (k1 - k0) / vec;
    // NF4 holds 32 x per vector in registers: one vector a row per iteration keeps it in registers.
    let unroll = if W::VEC == 32 { 1 } else { 2 };
    let lane = gpu::lane_id() as usize;
    let out = p.out_features as usize;
    let row0 = (tile * rows_per_block + gpu::warp_id() * V3_ROWS_PER_WARP) as usize;
    let code = NF4_CODE[lane & 15];
    let mut acc = [0f32; 4];
    let mut v0 = 0usize;
    while v0 < nvec {
        // Issue every load of the iteration first: x's vectors, then each row's weights.
        let mut xv = [[[0u32; 4]; 8]; 2];
        let mut raw = [[W::ZERO; 2]; 4];
        crate::unroll!(u in 0..2 => {
            let v = v0 + u * 32 + lane;
            if u < unroll && v < nvec {
                let k = k0 + v * vec;
                crate::unroll!(q in 0..8 => {
                    if q < vec / 4 {
                        xv[u][q] = gpu::ld_v4(p.x, k + 4 * q);
                    }
                });
                crate::unroll!(r in 0..4 => {
                    // Warp-uniform: a row past the matrix is skipped by the whole warp.
                    if row0 + r < out {
                        raw[r][u] = gpu::ld_v4(p.weight, W::byte_of((row0 + r) * kdim + k));
                    }
                });
            }
        });
        if XR != X_PLAIN {
            // x · inv · gain as `rms_norm_f32` writes it, or silu(gate) · up as `silu_mul_f32`
            // does; the gains' or up's loads follow the weights'.
            crate::unroll!(u in 0..2 => {
                let v = v0 + u * 32 + lane;
                if u < unroll && v < nvec {
                    let k = k0 + v * vec;
                    crate::unroll!(q in 0..8 => {
                        if q < vec / 4 {
                            let g = if XR == X_NORM {
                                gpu::ld_v4(p2.norm, k + 4 * q)
                            } else {
                                gpu::ld_v4(p.x, kdim + k + 4 * q)
                            };
                            crate::unroll!(i in 0..4 => {
                                let (a, b) = (f32::from_bits(xv[u][q][i]), f32::from_bits(g[i]));
                                let xn = if XR == X_NORM { a * inv * b } else { silu_times(a, b) };
                                xv[u][q][i] = xn.to_bits();
                            });
                        }
                    });
                }
            });
        }
        crate::unroll!(u in 0..2 => {
            if u < unroll {
                let v = v0 + u * 32 + lane;
                let valid = v < nvec;
                let k = k0 + v * vec;
                let x = |j: usize| f32::from_bits(xv[u][j / 4][j % 4]);
                crate::unroll!(r in 0..4 => {
                    if row0 + r < out {
                        let w = raw[r][u];
                        if W::VEC == 8 {
                            let mut s = 0f32;
                            crate::unroll!(j in 0..4 => {
                                s += gpu::f16_to_f32((w[j] & 0xffff) as u16) * x(2 * j);
                                s += gpu::f16_to_f32((w[j] >> 16) as u16) * x(2 * j + 1);
                            });
                            acc[r] += s;
                        } else if W::VEC == 16 {
                            let mut s = 0f32;
                            crate::unroll!(j in 0..4 => {
                                let word = w[j] ^ 0x8080_8080;
                                crate::unroll!(q in 0..4 => {
                                    s += i8_as_f32(word, q as u32) * x(4 * j + q);
                                });
                            });
                            acc[r] += s;
                        } else {
                            // NF4: element 2j in the high nibble of byte j; every lane shuffles,
                            // valid or not, since the code book lives in the lanes' registers.
                            let absmax = if valid {
                                gpu::ld_nc(p.scales, ((row0 + r) * kdim + k) / NF4_BLOCK)
                            } else {
                                0.0
                            };
                            let mut s = 0f32;
                            crate::unroll!(h in 0..4 => {
                                crate::unroll!(j in 0..4 => {
                                    let byte = (w[h] >> (8 * j)) & 0xff;
                                    let e = 8 * h + 2 * j;
                                    s += gpu::shfl_idx_f32(code, byte >> 4) * x(e);
                                    s += gpu::shfl_idx_f32(code, byte & 0x0f) * x(e + 1);
                                });
                            });
                            acc[r] += absmax * s;
                        }
                    }
                });
            }
        });
        v0 += unroll * 32;
    }
    // INT8's row scale, once per row; FP16 and NF4 are scaled already.
    let mut scale = [1f32; 4];
    crate::unroll!(r in 0..4 => {
        if W::VEC == 16 && row0 + r < out {
            scale[r] = gpu::ld_nc(p.scales, row0 + r);
        }
    });
    finish_rows(p2, tile, split, row0, acc, scale, flag);
}

/// The end of a v3 / v4 block: each of the warp's four rows summed over its lanes (a butterfly),
/// times `scale[r]`, written by lane 0 (to y, or to the split's partials); then the split merge.
///
/// # Safety
/// As [`gemv_v3`]; every thread of the block calls it; `flag` is a free shared word.
#[inline(always)]
unsafe fn finish_rows(
    p2: &GemvV2Params,
    tile: u32,
    split: u32,
    row0: usize,
    acc: [f32; 4],
    scale: [f32; 4],
    flag: *mut u32,
) {
    let rows_per_block = V3_WARPS * V3_ROWS_PER_WARP;
    crate::unroll!(r in 0..4 => {
        let row = row0 + r;
        // Warp-uniform: the whole warp takes the row or skips it.
        if row < p2.base.out_features as usize {
            let mut a = acc[r];
            let mut mask = 16;
            while mask > 0 {
                a += gpu::shfl_xor_f32(a, mask);
                mask /= 2;
            }
            if gpu::lane_id() == 0 {
                put(p2, split, rows_per_block, 1, 0, row, a * scale[r]);
            }
        }
    });
    if p2.ksplits > 1 {
        merge_splits(p2, tile, rows_per_block, 1, flag);
    }
}

/// The M = 1 entry points: each a body (`gemv_v3` or `gemv_v4`) for one format.
macro_rules! entries_m1 {
    ($($name:ident: $body:ident, $fmt:ty, $xr:ident;)*) => {$(
        /// # Safety
        /// See the body's (`gemv_v3` / `gemv_v4`).
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: GemvV2Params) {
            $body::<$fmt, $xr>(&p)
        }
    )*};
}

entries_m1! {
    gemv_v3_fp16: gemv_v3, Fp16, X_PLAIN;
    gemv_v3_int8: gemv_v3, Int8, X_PLAIN;
    gemv_v3_nf4: gemv_v3, Nf4, X_PLAIN;
    gemv_v3_fp16_norm: gemv_v3, Fp16, X_NORM;
    gemv_v3_int8_norm: gemv_v3, Int8, X_NORM;
    gemv_v3_nf4_norm: gemv_v3, Nf4, X_NORM;
    gemv_v3_fp16_silu: gemv_v3, Fp16, X_SILU;
    gemv_v3_int8_silu: gemv_v3, Int8, X_SILU;
    gemv_v3_nf4_silu: gemv_v3, Nf4, X_SILU;
}

// =============================================================================================
// v4: INT8 and NF4 at M = 1 by integer dot products, as the CPU's integer path computes them. Both
// v2 and v3 turn every weight into an f32 and multiply it by an f32 x: on an H200 INT8 and NF4 v2
// were slower than FP16 (their decoding, not memory, bound them). v4 quantises the block's slice of
// x to 8 bits per 32 elements once (scale absmax / 127, codes rounded half away from zero: the CPU
// rule, `weights::cpu::Acts`), keeps the codes in shared memory, and streams the weights as v3 does;
// four weights meet four x codes in one `dp4a`. NF4's nibbles become the int8 code book
// (NF4 × 127, rounded: the CPU's `nf4_i8`) by three `prmt`s per four nibbles, with the table in
// four registers. Each 16-element half's integer sum is scaled by (weight scale · x scale) exactly
// as the CPU scales it, so the two paths differ only in the order of the f32 sums.

/// v4: the largest split of K (elements), so the shared codes and scales stay under 32 KiB.
pub const V4_MAX_SPLIT: u32 = 24_576;

/// Plans a v4 GEMV: v3's plan (the streaming kernel's grid and splits, K split further if a split
/// exceeds [`V4_MAX_SPLIT`]) with shared memory for the split's x codes and scales, for INT8
/// (`format` 1) and NF4 (2) at `m == 1` with `inp` a multiple of 64; v3's plan otherwise (FP16 has
/// no integer path). Host-side planning: not compiled into the PTX.
#[cfg(not(target_arch = "nvptx64"))]
pub fn plan_v4(format: u32, out: u32, inp: u32, m: u32, sm_count: u32) -> GemvPlanV2 {
    let p = plan_v3(format, out, inp, m, sm_count);
    if format == 0 || p.path != PathV2::Stream {
        return p;
    }
    let mut p = p;
    if p.kt > V4_MAX_SPLIT {
        let splits = inp.div_ceil(V4_MAX_SPLIT);
        p.kt = inp.div_ceil(splits).div_ceil(64) * 64;
        p.ksplits = inp.div_ceil(p.kt);
        p.grid = p.row_tiles * p.ksplits;
        p.workspace_bytes = if p.ksplits == 1 {
            0
        } else {
            p.partials_offset + p.ksplits as usize * out as usize * 4
        };
    }
    p.path = PathV2::Integer;
    p.shared_bytes = v4_shared_bytes(p.kt);
    p
}

/// v4's dynamic shared memory for a split of `kt` elements: v3's head ([`M1_HEAD_BYTES`]: the
/// merge's flag, the norm's reduction), the x scales (one f32 per 32, padded to 16 bytes), then the
/// x codes (one byte each, 16-byte aligned for 16-byte reads).
pub const fn v4_shared_bytes(kt: u32) -> usize {
    v4_codes_offset(kt) + kt as usize
}

/// Byte offset of the x codes in v4's shared memory.
pub const fn v4_codes_offset(kt: u32) -> usize {
    M1_HEAD_BYTES + ((kt as usize / 32) * 4).div_ceil(16) * 16
}

/// x rounded half away from zero (as `f32::round`, which `core` lacks): the truncation plus one
/// where the exact remainder reaches a half.
#[inline(always)]
const fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32; // exact: |v| < 2^23 here
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// The int8 NF4 code book (NF4 × 127, rounded half away from zero) packed four codes a word.
#[inline(always)]
const fn nf4_i8_words() -> [u32; 4] {
    let mut t = [0u32; 4];
    let mut i = 0;
    while i < 16 {
        let c = round_half_away(NF4_CODE[i] * 127.0) as i8 as u8 as u32;
        t[i / 4] |= c << (8 * (i % 4));
        i += 1;
    }
    t
}

/// [`nf4_i8_words`], computed by the compiler.
const NF4_I8_WORDS: [u32; 4] = nf4_i8_words();

/// Four NF4 codes, the nibbles of `half`'s low 16 bits, as four int8 code-book values in nibble
/// order: for the packed layout (element 2j in byte j's high nibble) that is elements 1, 0, 3, 2.
#[inline(always)]
fn nf4_nibbles_i8(half: u32, t: &[u32; 4]) -> u32 {
    let sel = half & 0x7777; // bits 0–2 of each nibble: the entry within a half of the book
    let lo = gpu::prmt(t[0], t[1], sel); // entries 0–7
    let hi = gpu::prmt(t[2], t[3], sel); // entries 8–15
                                         // Byte i from `lo` (i) or, where nibble i has bit 3 set, from `hi` (i + 4).
    gpu::prmt(lo, hi, 0x3210 | ((half & 0x8888) >> 1))
}

/// Sixteen bytes read from shared memory as one 16-byte load, back to their four words.
#[inline(always)]
fn words(v: F4) -> [u32; 4] {
    [
        v.0[0].to_bits(),
        v.0[1].to_bits(),
        v.0[2].to_bits(),
        v.0[3].to_bits(),
    ]
}

/// The v4 kernel body (M = 1; `W` INT8 or NF4); x read as `XR` says ([`X_PLAIN`], [`X_NORM`],
/// [`X_SILU`]) before it is quantised.
///
/// # Safety
/// v3's buffers and layout, `W` INT8 or NF4, the dynamic shared memory [`v4_shared_bytes`] of the
/// plan's `kt`; the workspace as [`plan_v4`] sizes it (counters zero); the plan's launch shape.
#[inline(always)]
pub unsafe fn gemv_v4<W: FormatV2, const XR: u32>(p2: &GemvV2Params) {
    let p = &p2.base;
    let rows_per_block = V3_WARPS * V3_ROWS_PER_WARP;
    let kdim = p.in_features as usize;
    let Some((tile, split, k0, k1)) = block_split(p2) else {
        return; // the whole block: the plan makes every split start inside K
    };
    let lane = gpu::lane_id() as usize;
    let warp = gpu::warp_id() as usize;
    let nf4 = W::VEC == 32;
    // Shared memory: flag, x scales, x codes (see `v4_shared_bytes`).
    let flag = gpu::dynamic_shared::<u32>();
    let xd = (flag as *mut u8).wrapping_add(M1_HEAD_BYTES) as *mut f32;
    let xq = (flag as *mut u8).wrapping_add(v4_codes_offset(p2.kt));
    let inv = if XR == X_NORM {
        norm_scale(p2, flag)
    } else {
        1.0
    };
    // Quantise x[k0..k1) per 32: one group per warp at a time, a lane per element. NF4 stores each
    // pair of codes swapped, the order its nibbles decode in.
    let groups = (k1 - k0) / 32;
    let mut g = warp;
    while g < groups {
        let mut v = gpu::ld_nc(p.x, k0 + 32 * g + lane);
        if XR == X_NORM {
            v = v * inv * gpu::ld_nc(p2.norm, k0 + 32 * g + lane); // `rms_norm_f32`'s x · inv · gain
        } else if XR == X_SILU {
            v = silu_times(v, gpu::ld_nc(p.x, kdim + k0 + 32 * g + lane)); // `silu_mul_f32`'s
        }
        let mut a = if v < 0.0 { -v } else { v };
        let mut mask = 16;
        while mask > 0 {
            let o = gpu::shfl_xor_f32(a, mask);
            a = if o > a { o } else { a };
            mask /= 2;
        }
        let d = a / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let q = round_half_away(v * id).clamp(-127, 127) as i8;
        let at = 32 * g + if nf4 { lane ^ 1 } else { lane };
        gpu::sh_st(xq as *mut i8, at, q);
        if lane == 0 {
            gpu::sh_st(xd, g, d);
        }
        g += V3_WARPS as usize;
    }
    gpu::sync_threads();

    let vec = W::VEC as usize;
    let nvec = (k1 - k0) / vec;
    let out = p.out_features as usize;
    let row0 = (tile * rows_per_block) as usize + warp * V3_ROWS_PER_WARP as usize;
    let book = NF4_I8_WORDS;
    let mut scale = [0f32; 4];
    crate::unroll!(r in 0..4 => {
        if W::VEC == 16 && row0 + r < out {
            scale[r] = gpu::ld_nc(p.scales, row0 + r);
        }
    });
    let mut acc = [0f32; 4];
    let mut v0 = 0usize;
    while v0 < nvec {
        // Every row's weight vectors of the iteration first, two a row.
        let mut raw = [[[0u32; 4]; 2]; 4];
        crate::unroll!(u in 0..2 => {
            let v = v0 + u * 32 + lane;
            if v < nvec {
                crate::unroll!(r in 0..4 => {
                    if row0 + r < out {
                        let e = (row0 + r) * kdim + k0 + v * vec;
                        raw[r][u] = gpu::ld_v4(p.weight, W::byte_of(e));
                    }
                });
            }
        });
        crate::unroll!(u in 0..2 => {
            let v = v0 + u * 32 + lane;
            if v < nvec {
                let kk = v * vec; // offset in the split
                let xs = words(gpu::sh_ld(xq as *const F4, kk / 16));
                let dx = gpu::sh_ld(xd, kk / 32);
                if nf4 {
                    let xs2 = words(gpu::sh_ld(xq as *const F4, kk / 16 + 1));
                    crate::unroll!(r in 0..4 => {
                        if row0 + r < out {
                            let w = raw[r][u];
                            let s = gpu::ld_nc(p.scales, ((row0 + r) * kdim + k0 + kk) / NF4_BLOCK)
                                / 127.0;
                            // Half h: words 2h and 2h + 1, sixteen elements.
                            crate::unroll!(h in 0..2 => {
                                let xw = if h == 0 { xs } else { xs2 };
                                let mut dot = 0i32;
                                crate::unroll!(j in 0..2 => {
                                    let word = w[2 * h + j];
                                    dot = gpu::dp4a(nf4_nibbles_i8(word, &book), xw[2 * j], dot);
                                    dot = gpu::dp4a(nf4_nibbles_i8(word >> 16, &book), xw[2 * j + 1], dot);
                                });
                                acc[r] += s * dx * dot as f32;
                            });
                        }
                    });
                } else {
                    crate::unroll!(r in 0..4 => {
                        if row0 + r < out {
                            let w = raw[r][u];
                            let mut dot = 0i32;
                            crate::unroll!(j in 0..4 => {
                                dot = gpu::dp4a(w[j], xs[j], dot);
                            });
                            acc[r] += scale[r] * dx * dot as f32;
                        }
                    });
                }
            }
        });
        v0 += 64;
    }
    finish_rows(p2, tile, split, row0, acc, [1.0; 4], flag);
}

entries_m1! {
    gemv_v4_int8: gemv_v4, Int8, X_PLAIN;
    gemv_v4_nf4: gemv_v4, Nf4, X_PLAIN;
    gemv_v4_int8_norm: gemv_v4, Int8, X_NORM;
    gemv_v4_nf4_norm: gemv_v4, Nf4, X_NORM;
    gemv_v4_int8_silu: gemv_v4, Int8, X_SILU;
    gemv_v4_nf4_silu: gemv_v4, Nf4, X_SILU;
}

macro_rules! entries_v2 {
    ($($name:ident: $fmt:ty, $mt:literal;)*) => {$(
        /// # Safety
        /// See [`gemv_v2`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: GemvV2Params) {
            gemv_v2::<$fmt, $mt>(&p)
        }
    )*};
}

entries_v2! {
    gemv_v2_fp16_m1: Fp16, 1; gemv_v2_fp16_m2: Fp16, 2; gemv_v2_fp16_m4: Fp16, 4; gemv_v2_fp16_m8: Fp16, 8; gemv_v2_fp16_m16: Fp16, 16;
    gemv_v2_int8_m1: Int8, 1; gemv_v2_int8_m2: Int8, 2; gemv_v2_int8_m4: Int8, 4; gemv_v2_int8_m8: Int8, 8; gemv_v2_int8_m16: Int8, 16;
    gemv_v2_nf4_m1: Nf4, 1; gemv_v2_nf4_m2: Nf4, 2; gemv_v2_nf4_m4: Nf4, 4; gemv_v2_nf4_m8: Nf4, 8; gemv_v2_nf4_m16: Nf4, 16;
}

macro_rules! entries_tc {
    ($($name:ident: $fmt:ty, $nt:literal;)*) => {$(
        /// # Safety
        /// See [`gemv_tc`].
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: GemvV2Params) {
            gemv_tc::<$fmt, $nt>(&p)
        }
    )*};
}

entries_tc! {
    gemv_tc_fp16_n8: Fp16, 1; gemv_tc_fp16_n16: Fp16, 2;
    gemv_tc_int8_n8: Int8, 1; gemv_tc_int8_n16: Int8, 2;
    gemv_tc_nf4_n8: Nf4, 1; gemv_tc_nf4_n16: Nf4, 2;
}

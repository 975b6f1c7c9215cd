//! The small intrinsics layer the kernels are written against, in the spirit of `cuda_std`
//! (whose 2022 releases need LLVM 7 and cannot be used).
//!
//! On `nvptx64` every function is a PTX special register read or one inline PTX instruction. On the
//! host the same functions are answered by the emulator ([`crate::emu`]) with its sanitizer on:
//! indices come from the emulated thread's context, `sync_threads` suspends the thread until its
//! whole block has arrived, a warp shuffle suspends it until every live lane of its warp has
//! deposited its value, and every memory access is checked.
//!
//! **Memory goes through accessors**, never through a raw dereference:
//! - global memory: [`ld`] / [`st`] (`ld.global` / `st.global`), [`ld_nc`] for inputs the kernel
//!   never writes (`ld.global.nc`, the read-only data path), [`ld_v4`] for 16-byte vector loads, and
//!   [`atomic_add_u32`] with [`threadfence`]. The emulator checks each access against the buffers
//!   the launch registered (out of bounds, misaligned, a write to an input, a pointer into no
//!   buffer) and reports two blocks (or two unsynchronised threads) writing the same byte;
//! - shared memory: [`sh_ld`] / [`sh_st`] on the pointer [`dynamic_shared`] returns. The emulator
//!   poisons shared memory at launch and reports a read of a byte no thread wrote, an access past
//!   the launch's shared bytes, and a race: two threads touching the same byte between the same
//!   pair of barriers (or, within a warp, the same pair of [`sync_warp`]s), at least one writing.
//!
//! Only 1-D launches are used by speckv's kernels, so only the `x` components exist.

/// Repeats `$body` with `$i` bound to the constants 0, 1, …, N − 1 (N = 2, 4, 6, 8 or 16): loops written
/// this way are unrolled whatever LLVM's heuristics say, so arrays indexed by `$i` stay in registers
/// instead of local memory.
#[macro_export]
macro_rules! unroll {
    ($i:ident in 0..2 => $body:block) => {
        $crate::unroll!(@ $i [0 1] $body)
    };
    ($i:ident in 0..4 => $body:block) => {
        $crate::unroll!(@ $i [0 1 2 3] $body)
    };
    ($i:ident in 0..6 => $body:block) => {
        $crate::unroll!(@ $i [0 1 2 3 4 5] $body)
    };
    ($i:ident in 0..8 => $body:block) => {
        $crate::unroll!(@ $i [0 1 2 3 4 5 6 7] $body)
    };
    ($i:ident in 0..16 => $body:block) => {
        $crate::unroll!(@ $i [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] $body)
    };
    (@ $i:ident [$($n:literal)*] $body:block) => {
        $({
            let $i: usize = $n;
            $body
        })*
    };
}

/// Threads per warp, on every NVIDIA GPU speckv targets.
pub const WARP_SIZE: u32 = 32;

/// The shuffle mask for all 32 lanes; speckv's kernels only shuffle with full, converged warps.
pub const FULL_MASK: u32 = 0xffff_ffff;

#[cfg(target_arch = "nvptx64")]
mod imp {
    use core::arch::asm;
    use core::arch::nvptx;

    #[inline(always)]
    pub fn thread_idx_x() -> u32 {
        // SAFETY: reads a special register.
        unsafe { nvptx::_thread_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn block_idx_x() -> u32 {
        // SAFETY: reads a special register.
        unsafe { nvptx::_block_idx_x() as u32 }
    }
    #[inline(always)]
    pub fn block_dim_x() -> u32 {
        // SAFETY: reads a special register.
        unsafe { nvptx::_block_dim_x() as u32 }
    }
    #[inline(always)]
    pub fn grid_dim_x() -> u32 {
        // SAFETY: reads a special register.
        unsafe { nvptx::_grid_dim_x() as u32 }
    }

    /// `bar.sync 0`: every thread of the block must reach it (no divergent barriers).
    #[inline(always)]
    pub fn sync_threads() {
        // SAFETY: a block-wide barrier; callers keep it convergent.
        unsafe { nvptx::_syncthreads() }
    }

    /// `bar.warp.sync`: the lanes of the warp converge, and their memory accesses before it are
    /// ordered before those after it.
    #[inline(always)]
    pub fn sync_warp() {
        // SAFETY: a warp-wide barrier over the full mask; callers keep the warp converged.
        unsafe { asm!("bar.warp.sync 0xffffffff;", options(nostack)) }
    }

    /// The block's dynamic shared memory (sized by the launch), as a `T` pointer.
    #[inline(always)]
    pub fn dynamic_shared<T>() -> *mut T {
        core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<T>()
    }

    #[inline(always)]
    pub fn shfl_xor_u32(v: u32, lane_mask: u32) -> u32 {
        let r: u32;
        // SAFETY: full-mask butterfly shuffle; every lane of the warp executes it.
        unsafe {
            asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;",
                 r = out(reg32) r, v = in(reg32) v, m = in(reg32) lane_mask,
                 options(nomem, nostack));
        }
        r
    }
    #[inline(always)]
    pub fn shfl_down_u32(v: u32, delta: u32) -> u32 {
        let r: u32;
        // SAFETY: full-mask shuffle down; lanes past the end keep their own value.
        unsafe {
            asm!("shfl.sync.down.b32 {r}, {v}, {d}, 0x1f, 0xffffffff;",
                 r = out(reg32) r, v = in(reg32) v, d = in(reg32) delta,
                 options(nomem, nostack));
        }
        r
    }
    #[inline(always)]
    pub fn shfl_idx_u32(v: u32, src_lane: u32) -> u32 {
        let r: u32;
        // SAFETY: full-mask indexed shuffle (source lane taken modulo 32).
        unsafe {
            asm!("shfl.sync.idx.b32 {r}, {v}, {s}, 0x1f, 0xffffffff;",
                 r = out(reg32) r, v = in(reg32) v, s = in(reg32) src_lane,
                 options(nomem, nostack));
        }
        r
    }

    /// IEEE binary16 → f32, exact (`cvt.f32.f16`).
    #[inline(always)]
    pub fn f16_to_f32(bits: u16) -> f32 {
        let r: f32;
        // SAFETY: a register conversion.
        unsafe {
            asm!("cvt.f32.f16 {r}, {h};", r = out(reg32) r, h = in(reg16) bits,
                 options(pure, nomem, nostack));
        }
        r
    }

    /// 2^x, `ex2.approx.ftz.f32` (max relative error 2^-22; subnormals flushed to zero).
    #[inline(always)]
    pub fn exp2_approx(x: f32) -> f32 {
        let r: f32;
        // SAFETY: a register instruction.
        unsafe {
            asm!("ex2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x,
                 options(pure, nomem, nostack));
        }
        r
    }

    /// log2(x), `lg2.approx.ftz.f32` (max absolute error 2^-22; subnormals flushed to zero).
    #[inline(always)]
    pub fn log2_approx(x: f32) -> f32 {
        let r: f32;
        // SAFETY: a register instruction.
        unsafe {
            asm!("lg2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x,
                 options(pure, nomem, nostack));
        }
        r
    }

    /// 1/x, `rcp.approx.ftz.f32` (max error 1 ulp; subnormals flushed to zero).
    #[inline(always)]
    pub fn rcp_approx(x: f32) -> f32 {
        let r: f32;
        // SAFETY: a register instruction.
        unsafe {
            asm!("rcp.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x,
                 options(pure, nomem, nostack));
        }
        r
    }

    /// √x, correctly rounded (`sqrt.rn.f32`), as the host's `f32::sqrt`.
    #[inline(always)]
    pub fn sqrt_rn(x: f32) -> f32 {
        let r: f32;
        // SAFETY: a register instruction.
        unsafe {
            asm!("sqrt.rn.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x,
                 options(pure, nomem, nostack));
        }
        r
    }

    // Global memory: one `ld.global` / `st.global` per access, of the access's width. Inline PTX
    // rather than a dereference because the pointers arrive inside a by-value parameter struct,
    // where LLVM cannot prove them global and would emit generic `ld`.

    #[inline(always)]
    pub unsafe fn ld_b8(p: *const u8, nc: bool) -> u8 {
        let r: u32;
        if nc {
            asm!("ld.global.nc.u8 {r}, [{p}];", r = out(reg32) r, p = in(reg64) p,
                 options(readonly, nostack));
        } else {
            asm!("ld.global.u8 {r}, [{p}];", r = out(reg32) r, p = in(reg64) p,
                 options(readonly, nostack));
        }
        r as u8
    }
    #[inline(always)]
    pub unsafe fn ld_b16(p: *const u8, nc: bool) -> u16 {
        let r: u16;
        if nc {
            asm!("ld.global.nc.b16 {r}, [{p}];", r = out(reg16) r, p = in(reg64) p,
                 options(readonly, nostack));
        } else {
            asm!("ld.global.b16 {r}, [{p}];", r = out(reg16) r, p = in(reg64) p,
                 options(readonly, nostack));
        }
        r
    }
    #[inline(always)]
    pub unsafe fn ld_b32(p: *const u8, nc: bool) -> u32 {
        let r: u32;
        if nc {
            asm!("ld.global.nc.b32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) p,
                 options(readonly, nostack));
        } else {
            asm!("ld.global.b32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) p,
                 options(readonly, nostack));
        }
        r
    }
    #[inline(always)]
    pub unsafe fn ld_b64(p: *const u8, nc: bool) -> u64 {
        let r: u64;
        if nc {
            asm!("ld.global.nc.b64 {r}, [{p}];", r = out(reg64) r, p = in(reg64) p,
                 options(readonly, nostack));
        } else {
            asm!("ld.global.b64 {r}, [{p}];", r = out(reg64) r, p = in(reg64) p,
                 options(readonly, nostack));
        }
        r
    }
    #[inline(always)]
    pub unsafe fn ld_b128(p: *const u8, nc: bool) -> [u32; 4] {
        let (a, b, c, d): (u32, u32, u32, u32);
        if nc {
            asm!("ld.global.nc.v4.b32 {{{a}, {b}, {c}, {d}}}, [{p}];",
                 a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                 p = in(reg64) p, options(readonly, nostack));
        } else {
            asm!("ld.global.v4.b32 {{{a}, {b}, {c}, {d}}}, [{p}];",
                 a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                 p = in(reg64) p, options(readonly, nostack));
        }
        [a, b, c, d]
    }
    #[inline(always)]
    pub unsafe fn st_b8(p: *mut u8, v: u8) {
        asm!("st.global.u8 [{p}], {v};", p = in(reg64) p, v = in(reg32) v as u32,
             options(nostack));
    }
    #[inline(always)]
    pub unsafe fn st_b16(p: *mut u8, v: u16) {
        asm!("st.global.b16 [{p}], {v};", p = in(reg64) p, v = in(reg16) v, options(nostack));
    }
    #[inline(always)]
    pub unsafe fn st_b32(p: *mut u8, v: u32) {
        asm!("st.global.b32 [{p}], {v};", p = in(reg64) p, v = in(reg32) v, options(nostack));
    }
    #[inline(always)]
    pub unsafe fn st_b64(p: *mut u8, v: u64) {
        asm!("st.global.b64 [{p}], {v};", p = in(reg64) p, v = in(reg64) v, options(nostack));
    }
    #[inline(always)]
    pub unsafe fn st_b128(p: *mut u8, v: [u32; 4]) {
        asm!("st.global.v4.b32 [{p}], {{{a}, {b}, {c}, {d}}};", p = in(reg64) p,
             a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
             options(nostack));
    }

    /// `atom.global.add.u32`, returning the old value.
    #[inline(always)]
    pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
        let r: u32;
        asm!("atom.global.add.u32 {r}, [{p}], {v};", r = out(reg32) r, p = in(reg64) p,
             v = in(reg32) v, options(nostack));
        r
    }

    /// `fence.acq_rel.gpu` (`__threadfence()`): this thread's global writes before it are seen
    /// by the whole device before its writes after it.
    #[inline(always)]
    pub fn threadfence() {
        // SAFETY: a memory fence.
        unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`: D = A·B + C for the warp's 16×16 f16
    /// A, 16×8 f16 B and 16×8 f32 C, each lane holding its fragment (see `mma_m16n8k16`).
    #[inline(always)]
    pub fn mma_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
        let (d0, d1, d2, d3): (f32, f32, f32, f32);
        // SAFETY: a warp-collective register instruction; every lane of the warp executes it.
        unsafe {
            asm!("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{c0}, {c1}, {c2}, {c3}}};",
                 d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
                 a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                 b0 = in(reg32) b[0], b1 = in(reg32) b[1],
                 c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
                 options(nomem, nostack));
        }
        [d0, d1, d2, d3]
    }

    /// `dp4a.s32.s32`: c + the dot product of a's and b's four signed bytes.
    #[inline(always)]
    pub fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        let d: i32;
        // SAFETY: a register-only integer instruction (sm_61 and later).
        unsafe {
            asm!("dp4a.s32.s32 {d}, {a}, {b}, {c};",
                 d = out(reg32) d, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c,
                 options(pure, nomem, nostack));
        }
        d
    }

    /// `prmt.b32`: four bytes picked from the eight of (b:a) by the selector's low four nibbles.
    #[inline(always)]
    pub fn prmt(a: u32, b: u32, sel: u32) -> u32 {
        let d: u32;
        // SAFETY: a register-only byte permutation.
        unsafe {
            asm!("prmt.b32 {d}, {a}, {b}, {s};",
                 d = out(reg32) d, a = in(reg32) a, b = in(reg32) b, s = in(reg32) sel,
                 options(pure, nomem, nostack));
        }
        d
    }

    /// f32 → f16 bits, round to nearest even (`cvt.rn.f16.f32`).
    #[inline(always)]
    pub fn f32_to_f16(x: f32) -> u16 {
        let r: u16;
        // SAFETY: a register conversion.
        unsafe {
            asm!("cvt.rn.f16.f32 {r}, {x};", r = out(reg16) r, x = in(reg32) x,
                 options(pure, nomem, nostack));
        }
        r
    }

    /// Shared memory: a plain access through the pointer `dynamic_shared` returned, which LLVM
    /// infers to be in the shared space (`ld.shared` / `st.shared`).
    #[inline(always)]
    pub unsafe fn sh_ld<T: Copy>(base: *const T, i: usize) -> T {
        *base.add(i)
    }
    #[inline(always)]
    pub unsafe fn sh_st<T: Copy>(base: *mut T, i: usize, v: T) {
        *base.add(i) = v;
    }
}

#[cfg(not(target_arch = "nvptx64"))]
mod imp {
    use crate::emu;

    #[inline]
    pub fn thread_idx_x() -> u32 {
        emu::with_thread(|t| t.thread_idx)
    }
    #[inline]
    pub fn block_idx_x() -> u32 {
        emu::with_thread(|t| t.block_idx)
    }
    #[inline]
    pub fn block_dim_x() -> u32 {
        emu::with_thread(|t| t.block_dim)
    }
    #[inline]
    pub fn grid_dim_x() -> u32 {
        emu::with_thread(|t| t.grid_dim)
    }
    #[inline]
    pub fn sync_threads() {
        emu::sync_threads();
    }
    #[inline]
    pub fn sync_warp() {
        emu::sync_warp();
    }
    #[inline]
    pub fn dynamic_shared<T>() -> *mut T {
        emu::with_thread(|t| t.shared) as *mut T
    }
    #[inline]
    pub fn shfl_xor_u32(v: u32, lane_mask: u32) -> u32 {
        emu::shuffle(v, |lane| lane ^ (lane_mask & 31))
    }
    #[inline]
    pub fn shfl_down_u32(v: u32, delta: u32) -> u32 {
        // CUDA: a lane whose source is past lane 31 keeps its own value.
        emu::shuffle(v, |lane| {
            let src = lane + delta;
            if src < 32 {
                src
            } else {
                lane
            }
        })
    }
    #[inline]
    pub fn shfl_idx_u32(v: u32, src_lane: u32) -> u32 {
        emu::shuffle(v, |_| src_lane & 31)
    }
    #[inline]
    pub fn f16_to_f32(bits: u16) -> f32 {
        super::f16_bits_to_f32(bits)
    }
    #[inline]
    pub fn exp2_approx(x: f32) -> f32 {
        emu::math::exp2(x)
    }
    #[inline]
    pub fn log2_approx(x: f32) -> f32 {
        emu::math::log2(x)
    }
    #[inline]
    pub fn rcp_approx(x: f32) -> f32 {
        emu::math::rcp(x)
    }

    #[inline]
    pub unsafe fn ld_b8(p: *const u8, nc: bool) -> u8 {
        emu::global_load(p, nc)
    }
    #[inline]
    pub unsafe fn ld_b16(p: *const u8, nc: bool) -> u16 {
        emu::global_load(p, nc)
    }
    #[inline]
    pub unsafe fn ld_b32(p: *const u8, nc: bool) -> u32 {
        emu::global_load(p, nc)
    }
    #[inline]
    pub unsafe fn ld_b64(p: *const u8, nc: bool) -> u64 {
        emu::global_load(p, nc)
    }
    #[inline]
    pub unsafe fn ld_b128(p: *const u8, nc: bool) -> [u32; 4] {
        emu::global_load::<[u32; 4]>(p, nc)
    }
    #[inline]
    pub unsafe fn st_b8(p: *mut u8, v: u8) {
        emu::global_store(p, v)
    }
    #[inline]
    pub unsafe fn st_b16(p: *mut u8, v: u16) {
        emu::global_store(p, v)
    }
    #[inline]
    pub unsafe fn st_b32(p: *mut u8, v: u32) {
        emu::global_store(p, v)
    }
    #[inline]
    pub unsafe fn st_b64(p: *mut u8, v: u64) {
        emu::global_store(p, v)
    }
    #[inline]
    pub unsafe fn st_b128(p: *mut u8, v: [u32; 4]) {
        emu::global_store(p, v)
    }
    #[inline]
    pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
        emu::atomic_add_u32(p, v)
    }
    #[inline]
    pub fn threadfence() {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    #[inline]
    pub fn mma_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
        emu::mma_m16n8k16(a, b, c)
    }
    #[inline]
    pub fn f32_to_f16(x: f32) -> u16 {
        super::f32_to_f16_bits(x)
    }
    #[inline]
    pub fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        super::dp4a_bits(a, b, c)
    }
    #[inline]
    pub fn prmt(a: u32, b: u32, sel: u32) -> u32 {
        super::prmt_bits(a, b, sel)
    }
    #[inline]
    pub fn sqrt_rn(x: f32) -> f32 {
        x.sqrt()
    }
    #[inline]
    pub unsafe fn sh_ld<T: Copy>(base: *const T, i: usize) -> T {
        emu::shared_load(base, i)
    }
    #[inline]
    pub unsafe fn sh_st<T: Copy>(base: *mut T, i: usize, v: T) {
        emu::shared_store(base, i, v)
    }
}

pub use imp::{
    atomic_add_u32, block_dim_x, block_idx_x, dynamic_shared, exp2_approx, f16_to_f32, f32_to_f16,
    grid_dim_x, log2_approx, mma_m16n8k16, rcp_approx, sh_ld, sh_st, shfl_down_u32, shfl_idx_u32,
    shfl_xor_u32, sqrt_rn, sync_threads, sync_warp, thread_idx_x, threadfence,
};

/// Element `i` of the global buffer at `base` (`ld.global`, the access's natural width; types of
/// 12 or more than 16 bytes are read as 4-byte words).
///
/// # Safety
/// Element `i` must be inside the buffer and aligned for `T` (the emulator checks both).
#[inline(always)]
pub unsafe fn ld<T: Copy>(base: *const T, i: usize) -> T {
    load_as::<T>(base.wrapping_add(i) as *const u8, false)
}

/// [`ld`] through the read-only data path (`ld.global.nc`): only for buffers no thread of the
/// launch writes.
///
/// # Safety
/// As [`ld`], and the buffer is not written during the launch.
#[inline(always)]
pub unsafe fn ld_nc<T: Copy>(base: *const T, i: usize) -> T {
    load_as::<T>(base.wrapping_add(i) as *const u8, true)
}

/// 16 bytes at element `i` of `base` in one `ld.global.nc.v4` (the read-only path; 16-byte aligned).
///
/// # Safety
/// As [`ld_nc`], with `base + i` 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_v4<T>(base: *const T, i: usize) -> [u32; 4] {
    imp::ld_b128(base.wrapping_add(i) as *const u8, true)
}

/// Stores `v` to element `i` of the global buffer at `base` (`st.global`).
///
/// # Safety
/// Element `i` must be inside the buffer and aligned for `T`, and no other thread may access it
/// without synchronisation (the emulator reports two writers).
#[inline(always)]
pub unsafe fn st<T: Copy>(base: *mut T, i: usize, v: T) {
    let p = base.wrapping_add(i) as *mut u8;
    let n = core::mem::size_of::<T>();
    // The size is a compile-time constant: one arm survives.
    if n == 1 {
        imp::st_b8(p, core::mem::transmute_copy(&v));
    } else if n == 2 {
        imp::st_b16(p, core::mem::transmute_copy(&v));
    } else if n == 4 {
        imp::st_b32(p, core::mem::transmute_copy(&v));
    } else if n == 8 {
        imp::st_b64(p, core::mem::transmute_copy(&v));
    } else if n == 16 && core::mem::align_of::<T>() == 16 {
        imp::st_b128(p, core::mem::transmute_copy(&v));
    } else {
        // Word by word (the parameter structs are multiples of 4 bytes, 4-byte aligned).
        let words = n / 4;
        let src = &v as *const T as *const u32;
        let mut w = 0;
        while w < words {
            imp::st_b32(p.add(4 * w), core::ptr::read_unaligned(src.add(w)));
            w += 1;
        }
    }
}

#[inline(always)]
unsafe fn load_as<T: Copy>(p: *const u8, nc: bool) -> T {
    let n = core::mem::size_of::<T>();
    if n == 1 {
        core::mem::transmute_copy(&imp::ld_b8(p, nc))
    } else if n == 2 {
        core::mem::transmute_copy(&imp::ld_b16(p, nc))
    } else if n == 4 {
        core::mem::transmute_copy(&imp::ld_b32(p, nc))
    } else if n == 8 {
        core::mem::transmute_copy(&imp::ld_b64(p, nc))
    } else if n == 16 && core::mem::align_of::<T>() == 16 {
        core::mem::transmute_copy(&imp::ld_b128(p, nc))
    } else {
        let mut out = core::mem::MaybeUninit::<T>::uninit();
        let dst = out.as_mut_ptr() as *mut u32;
        let words = n / 4;
        let mut w = 0;
        while w < words {
            core::ptr::write_unaligned(dst.add(w), imp::ld_b32(p.add(4 * w), nc));
            w += 1;
        }
        out.assume_init()
    }
}

/// Four f32 in one 16-byte-aligned group: [`ld`] / [`st`] move it with one `.v4` access.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct F4(pub [f32; 4]);

/// This thread's lane within its warp.
#[inline(always)]
pub fn lane_id() -> u32 {
    thread_idx_x() & (WARP_SIZE - 1)
}

/// This thread's warp within its block.
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx_x() / WARP_SIZE
}

#[inline(always)]
pub fn shfl_xor_f32(v: f32, lane_mask: u32) -> f32 {
    f32::from_bits(shfl_xor_u32(v.to_bits(), lane_mask))
}

#[inline(always)]
pub fn shfl_down_f32(v: f32, delta: u32) -> f32 {
    f32::from_bits(shfl_down_u32(v.to_bits(), delta))
}

#[inline(always)]
pub fn shfl_idx_f32(v: f32, src_lane: u32) -> f32 {
    f32::from_bits(shfl_idx_u32(v.to_bits(), src_lane))
}

/// `dp4a.s32.s32` as the PTX ISA defines it: c + Σ a[i]·b[i] over the four signed bytes (wrapping).
#[inline]
pub fn dp4a_bits(a: u32, b: u32, c: i32) -> i32 {
    let mut d = c;
    let mut i = 0;
    while i < 4 {
        let x = (a >> (8 * i)) as u8 as i8 as i32;
        let y = (b >> (8 * i)) as u8 as i8 as i32;
        d = d.wrapping_add(x * y);
        i += 1;
    }
    d
}

/// `prmt.b32` (default mode) as the PTX ISA defines it: result byte i is byte `s & 7` of the
/// eight bytes (b:a), a in bytes 0–3, where s is nibble i of `sel`; with bit 3 of s set, the
/// selected byte's sign bit is replicated over the whole byte instead.
#[inline]
pub fn prmt_bits(a: u32, b: u32, sel: u32) -> u32 {
    let x = ((b as u64) << 32) | a as u64;
    let mut d = 0u32;
    let mut i = 0;
    while i < 4 {
        let s = (sel >> (4 * i)) & 0xf;
        let mut byte = ((x >> (8 * (s & 7))) & 0xff) as u32;
        if s & 8 != 0 {
            byte = if byte & 0x80 != 0 { 0xff } else { 0 };
        }
        d |= byte << (8 * i);
        i += 1;
    }
    d
}

/// c + the dot product of a's and b's four signed bytes (`dp4a.s32.s32` on the GPU).
#[inline(always)]
pub fn dp4a(a: u32, b: u32, c: i32) -> i32 {
    imp::dp4a(a, b, c)
}

/// Four bytes of (b:a) chosen by `sel`'s low four nibbles (`prmt.b32` on the GPU).
#[inline(always)]
pub fn prmt(a: u32, b: u32, sel: u32) -> u32 {
    imp::prmt(a, b, sel)
}

/// bfloat16 → f32: the upper half of an f32, exact.
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// e^x through `exp2_approx` (the GPU's `ex2.approx`).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    exp2_approx(x * core::f32::consts::LOG2_E)
}

/// ln(x) through `log2_approx` (the GPU's `lg2.approx`).
#[inline(always)]
pub fn ln_approx(x: f32) -> f32 {
    log2_approx(x) * core::f32::consts::LN_2
}

/// f32 → IEEE binary16 bits, round to nearest even (overflow to ±inf, NaN kept quiet), by bit
/// manipulation: the host's answer to `cvt.rn.f16.f32`.
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign
            | 0x7c00
            | if man != 0 {
                0x200 | (man >> 13) as u16
            } else {
                0
            };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal (or zero) half: shift the implicit-one mantissa, round to nearest even.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent: still correct (up to inf)
    }
    sign | r as u16
}

/// The m16n8k16 fragment layout `mma_m16n8k16` uses, per lane (group g = lane / 4, thread t = lane
/// % 4): A (16×16, row-major) registers `a[0]` = A[g][2t..2t+2], `a[1]` = A[g+8][2t..2t+2],
/// `a[2]` = A[g][2t+8..2t+10], `a[3]` = A[g+8][2t+8..2t+10] (two f16 each, lower column in the
/// low half); B (16×8, k × n) `b[0]` = B[2t..2t+2][g], `b[1]` = B[2t+8..2t+10][g]; C and D (16×8
/// f32) `c[0..2]` = C[g][2t..2t+2], `c[2..4]` = C[g+8][2t..2t+2].
pub mod mma_layout {
    /// (row, col) of A held in half `h` (0..8) of lane `lane`.
    pub const fn a(lane: u32, h: u32) -> (u32, u32) {
        let (g, t) = (lane / 4, lane % 4);
        let row = g + if h % 4 >= 2 { 8 } else { 0 };
        let col = 2 * t + (h % 2) + if h >= 4 { 8 } else { 0 };
        (row, col)
    }
    /// (k, n) of B held in half `h` (0..4) of lane `lane`.
    pub const fn b(lane: u32, h: u32) -> (u32, u32) {
        let (g, t) = (lane / 4, lane % 4);
        (2 * t + (h % 2) + if h >= 2 { 8 } else { 0 }, g)
    }
    /// (row, col) of C / D held in element `e` (0..4) of lane `lane`.
    pub const fn c(lane: u32, e: u32) -> (u32, u32) {
        let (g, t) = (lane / 4, lane % 4);
        (g + if e >= 2 { 8 } else { 0 }, 2 * t + (e % 2))
    }
}

/// IEEE binary16 → f32 by bit manipulation, exact for every input (normals, subnormals, ±0,
/// ±inf, NaN with its payload). The host's answer to `cvt.f32.f16`.
#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h as u32) >> 10) & 0x1f;
    let man = (h as u32) & 0x3ff;
    let bits = if exp == 0x1f {
        // inf / NaN: keep the payload, quiet bit included.
        sign | 0x7f80_0000 | (man << 13)
    } else if exp != 0 {
        sign | ((exp + 112) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // Subnormal: value = man * 2^-24; normalise it.
        let shift = man.leading_zeros() - 21; // 1..=10
        let man = (man << shift) & 0x3ff;
        sign | ((113 - shift) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

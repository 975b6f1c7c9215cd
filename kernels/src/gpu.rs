//! The small intrinsics layer the kernels are written against, in the spirit of `cuda_std`
//! (whose 2022 releases need LLVM 7 and cannot be used).
//!
//! On `nvptx64` every function is a PTX special register read or one inline PTX instruction. On the
//! host the same functions are answered by the emulator ([`crate::emu`]): indices come from the
//! emulated thread's context, `sync_threads` suspends the thread until its whole block has arrived,
//! and a warp shuffle suspends it until every live lane of its warp has deposited its value.
//!
//! Only 1-D launches are used by speckv's kernels, so only the `x` components exist.

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

    /// 2^x, `ex2.approx.ftz.f32` (max relative error 2^-22).
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

    /// log2(x), `lg2.approx.ftz.f32` (max absolute error 2^-22 on [0.5, 2]).
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
        x.exp2()
    }
    #[inline]
    pub fn log2_approx(x: f32) -> f32 {
        x.log2()
    }
}

pub use imp::*;

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

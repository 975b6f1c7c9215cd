//! The SwiGLU gate: out = silu(gate) · up from the fused gate / up projection `[m, 2·ffn]`, four
//! outputs per thread (16-byte loads and stores).

use crate::gpu::{self, F4};
use crate::params::SiluMulParams;

/// silu(gate) · up: this kernel's arithmetic, shared with the GEMVs that read x this way
/// (`gemv_v3_*_silu`, `gemv_v4_*_silu`), so both give the same bits.
#[inline(always)]
pub fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + gpu::exp_approx(-g)) * u
}

/// The kernel body.
///
/// # Safety
/// `gu` holds `m × 2·ffn` f32 and out `m × ffn`, both 16-byte aligned, `ffn` a multiple of 4;
/// `grid.x · block.x ≥ m · ffn / 4`.
#[inline(always)]
pub unsafe fn silu_mul(p: &SiluMulParams) {
    let per = (p.ffn / 4) as usize;
    let per_nz = match core::num::NonZeroUsize::new(per) {
        Some(n) => n,
        None => return,
    };
    let t = (gpu::block_idx_x() * gpu::block_dim_x() + gpu::thread_idx_x()) as usize;
    let (i, c) = (t / per_nz, t % per_nz);
    if i >= p.m as usize {
        return;
    }
    let gu = p.gu as *const F4;
    let g: F4 = gpu::ld_nc(gu, i * 2 * per + c);
    let u: F4 = gpu::ld_nc(gu, i * 2 * per + per + c);
    let mut o = F4([0.0; 4]);
    crate::unroll!(j in 0..4 => {
        o.0[j] = silu_times(g.0[j], u.0[j]);
    });
    gpu::st(p.out as *mut F4, i * per + c, o);
}

/// # Safety
/// See [`silu_mul`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn silu_mul_f32(p: SiluMulParams) {
    silu_mul(&p)
}

//! RMSNorm with the residual add in front: x ← x + residual (written back), out = x / √(mean(x²) +
//! eps) · weight. Fusing the add saves one pass over the activations per sub-layer: the
//! transformer's residual stream is updated by the same launch that normalises it.
//!
//! One block per row; rows move as 16-byte vectors; the sum of squares is a block reduction in a
//! fixed order, so the result does not depend on scheduling.

use crate::gpu::{self, F4};
use crate::params::RmsNormParams;
use crate::reduce::{block_all_reduce, Reduce};

/// A plain f32 sum as a block reduction.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Sum(pub f32);

impl Reduce for Sum {
    type Ctx = ();
    const EMPTY: Sum = Sum(0.0);
    #[inline(always)]
    fn merge(&mut self, o: &Self, _: ()) {
        self.0 += o.0;
    }
    #[inline(always)]
    fn shfl_xor(&self, mask: u32) -> Self {
        Sum(gpu::shfl_xor_f32(self.0, mask))
    }
}

/// Dynamic shared memory of a launch with `block` threads.
pub const fn shared_bytes(block: u32) -> usize {
    (block / 32) as usize * core::mem::size_of::<Sum>()
}

/// The kernel body.
///
/// # Safety
/// The buffers of `p` hold `rows × hidden` (weight: `hidden`) f32, 16-byte aligned, `hidden` a
/// multiple of 4; x, residual and out do not overlap; the launch is the documented one.
#[inline(always)]
pub unsafe fn rms_norm(p: &RmsNormParams) {
    let row = gpu::block_idx_x();
    if row >= p.rows {
        return; // the whole block leaves together
    }
    let vecs = (p.hidden / 4) as usize;
    let base = row as usize * vecs;
    let x = p.x as *mut F4;
    let tid = gpu::thread_idx_x() as usize;
    let block = gpu::block_dim_x() as usize;
    let mut ss = 0f32;
    let mut v = tid;
    while v < vecs {
        let mut a: F4 = gpu::ld(x as *const F4, base + v);
        if !p.residual.is_null() {
            let r: F4 = gpu::ld_nc(p.residual as *const F4, base + v);
            crate::unroll!(j in 0..4 => {
                a.0[j] += r.0[j];
            });
            gpu::st(x, base + v, a);
        }
        crate::unroll!(j in 0..4 => {
            ss += a.0[j] * a.0[j];
        });
        v += block;
    }
    let total = block_all_reduce(Sum(ss), (), gpu::dynamic_shared::<Sum>()).0;
    let inv = 1.0 / gpu::sqrt_rn(total / p.hidden as f32 + p.eps);
    // Each thread re-reads only the vectors it wrote itself: no other thread's writes to order.
    let mut v = tid;
    while v < vecs {
        let a: F4 = gpu::ld(x as *const F4, base + v);
        let g: F4 = gpu::ld_nc(p.weight as *const F4, v);
        let mut o = F4([0.0; 4]);
        crate::unroll!(j in 0..4 => {
            o.0[j] = a.0[j] * inv * g.0[j];
        });
        gpu::st(p.out as *mut F4, base + v, o);
        v += block;
    }
}

/// # Safety
/// See [`rms_norm`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn rms_norm_f32(p: RmsNormParams) {
    rms_norm(&p)
}

//! Token embedding: the f16 rows of the table for `m` tokens, as f32 activations. The tokens are
//! read from device memory (a verification launch can write them), so the step needs no host copy.
//! A token outside the vocabulary writes a NaN row: the host validates tokens, and a bad one that
//! slips through shows in the logits instead of reading another row.

use crate::gpu::{self, F4};
use crate::params::EmbedParams;

/// The kernel body: block i writes row i, eight elements (one 16-byte load) per thread step.
///
/// # Safety
/// `table` holds `vocab × hidden` f16 and is 16-byte aligned, `hidden` a multiple of 8, `tokens`
/// holds `m` tokens, x `m × hidden` f32 16-byte aligned; grid `m`.
#[inline(always)]
pub unsafe fn embed(p: &EmbedParams) {
    let i = gpu::block_idx_x();
    if i >= p.m {
        return;
    }
    let tok = gpu::ld_nc(p.tokens, i as usize);
    let vecs = (p.hidden / 8) as usize;
    let x = p.x as *mut F4;
    let out0 = i as usize * 2 * vecs;
    let mut v = gpu::thread_idx_x() as usize;
    while v < vecs {
        let mut h = [f32::NAN; 8];
        if tok < p.vocab {
            let raw = gpu::ld_v4(p.table, tok as usize * p.hidden as usize + 8 * v);
            crate::unroll!(j in 0..4 => {
                h[2 * j] = gpu::f16_to_f32((raw[j] & 0xffff) as u16);
                h[2 * j + 1] = gpu::f16_to_f32((raw[j] >> 16) as u16);
            });
        }
        gpu::st(x, out0 + 2 * v, F4([h[0], h[1], h[2], h[3]]));
        gpu::st(x, out0 + 2 * v + 1, F4([h[4], h[5], h[6], h[7]]));
        v += gpu::block_dim_x() as usize;
    }
}

/// # Safety
/// See [`embed`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn embed_f16(p: EmbedParams) {
    embed(&p)
}

//! After the fused q/k/v projection: bias, rotary embedding and the KV-cache append in one pass.
//! q goes to its own buffer for attention; k and v go straight into the f16 cache rows of their
//! positions, so the cache is written once and never staged. The rotary angles come from a table
//! the host computes in f64 (the CPU forward pass uses the same values), and the position comes
//! from the cache length in device memory.

use crate::gpu;
use crate::params::QkvRopeParams;

/// Threads a launch needs: one per (position, rotated pair of a q or k head) and per (position, v
/// element).
/// `m` counts the rows of the launch (every sequence's positions).
pub const fn work_items(m: u32, heads: u32, kv_heads: u32, head_dim: u32) -> u32 {
    m * ((heads + kv_heads) * head_dim / 2 + kv_heads * head_dim)
}

/// Element `c` of the fused row `i`, bias added.
#[inline(always)]
unsafe fn val(p: &QkvRopeParams, width: usize, i: usize, c: usize) -> f32 {
    let x = gpu::ld_nc(p.qkv, i * width + c);
    if p.bias.is_null() {
        x
    } else {
        x + gpu::ld_nc(p.bias, c)
    }
}

/// The kernel body.
///
/// # Safety
/// With s = max(seqs, 1): `qkv` holds `s·m × (heads + 2·kv_heads)·head_dim` f32 (bias, when not
/// null, one row of it), q `s·m × heads·head_dim`, the caches `s·capacity × kv_heads·head_dim` f16,
/// `cache_len` s words, rope `rope_positions × head_dim/2` pairs; `head_dim` even, `heads` a
/// multiple of `kv_heads`; one thread per [`work_items`] of `s·m` rows.
#[inline(always)]
pub unsafe fn qkv_rope(p: &QkvRopeParams) {
    let hd = p.head_dim as usize;
    let half = hd / 2;
    let (heads, kvh) = (p.heads as usize, p.kv_heads as usize);
    let rotated = (heads + kvh) * half;
    let per = rotated + kvh * hd;
    let per_nz = match core::num::NonZeroUsize::new(per) {
        Some(n) => n,
        None => return,
    };
    let t = (gpu::block_idx_x() * gpu::block_dim_x() + gpu::thread_idx_x()) as usize;
    // Row i of the batch: position i % m of sequence i / m.
    let (i, r) = (t / per_nz, t % per_nz);
    let seqs = if p.seqs == 0 { 1 } else { p.seqs as usize };
    let Some(m_nz) = core::num::NonZeroUsize::new(p.m as usize) else {
        return;
    };
    if i >= seqs * m_nz.get() {
        return;
    }
    let seq = i / m_nz;
    let pos = gpu::ld(p.cache_len, seq) as usize + i % m_nz;
    if pos >= p.capacity as usize || pos >= p.rope_positions as usize {
        return;
    }
    let width = (heads + 2 * kvh) * hd;
    let kvw = kvh * hd;
    // The sequence's own cache rows.
    let cache = seq * p.capacity as usize * kvw;
    if r < rotated {
        // q heads come first in the fused row and k heads follow them, so head `head` of the
        // concatenation starts at column head·hd either way.
        let half_nz = core::num::NonZeroUsize::new(half).unwrap_or(core::num::NonZeroUsize::MIN);
        let (head, j) = (r / half_nz, r % half_nz);
        let (a, b) = if p.neox != 0 {
            (j, j + half)
        } else {
            (2 * j, 2 * j + 1)
        };
        let x0 = val(p, width, i, head * hd + a);
        let x1 = val(p, width, i, head * hd + b);
        let [c, s] = gpu::ld_nc(p.rope, pos * half + j);
        let y0 = x0 * c - x1 * s;
        let y1 = x0 * s + x1 * c;
        if head < heads {
            let at = (i * heads + head) * hd;
            gpu::st(p.q, at + a, y0);
            gpu::st(p.q, at + b, y1);
        } else {
            let at = cache + pos * kvw + (head - heads) * hd;
            gpu::st(p.k_cache, at + a, gpu::f32_to_f16(y0));
            gpu::st(p.k_cache, at + b, gpu::f32_to_f16(y1));
        }
    } else {
        let e = r - rotated;
        let v = val(p, width, i, (heads + kvh) * hd + e);
        gpu::st(p.v_cache, cache + pos * kvw + e, gpu::f32_to_f16(v));
    }
}

/// # Safety
/// See [`qkv_rope`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn qkv_rope_f32(p: QkvRopeParams) {
    qkv_rope(&p)
}

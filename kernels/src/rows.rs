//! One block's share of a row of logits, read with 16-byte loads: the traversal `softmax_stats_v2`
//! and the v2 verification kernels share.
//!
//! A row is a scalar head (elements before the first 16-byte-aligned address: rows need not be
//! aligned, e.g. an odd vocabulary at its own stride), a body of 16-byte vectors, and a scalar tail.
//! Split `s` of `splits` reads body vectors `[s·chunk_vecs, (s+1)·chunk_vecs)`, split 0 also the
//! head and the last split the tail; each thread issues `UNROLL` vector loads before using any.

use crate::gpu;
use crate::softmax_stats::Logit;

/// Loads per thread issued before any is used (the `unroll!` in `for_chunk` is written for 4).
pub const UNROLL: usize = 4;

/// Elements per 16-byte vector of an element type of `elem_bytes` (4, 2 or 1).
pub const fn lanes(elem_bytes: usize) -> u32 {
    match elem_bytes {
        4 => 4,
        2 => 8,
        1 => 16,
        _ => 1,
    }
}

/// Where a row's aligned body starts and ends.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    /// Elements before the first 16-byte-aligned address (≤ vocab).
    pub head: u32,
    /// 16-byte vectors after the head.
    pub body_vecs: u32,
    /// First element of the tail.
    pub tail_start: u32,
}

/// The head / body / tail of a row of `vocab` elements of `L` at `base`.
#[inline(always)]
pub fn span<L: Logit>(base: *const u8, vocab: u32) -> Span {
    let w = lanes(L::SIZE);
    let misalign = (base as usize) & 15;
    let head = if misalign == 0 {
        0
    } else {
        ((16 - misalign) / L::SIZE) as u32
    };
    let head = if head < vocab { head } else { vocab };
    let body_vecs = (vocab - head) / w;
    Span {
        head,
        body_vecs,
        tail_start: head + body_vecs * w,
    }
}

/// Up to 8 logits of one 16-byte vector, as f32 (the first `lanes(L::SIZE)` are valid).
#[inline(always)]
pub fn unpack<L: Logit>(v: [u32; 4]) -> [f32; 8] {
    let mut x = [0f32; 8];
    if L::SIZE == 4 {
        crate::unroll!(k in 0..4 => {
            x[k] = f32::from_bits(v[k]);
        });
    } else {
        crate::unroll!(k in 0..4 => {
            x[2 * k] = L::half((v[k] & 0xffff) as u16);
            x[2 * k + 1] = L::half((v[k] >> 16) as u16);
        });
    }
    x
}

/// What a kernel does with the elements of its chunk.
pub trait Visit {
    /// A head or tail element `x` at index `i`.
    fn scalar(&mut self, x: f32, i: u32);
    /// A body vector: `n` valid elements from index `i0`. By default, element by element.
    #[inline(always)]
    fn vector(&mut self, x: &[f32; 8], n: usize, i0: u32) {
        crate::unroll!(k in 0..8 => {
            if k < n {
                self.scalar(x[k], i0 + k as u32);
            }
        });
    }
}

/// Visits this thread's elements of split `split` of the row at `base`: `scalar` for head and tail
/// elements, `vector` for each body vector, in increasing element order per thread. (A visitor
/// borrowed `&mut`, not closures over a raw pointer, so its state stays in registers.)
///
/// # Safety
/// The row's `vocab` elements must be readable through the read-only path.
#[inline(always)]
pub unsafe fn for_chunk<L: Logit, V: Visit>(
    base: *const u8,
    vocab: u32,
    split: u32,
    splits: u32,
    chunk_vecs: u32,
    visit: &mut V,
) {
    let tid = gpu::thread_idx_x();
    let block = gpu::block_dim_x();
    let sp = span::<L>(base, vocab);
    let w = lanes(L::SIZE);
    if split == 0 && tid < sp.head {
        visit.scalar(L::load(base, tid as u64), tid);
    }
    let body = base.wrapping_add(sp.head as usize * L::SIZE);
    let start = split.saturating_mul(chunk_vecs);
    let end = {
        let e = start.saturating_add(chunk_vecs);
        if e < sp.body_vecs {
            e
        } else {
            sp.body_vecs
        }
    };
    let stride = block as usize;
    let mut v = start.saturating_add(tid);
    while (v as usize) + (UNROLL - 1) * stride < end as usize {
        // All UNROLL loads issued before the first is used.
        let mut raw = [[0u32; 4]; UNROLL];
        crate::unroll!(k in 0..4 => {
            raw[k] = gpu::ld_v4(body, (v as usize + k * stride) * 16);
        });
        crate::unroll!(k in 0..4 => {
            let vi = v + (k * stride) as u32;
            visit.vector(&unpack::<L>(raw[k]), w as usize, sp.head + vi * w);
        });
        v += (UNROLL * stride) as u32;
    }
    while v < end {
        visit.vector(
            &unpack::<L>(gpu::ld_v4(body, v as usize * 16)),
            w as usize,
            sp.head + v * w,
        );
        v += block;
    }
    if split + 1 == splits {
        let mut i = sp.tail_start + tid;
        while i < vocab {
            visit.scalar(L::load(base, i as u64), i);
            i += block;
        }
    }
}

/// The last block of a group to arrive: publishes `partial` at `partials[slot]`, counts the
/// arrival on `counter`, and returns true in every thread of the block that arrived last (which
/// may then read every partial of the group). `flag` is one shared word, not otherwise in use.
///
/// # Safety
/// Every thread of the block calls it; `partials[slot]` is this block's own slot; `counter` is
/// zero before the group's first arrival; `group` blocks arrive in all.
#[inline(always)]
pub unsafe fn arrive_last<T: Copy>(
    partials: *mut T,
    slot: usize,
    partial: T,
    counter: *mut u32,
    group: u32,
    flag: *mut u32,
) -> bool {
    if gpu::thread_idx_x() == 0 {
        gpu::st(partials, slot, partial);
        gpu::threadfence();
        let arrived = gpu::atomic_add_u32(counter, 1);
        gpu::sh_st(flag, 0, (arrived + 1 == group) as u32);
    }
    gpu::sync_threads();
    let last = gpu::sh_ld(flag, 0) != 0;
    // The flag's readers are done before anyone reuses shared memory.
    gpu::sync_threads();
    if last {
        gpu::threadfence();
    }
    last
}

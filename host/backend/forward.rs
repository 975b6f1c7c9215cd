//! Host side of the forward-pass kernels (`embed`, `rms_norm`, `qkv_rope`, `attention`,
//! `silu_mul`): their shapes and the checks every launch passes first, shared by the emulated and
//! the CUDA launches so both refuse the same inputs with the same errors.

use crate::error::{Error, Result};

/// The attention's head layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Grouped-query heads whose size the attention kernel takes.
    pub fn check(&self) -> Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Unsupported(format!(
                "{} query heads over {} key-value heads: the query heads must be a positive \
                 multiple of the key-value heads",
                self.heads, self.kv_heads
            )));
        }
        if speckv_kernels::attention::per_lane(self.head_dim as u32).is_none() {
            return Err(Error::Unsupported(format!(
                "head size {}: the attention kernel takes 8, 16, 32, 64, 128 or 256",
                self.head_dim
            )));
        }
        Ok(())
    }
    /// Columns of q (`heads · head_dim`).
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Columns of a KV-cache row (`kv_heads · head_dim`).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Columns of the fused q/k/v projection.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

/// Positions a step may add at once (the verification batch of γ ≤ 15, plus one).
pub const MAX_STEP: usize = 16;

/// `len` elements for `rows × width`.
pub fn check_len(what: &'static str, len: usize, rows: usize, width: usize) -> Result<()> {
    if len != rows * width {
        return Err(Error::Length {
            what,
            got: len,
            expected: rows * width,
        });
    }
    Ok(())
}

/// `m` new positions after `len` fit a cache of `capacity` rows (and the rotary table).
pub fn check_step(m: usize, len: usize, capacity: usize) -> Result<()> {
    if m == 0 || m > MAX_STEP {
        return Err(Error::Other(format!(
            "{m} positions in one step: 1 to {MAX_STEP} are supported"
        )));
    }
    if len + m > capacity {
        return Err(Error::Other(format!(
            "{} positions exceed the KV cache's {capacity}",
            len + m
        )));
    }
    Ok(())
}

/// A batched step of `rows` rows over sequences at cache lengths `lens` (each `capacity`
/// positions): every sequence gets the same number of positions m, all rows fit one step
/// (≤ [`MAX_STEP`]) and each sequence's new positions fit its cache. Returns m.
pub fn check_batch(rows: usize, lens: &[usize], capacity: usize) -> Result<usize> {
    if lens.is_empty() {
        return Err(Error::Empty { what: "sequences" });
    }
    if rows == 0 || !rows.is_multiple_of(lens.len()) {
        return Err(Error::Other(format!(
            "{rows} rows do not split evenly over {} sequences",
            lens.len()
        )));
    }
    check_step(rows, 0, MAX_STEP)?;
    let m = rows / lens.len();
    for &len in lens {
        check_step(m, len, capacity)?;
    }
    Ok(m)
}

/// The 16-byte alignment the vectorised kernels' loads and stores need.
pub fn check_aligned<T>(what: &'static str, s: &[T]) -> Result<()> {
    if !(s.as_ptr() as usize).is_multiple_of(16) {
        return Err(Error::Other(format!("{what} must be 16-byte aligned")));
    }
    Ok(())
}

/// A width the 4-wide (f32) or 8-wide (f16) vectors divide.
pub fn check_multiple(what: &'static str, width: usize, of: usize) -> Result<()> {
    if width == 0 || !width.is_multiple_of(of) {
        return Err(Error::Unsupported(format!(
            "{what} = {width}: the forward-pass kernels need a positive multiple of {of}"
        )));
    }
    Ok(())
}

/// Four f32 on a 16-byte boundary: the unit [`AlignedF32`] allocates in.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Quad([f32; 4]);

/// An f32 buffer whose start is 16-byte aligned, as the vectorised kernels need (a `Vec<f32>`
/// promises only 4): host memory standing in for device memory on the emulator.
#[derive(Clone, Debug, Default)]
pub struct AlignedF32 {
    quads: Vec<Quad>,
    len: usize,
}

impl AlignedF32 {
    pub fn zeros(len: usize) -> AlignedF32 {
        AlignedF32 {
            quads: vec![Quad([0.0; 4]); len.div_ceil(4)],
            len,
        }
    }
    pub fn from_slice(s: &[f32]) -> AlignedF32 {
        let mut a = AlignedF32::zeros(s.len());
        a.as_mut_slice().copy_from_slice(s);
        a
    }
    pub fn as_slice(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.quads)[..self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.quads)[..self.len]
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

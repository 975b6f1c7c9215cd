//! GGUF weights kept in the blocks they are stored in (the `gguf` regime): the byte layouts of the
//! block types the supported models use, their float reference decoding, and a matrix of rows of
//! blocks. The integer dot products that read them live in `weights::cpu`.
//!
//! Layouts (ggml's, little-endian; `d`, `m`, `dmin` are f16):
//! - Q4_0 (32 elements, 18 bytes): `d`, 16 bytes of nibbles; element j < 16 is the low nibble of
//!   byte j, element j + 16 its high nibble; value = d · (q − 8).
//! - Q4_1 (32, 20): `d`, `m`, nibbles as Q4_0; value = d · q + m.
//! - Q5_0 (32, 22): `d`, 32 high bits (u32, bit j for element j), nibbles as Q4_0;
//!   value = d · (q − 16) with q = nibble | high bit << 4.
//! - Q8_0 (32, 34): `d`, 32 × i8; value = d · q.
//! - Q4_K (256, 144): `d`, `dmin`, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles;
//!   64-element chunk c holds sub-block 2c in the low nibbles of its 32 bytes and 2c + 1 in the high
//!   ones; value = d · scale_s · q − dmin · min_s.
//! - Q6_K (256, 210): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 × i8 scales (one per 16
//!   elements), `d`; value = d · scale · (q − 32).
//! - F16 / F32: plain rows.
//!
//! Other GGUF types (Q5_1, Q2_K, Q3_K, Q5_K, ...) are decoded to f32 at load and re-stored as Q8_0;
//! the model records which tensors were.

use half::f16;

use crate::error::{Error, Result};

/// The block types kept as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BlockType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl BlockType {
    /// Elements per block.
    pub const fn block(self) -> usize {
        match self {
            BlockType::F32 | BlockType::F16 => 1,
            BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q8_0 => 32,
            BlockType::Q4K | BlockType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn bytes(self) -> usize {
        match self {
            BlockType::F32 => 4,
            BlockType::F16 => 2,
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q8_0 => 34,
            BlockType::Q4K => 144,
            BlockType::Q6K => 210,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockType::F32 => "F32",
            BlockType::F16 => "F16",
            BlockType::Q4_0 => "Q4_0",
            BlockType::Q4_1 => "Q4_1",
            BlockType::Q5_0 => "Q5_0",
            BlockType::Q8_0 => "Q8_0",
            BlockType::Q4K => "Q4_K",
            BlockType::Q6K => "Q6_K",
        }
    }

    pub const ALL: [BlockType; 8] = [
        BlockType::F32,
        BlockType::F16,
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q8_0,
        BlockType::Q4K,
        BlockType::Q6K,
    ];

    /// Storage bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.bytes() as f64 / self.block() as f64
    }
}

/// An `[out, in]` matrix whose rows are runs of blocks of one type, as in the GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMatrix {
    pub ty: BlockType,
    pub out: usize,
    pub inp: usize,
    pub data: Vec<u8>,
}

impl BlockMatrix {
    /// Wraps raw block bytes, checking the shape against the type.
    pub fn new(ty: BlockType, out: usize, inp: usize, data: Vec<u8>) -> Result<BlockMatrix> {
        if out == 0 || inp == 0 {
            return Err(Error::Empty {
                what: "matrix dimensions",
            });
        }
        if !inp.is_multiple_of(ty.block()) || (ty.block() > 1 && !inp.is_multiple_of(32)) {
            return Err(Error::BadModel(format!(
                "a {} row of {inp} elements is not a whole number of {}-element blocks",
                ty.name(),
                ty.block()
            )));
        }
        let expected = out
            .checked_mul(inp / ty.block() * ty.bytes())
            .ok_or(Error::TooLarge("matrix"))?;
        if data.len() != expected {
            return Err(Error::Length {
                what: "block bytes",
                got: data.len(),
                expected,
            });
        }
        Ok(BlockMatrix { ty, out, inp, data })
    }

    pub fn row_bytes(&self) -> usize {
        self.inp / self.ty.block() * self.ty.bytes()
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Rows of `self` followed by rows of `other` (fused projections); the types and widths must
    /// match.
    pub fn stack(parts: &[&BlockMatrix]) -> Option<BlockMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.ty != first.ty || p.inp != first.inp) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(BlockMatrix {
            ty: first.ty,
            out: parts.iter().map(|p| p.out).sum(),
            inp: first.inp,
            data,
        })
    }

    /// Row `r` decoded to f32 (the reference every kernel is tested against).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        let (b, nb) = (self.ty.block(), self.ty.bytes());
        for (blk, o) in row.chunks_exact(nb).zip(out.chunks_exact_mut(b)) {
            dequantize_block(self.ty, blk, o);
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.out * self.inp];
        for (r, o) in v.chunks_exact_mut(self.inp).enumerate() {
            self.dequantize_row(r, o);
        }
        v
    }

    /// Q8_0 blocks of row-major `w` (32 | in): the store for types kept only as f32 elsewhere.
    pub fn quantize_q8_0(w: &[f32], out: usize, inp: usize) -> Result<BlockMatrix> {
        if !inp.is_multiple_of(32) || w.len() != out * inp {
            return Err(Error::BadModel(format!(
                "Q8_0 needs rows of a multiple of 32 ({out}×{inp}, {} values)",
                w.len()
            )));
        }
        let mut data = Vec::with_capacity(out * inp / 32 * 34);
        for blk in w.chunks_exact(32) {
            let a = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = a / 127.0;
            data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            data.extend(
                blk.iter()
                    .map(|x| (x * id).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        BlockMatrix::new(BlockType::Q8_0, out, inp, data)
    }
}

pub(crate) fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min of Q4_K sub-block `j` (0..8) from the 12 packed bytes.
#[inline(always)]
pub(crate) fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One block to f32.
pub fn dequantize_block(ty: BlockType, b: &[u8], o: &mut [f32]) {
    match ty {
        BlockType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        BlockType::F16 => o[0] = half_at(b, 0),
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let d = half_at(b, 0);
            let (m, off, qs) = if ty == BlockType::Q4_1 {
                (half_at(b, 2), 0.0, &b[4..20])
            } else {
                (0.0, 8.0, &b[2..18])
            };
            for j in 0..16 {
                o[j] = d * ((qs[j] & 0xF) as f32 - off) + m;
                o[j + 16] = d * ((qs[j] >> 4) as f32 - off) + m;
            }
        }
        BlockType::Q5_0 => {
            let d = half_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                o[j] = d * (((qs[j] & 0xF) as u32 | h0) as f32 - 16.0);
                o[j + 16] = d * (((qs[j] >> 4) as u32 | h1) as f32 - 16.0);
            }
        }
        BlockType::Q8_0 => {
            let d = half_at(b, 0);
            for j in 0..32 {
                o[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        BlockType::Q4K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let (sc, qs) = (&b[4..16], &b[16..144]);
            for c in 0..4 {
                let (s0, m0) = q4k_scale_min(2 * c, sc);
                let (s1, m1) = q4k_scale_min(2 * c + 1, sc);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    o[64 * c + l] = d * s0 as f32 * (q & 0xF) as f32 - dmin * m0 as f32;
                    o[64 * c + 32 + l] = d * s1 as f32 * (q >> 4) as f32 - dmin * m1 as f32;
                }
            }
        }
        BlockType::Q6K => {
            let d = half_at(b, 208);
            for e in 0..256 {
                let q = q6k_code(b, e);
                let sc = b[192 + e / 16] as i8;
                o[e] = d * sc as f32 * (q as f32 - 32.0);
            }
        }
    }
}

/// Element `e`'s 6-bit code (0..63) in a Q6_K block.
#[inline(always)]
pub(crate) fn q6k_code(b: &[u8], e: usize) -> u8 {
    let (half, r) = (e / 128, e % 128);
    let (ql, qh) = (
        &b[64 * half..64 * half + 64],
        &b[128 + 32 * half..128 + 32 * half + 32],
    );
    let (quarter, l) = (r / 32, r % 32);
    let low = match quarter {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    low | (((qh[l] >> (2 * quarter)) & 3) << 4)
}

/// A matrix of random blocks of `ty` (finite scales of a realistic size): what the kernel tests
/// and the regime benchmarks read.
pub fn random(ty: BlockType, out: usize, inp: usize, seed: u64) -> Result<BlockMatrix> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let nblocks = out * (inp / ty.block());
    let mut data = vec![0u8; nblocks * ty.bytes()];
    rng.fill(&mut data[..]);
    let put = |blk: &mut [u8], at: usize, v: f32| {
        blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
    };
    for blk in data.chunks_exact_mut(ty.bytes()) {
        let s: f32 = rng.gen_range(0.0005..0.004);
        match ty {
            BlockType::F32 => {
                blk.copy_from_slice(&(rng.gen_range(-1.0f32..1.0) * 0.05).to_le_bytes())
            }
            BlockType::F16 => put(blk, 0, rng.gen_range(-0.05..0.05)),
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => put(blk, 0, s),
            BlockType::Q4_1 => {
                put(blk, 0, s);
                put(blk, 2, -8.0 * s);
            }
            BlockType::Q4K => {
                put(blk, 0, s / 16.0);
                put(blk, 2, s / 8.0);
            }
            BlockType::Q6K => put(blk, 208, s / 32.0),
        }
    }
    BlockMatrix::new(ty, out, inp, data)
}

/// Maps a candle GGUF type to a kept block type, or `None` when it is re-stored as Q8_0.
pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<BlockType> {
    use candle_core::quantized::GgmlDType as G;
    Some(match t {
        G::F32 => BlockType::F32,
        G::F16 => BlockType::F16,
        G::Q4_0 => BlockType::Q4_0,
        G::Q4_1 => BlockType::Q4_1,
        G::Q5_0 => BlockType::Q5_0,
        G::Q8_0 => BlockType::Q8_0,
        G::Q4K => BlockType::Q4K,
        G::Q6K => BlockType::Q6K,
        _ => return None,
    })
}

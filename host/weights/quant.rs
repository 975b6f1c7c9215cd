//! The three weight regimes the paper compresses the target to, as storage formats:
//! - FP16: row-major f16 `[out, in]`;
//! - INT8, weight-only, per output row: scale = absmax(row) / 127 (f32), q = round(x / scale)
//!   clamped to [−127, 127] (i8); an all-zero row has scale 0;
//! - NF4, bitsandbytes-compatible: 64 consecutive elements of the row-major matrix per block, absmax
//!   per block (f32), each element → the nearest of the 16 NF4 code values of x / absmax (ties to the
//!   lower code), two codes per byte with the first element in the high nibble. `out·in` must be a
//!   multiple of 64 (the block rule; no padding, a clear error instead). Optional double
//!   quantisation of the absmax values: blocks of 256, 8 bits (absmax − mean, scaled by the block's
//!   largest |deviation| / 127) — the idea of QLoRA's double quantisation with a linear 8-bit code,
//!   not bitsandbytes' dynamic code, so its bytes are not bitsandbytes-compatible.
//!
//! `speckv quantize` reads a float32 .npy and writes safetensors with tensors `weight` plus `scale`
//! (int8) or `absmax` (nf4), and metadata (format, shape, blocksize).

use half::f16;
use serde::Serialize;
use speckv_kernels::params::{NF4_BLOCK, NF4_CODE};

use crate::error::{Error, Result};

/// Weight regime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Fp16,
    Int8,
    Nf4,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Fp16, Format::Int8, Format::Nf4];

    pub fn name(self) -> &'static str {
        match self {
            Format::Fp16 => "fp16",
            Format::Int8 => "int8",
            Format::Nf4 => "nf4",
        }
    }

    pub fn parse(s: &str) -> Result<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::Unknown {
                what: "format",
                value: s.to_string(),
                expected: "fp16, int8, nf4",
            })
    }

    /// Storage bits per weight, scales included, for an `out × in` matrix.
    pub fn bits_per_weight(self, out: usize, inp: usize) -> f64 {
        let n = (out * inp) as f64;
        match self {
            Format::Fp16 => 16.0,
            Format::Int8 => 8.0 + 32.0 * out as f64 / n,
            Format::Nf4 => 4.0 + 32.0 / NF4_BLOCK as f64,
        }
    }
}

/// NF4 absmax values quantised to 8 bits (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// `[n_blocks]` codes, value = (code − 128) · scale[b / 256] + offset.
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offset: f32,
}

pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// A quantised `[out, in]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub enum QMatrix {
    Fp16 {
        out: usize,
        inp: usize,
        w: Vec<f16>,
    },
    Int8 {
        out: usize,
        inp: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
    },
    /// `absmax` holds the values the kernels use: with double quantisation, the decoded ones.
    Nf4 {
        out: usize,
        inp: usize,
        packed: Vec<u8>,
        absmax: Vec<f32>,
        double: Option<DoubleQuant>,
    },
}

fn check_shape(w: &[f32], out: usize, inp: usize) -> Result<()> {
    if out == 0 || inp == 0 {
        return Err(Error::Empty {
            what: "matrix dimensions",
        });
    }
    let n = out.checked_mul(inp).ok_or(Error::TooLarge("out × in"))?;
    if w.len() != n {
        return Err(Error::Length {
            what: "weights",
            got: w.len(),
            expected: n,
        });
    }
    if out > u32::MAX as usize || inp > u32::MAX as usize || n / 2 > u32::MAX as usize * 8 {
        return Err(Error::TooLarge("matrix"));
    }
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err(Error::Other(format!("weight {i} is not finite ({})", w[i])));
    }
    Ok(())
}

/// Midpoints between consecutive NF4 code values (bitsandbytes quantises by these thresholds).
fn nf4_thresholds() -> [f32; 15] {
    let mut t = [0f32; 15];
    for (i, x) in t.iter_mut().enumerate() {
        *x = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    t
}

/// Index of the NF4 code nearest to `v` (in [−1, 1]): the number of midpoints strictly below `v`,
/// so a value exactly between two codes takes the lower one.
pub fn nf4_code(v: f32) -> u8 {
    nf4_thresholds().iter().filter(|&&t| v > t).count() as u8
}

impl QMatrix {
    /// Quantises row-major `w` (`out × in`, all finite).
    pub fn quantize(
        w: &[f32],
        out: usize,
        inp: usize,
        format: Format,
        double_quant: bool,
    ) -> Result<QMatrix> {
        check_shape(w, out, inp)?;
        if double_quant && format != Format::Nf4 {
            return Err(Error::Other(
                "double quantisation applies to nf4 only".to_string(),
            ));
        }
        Ok(match format {
            Format::Fp16 => QMatrix::Fp16 {
                out,
                inp,
                w: w.iter().map(|&x| f16::from_f32(x)).collect(),
            },
            Format::Int8 => {
                let mut q = vec![0i8; w.len()];
                let mut scale = vec![0f32; out];
                for r in 0..out {
                    let row = &w[r * inp..(r + 1) * inp];
                    let absmax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let s = absmax / 127.0;
                    scale[r] = s;
                    if s > 0.0 {
                        for (qi, x) in q[r * inp..(r + 1) * inp].iter_mut().zip(row) {
                            *qi = (x / s).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
                QMatrix::Int8 { out, inp, q, scale }
            }
            Format::Nf4 => {
                let n = w.len();
                if !n.is_multiple_of(NF4_BLOCK) {
                    return Err(Error::Other(format!(
                        "nf4 needs out·in to be a multiple of the block size {NF4_BLOCK}; {out}×{inp} = {n} is not"
                    )));
                }
                let blocks = n / NF4_BLOCK;
                let mut absmax = vec![0f32; blocks];
                let mut packed = vec![0u8; n / 2];
                for b in 0..blocks {
                    let blk = &w[b * NF4_BLOCK..(b + 1) * NF4_BLOCK];
                    let a = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                    absmax[b] = a;
                    for (j, &x) in blk.iter().enumerate() {
                        let code = if a > 0.0 { nf4_code(x / a) } else { 7 }; // 7 is the code of 0.0
                        let e = b * NF4_BLOCK + j;
                        if e.is_multiple_of(2) {
                            packed[e / 2] |= code << 4;
                        } else {
                            packed[e / 2] |= code;
                        }
                    }
                }
                // The codes are chosen against the exact absmax (as bitsandbytes does); with double
                // quantisation the matrix then carries the absmax values its 8-bit codes decode to.
                let double = double_quant.then(|| double_quantize(&absmax));
                if let Some(d) = &double {
                    absmax = double_dequantize(d);
                }
                QMatrix::Nf4 {
                    out,
                    inp,
                    packed,
                    absmax,
                    double,
                }
            }
        })
    }

    pub fn format(&self) -> Format {
        match self {
            QMatrix::Fp16 { .. } => Format::Fp16,
            QMatrix::Int8 { .. } => Format::Int8,
            QMatrix::Nf4 { .. } => Format::Nf4,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            QMatrix::Fp16 { out, inp, .. }
            | QMatrix::Int8 { out, inp, .. }
            | QMatrix::Nf4 { out, inp, .. } => (*out, *inp),
        }
    }

    /// The absmax values the kernels use.
    pub fn nf4_absmax(&self) -> Option<&[f32]> {
        match self {
            QMatrix::Nf4 { absmax, .. } => Some(absmax),
            _ => None,
        }
    }

    /// Bytes of weights (and scales) a GEMV reads.
    pub fn bytes(&self) -> usize {
        match self {
            QMatrix::Fp16 { w, .. } => w.len() * 2,
            QMatrix::Int8 { q, scale, .. } => q.len() + scale.len() * 4,
            QMatrix::Nf4 { packed, absmax, .. } => packed.len() + absmax.len() * 4,
        }
    }

    /// The matrix the format represents, row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QMatrix::Fp16 { w, .. } => w.iter().map(|x| x.to_f32()).collect(),
            QMatrix::Int8 { inp, q, scale, .. } => q
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * scale[i / inp])
                .collect(),
            QMatrix::Nf4 { packed, .. } => {
                let absmax = self.nf4_absmax().unwrap_or(&[]);
                (0..packed.len() * 2)
                    .map(|e| {
                        let b = packed[e / 2];
                        let nib = if e % 2 == 0 { b >> 4 } else { b & 15 };
                        NF4_CODE[nib as usize] * absmax[e / NF4_BLOCK]
                    })
                    .collect()
            }
        }
    }
}

fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = absmax.iter().map(|&a| a as f64).sum::<f64>() as f32 / absmax.len().max(1) as f32;
    let mut codes = vec![128u8; absmax.len()];
    let mut scales = Vec::new();
    for (bi, blk) in absmax.chunks(DOUBLE_QUANT_BLOCK).enumerate() {
        let dev = blk.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
        let s = dev / 127.0;
        scales.push(s);
        if s > 0.0 {
            for (j, a) in blk.iter().enumerate() {
                codes[bi * DOUBLE_QUANT_BLOCK + j] =
                    (((a - offset) / s).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
        }
    }
    DoubleQuant {
        codes,
        scales,
        offset,
    }
}

pub(crate) fn double_dequantize(d: &DoubleQuant) -> Vec<f32> {
    d.codes
        .iter()
        .enumerate()
        .map(|(i, &c)| (c as i32 - 128) as f32 * d.scales[i / DOUBLE_QUANT_BLOCK] + d.offset)
        .collect()
}

/// Relative RMS error of a format on `w`: ‖Ŵ − W‖ / ‖W‖.
pub fn relative_rms_error(w: &[f32], q: &QMatrix) -> f64 {
    let d = q.dequantize();
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in w.iter().zip(&d) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

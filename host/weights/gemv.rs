//! Fused dequantise + GEMV / small-M GEMM (M ≤ 16) for the three weight regimes: shapes, kernel
//! parameters, and the CPU backend's native version (rayon over output rows, weights decoded tile by
//! tile into f32 and dotted in 8 lanes, AVX2 chosen at run time). The kernel runs on the emulator
//! (`backend::emulate`) and on CUDA (`backend::cuda`).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use speckv_kernels::params::{GemvParams, NF4_BLOCK, NF4_CODE};

use crate::error::{Error, Result};
use crate::weights::quant::QMatrix;

/// Largest M (rows of x) one launch takes: the γ + 1 positions of a verification pass.
pub const MAX_M: usize = 16;

/// Checks x `[m, in]` against the matrix; returns m.
pub fn check(w: &QMatrix, x: &[f32], m: usize) -> Result<usize> {
    let (_, inp) = w.shape();
    if m == 0 || m > MAX_M {
        return Err(Error::Other(format!(
            "M = {m} rows of x: 1 to {MAX_M} are supported"
        )));
    }
    if x.len() != m * inp {
        return Err(Error::Length {
            what: "x",
            got: x.len(),
            expected: m * inp,
        });
    }
    Ok(m)
}

/// What a planned GEMV launch does besides y = x · Wᵀ: the device forward pass's fusions, which
/// take launches out of a decode step. `N` is the gains' buffer (a slice on the emulator, a device
/// buffer on CUDA).
#[derive(Clone, Copy, Debug)]
pub struct Fusion<N> {
    /// Normalise x first, x / √(mean(x²) + eps) · gains (the `_norm` entries of v3 and v4, M = 1;
    /// other plans refuse it: see `plan::plan_fused`).
    pub norm: Option<(N, f32)>,
    /// x is a gate / up row `[2·in]` read as silu(gate) · up (the `_silu` entries, M = 1).
    pub silu: bool,
    /// y += x · Wᵀ (every kernel): a projection adds itself into the residual stream.
    pub accumulate: bool,
}

impl<N> Fusion<N> {
    /// y = x · Wᵀ, nothing else.
    pub const NONE: Fusion<N> = Fusion {
        norm: None,
        silu: false,
        accumulate: false,
    };

    /// How the kernel reads x (a norm and a gate together are refused).
    pub fn read(&self) -> Result<XRead> {
        match (&self.norm, self.silu) {
            (None, false) => Ok(XRead::Plain),
            (Some(_), false) => Ok(XRead::Norm),
            (None, true) => Ok(XRead::Silu),
            (Some(_), true) => Err(Error::Unsupported(
                "a GEMV reads x either normalised or as silu(gate) · up, not both".to_string(),
            )),
        }
    }

    /// Elements of x per row for a matrix of `inp` columns (a gate / up row is two of them).
    pub fn x_width(&self, inp: usize) -> usize {
        if self.silu {
            2 * inp
        } else {
            inp
        }
    }

    /// The kernels' `GemvParams::flags`.
    pub fn flags(&self) -> u32 {
        if self.accumulate {
            speckv_kernels::params::GEMV_ACCUMULATE
        } else {
            0
        }
    }
}

/// Checks the gains of a norm fused into the GEMV of a `[_, inp]` matrix.
pub(crate) fn check_norm(gains: usize, inp: usize, eps: f32) -> Result<()> {
    if gains != inp {
        return Err(Error::Length {
            what: "norm gains",
            got: gains,
            expected: inp,
        });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Other(format!(
            "norm eps {eps}: a finite value ≥ 0 is needed"
        )));
    }
    Ok(())
}

/// How a GEMV reads x: as it is, normalised (`_norm`: the RMSNorm in front of a projection) or
/// as silu(gate) · up of a `[2·in]` gate / up row (`_silu`: the SwiGLU in front of the down
/// projection). The fused reads are v3's and v4's, at M = 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum XRead {
    Plain,
    Norm,
    Silu,
}

impl XRead {
    /// The entry point's suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            XRead::Plain => "",
            XRead::Norm => "_norm",
            XRead::Silu => "_silu",
        }
    }
}

/// Kernel parameters for host or device addresses.
pub(crate) fn params(
    w: &QMatrix,
    m: usize,
    weight: *const u8,
    scales: *const f32,
    x: *const f32,
    y: *mut f32,
) -> GemvParams {
    let (out, inp) = w.shape();
    GemvParams {
        weight,
        scales,
        x,
        y,
        out_features: out as u32,
        in_features: inp as u32,
        m: m as u32,
        flags: 0,
    }
}

/// The weight bytes and scale slice the kernels read.
pub(crate) fn raw(w: &QMatrix) -> (&[u8], Option<&[f32]>) {
    match w {
        QMatrix::Fp16 { w, .. } => (bytemuck::cast_slice(w), None),
        QMatrix::Int8 { q, scale, .. } => (bytemuck::cast_slice(q), Some(scale.as_slice())),
        QMatrix::Nf4 { packed, absmax, .. } => (packed, Some(absmax.as_slice())),
    }
}

const KTILE: usize = 1024;
/// 32 accumulator lanes: four independent 8-wide vectors, so the adds are not one dependency chain.
const LANES: usize = 32;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// y `[m, out]` = x · Wᵀ on the CPU backend.
pub fn cpu(w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
    check(w, x, m)?;
    let (out, _) = w.shape();
    let absmax = w.nf4_absmax();
    let mut yt = vec![0f32; out * m]; // [out, m], transposed at the end
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, chunk)| {
            let r0 = t * ROWS_PER_TASK;
            for (j, yrow) in chunk.chunks_mut(m).enumerate() {
                dispatch_row(w, absmax, x, m, r0 + j, yrow);
            }
        });
    let mut y = vec![0f32; m * out];
    for r in 0..out {
        for i in 0..m {
            y[i * out + r] = yt[r * m + i];
        }
    }
    Ok(y)
}

fn dispatch_row(
    w: &QMatrix,
    absmax: Option<&[f32]>,
    x: &[f32],
    m: usize,
    row: usize,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { row_avx2(w, absmax, x, m, row, y) };
        }
    }
    row_dot(w, absmax, x, m, row, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2(
    w: &QMatrix,
    absmax: Option<&[f32]>,
    x: &[f32],
    m: usize,
    row: usize,
    y: &mut [f32],
) {
    row_dot(w, absmax, x, m, row, y)
}

/// Code values of both nibbles of every byte (high nibble first).
fn nf4_pair_lut() -> &'static [[f32; 2]; 256] {
    static LUT: std::sync::OnceLock<[[f32; 2]; 256]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [[0f32; 2]; 256];
        for (b, e) in t.iter_mut().enumerate() {
            *e = [NF4_CODE[b >> 4], NF4_CODE[b & 15]];
        }
        t
    })
}

/// One output row for every row of x: decode a tile of W's row to f32, dot it with each x row.
#[inline(always)]
fn row_dot(w: &QMatrix, absmax: Option<&[f32]>, x: &[f32], m: usize, row: usize, y: &mut [f32]) {
    let (_, inp) = w.shape();
    let mut buf = [0f32; KTILE];
    let mut acc = [[0f32; LANES]; MAX_M];
    let mut k0 = 0;
    while k0 < inp {
        let n = KTILE.min(inp - k0);
        let wt = &mut buf[..n];
        let base = row * inp + k0;
        match w {
            QMatrix::Fp16 { w, .. } => w[base..base + n].convert_to_f32_slice(wt),
            QMatrix::Int8 { q, scale, .. } => {
                let s = scale[row];
                for (d, &v) in wt.iter_mut().zip(&q[base..base + n]) {
                    *d = v as f32 * s;
                }
            }
            QMatrix::Nf4 { packed, .. } => {
                let am = absmax.unwrap_or(&[]);
                if base.is_multiple_of(NF4_BLOCK) && n % NF4_BLOCK == 0 {
                    // Whole blocks: one absmax per 32 bytes, both nibbles of a byte from a table.
                    let lut = nf4_pair_lut();
                    let bytes = &packed[base / 2..(base + n) / 2];
                    for ((out64, in32), &s) in wt
                        .chunks_exact_mut(NF4_BLOCK)
                        .zip(bytes.chunks_exact(NF4_BLOCK / 2))
                        .zip(&am[base / NF4_BLOCK..])
                    {
                        for (pair, &byte) in out64.chunks_exact_mut(2).zip(in32) {
                            let [hi, lo] = lut[byte as usize];
                            pair[0] = hi * s;
                            pair[1] = lo * s;
                        }
                    }
                } else if base.is_multiple_of(2) && n % 2 == 0 {
                    // Whole bytes: both nibbles from a 256-entry table, scaled by their block's absmax.
                    let lut = nf4_pair_lut();
                    for (j, (pair, &byte)) in wt
                        .chunks_exact_mut(2)
                        .zip(&packed[base / 2..(base + n) / 2])
                        .enumerate()
                    {
                        let s = am[(base + 2 * j) / NF4_BLOCK];
                        let [hi, lo] = lut[byte as usize];
                        pair[0] = hi * s;
                        pair[1] = lo * s;
                    }
                } else {
                    for (j, d) in wt.iter_mut().enumerate() {
                        let e = base + j;
                        let b = packed[e / 2];
                        let nib = if e.is_multiple_of(2) { b >> 4 } else { b & 15 };
                        *d = NF4_CODE[nib as usize] * am[e / NF4_BLOCK];
                    }
                }
            }
        }
        for (i, a) in acc.iter_mut().enumerate().take(m) {
            let xs = &x[i * inp + k0..i * inp + k0 + n];
            let wc = wt.chunks_exact(LANES);
            let xc = xs.chunks_exact(LANES);
            let (wr, xr) = (wc.remainder(), xc.remainder());
            for (wv, xv) in wc.zip(xc) {
                for l in 0..LANES {
                    a[l] += wv[l] * xv[l];
                }
            }
            for (wv, xv) in wr.iter().zip(xr) {
                a[0] += wv * xv;
            }
        }
        k0 += n;
    }
    for (yi, a) in y.iter_mut().zip(acc.iter()) {
        *yi = a.iter().sum();
    }
}

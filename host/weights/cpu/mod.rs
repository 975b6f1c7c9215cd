//! The CPU decoding path's matrix products, y `[m, out]` = x `[m, in]` · Wᵀ for M = 1..16 positions:
//! - **integer path** (GGUF blocks Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K, speckv's INT8 and NF4): the
//!   activations are quantised to 8 bits per 32 elements ([`Acts`]), each 32-element sub-block of a
//!   weight row is decoded once into 8-bit codes and dotted with every position's codes by
//!   `maddubs`/`madd` (AVX2) or `dpbusd` (AVX-VNNI, or AVX-512 VNNI on 256-bit registers), chosen
//!   at run time; the integer sums are scaled in f32;
//! - **float path** (FP16 regime, F16/F32 GGUF tensors): F16C conversion and FMA on f32 activations.
//!
//! Every weight sub-block of 32 is written as value_j = s[j / 16] · c_j + o[j / 16] with integer
//! codes c (u8 or i8), so one formula serves every type:
//! Σ_j value_j · x_j ≈ Σ_h dx · (s_h · Σ_{j∈h} c_j q_j) + o_h · dx · Σ_{j∈h} q_j,
//! x_j ≈ dx · q_j. The scalar version of that formula ([`scalar`]) is the oracle of the SIMD one.
//!
//! Weights are read once per group of up to four positions (the group's accumulators stay in
//! registers), output rows are split across rayon's threads, and nothing is allocated: the caller
//! owns every buffer ([`Acts`], the `[out, m]` scratch).

mod scalar;
#[cfg(target_arch = "x86_64")]
#[macro_use]
mod simd_k;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod vec;

use rayon::prelude::*;
use speckv_kernels::params::{NF4_BLOCK, NF4_CODE};

use crate::error::{Error, Result};
use crate::weights::ggml::{BlockMatrix, BlockType};
use crate::weights::quant::QMatrix;

/// Largest M one product takes (the γ + 1 positions of a verification pass).
pub const MAX_M: usize = 16;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 32;

/// A linear layer's weights in either family of storage.
#[derive(Clone, Debug, PartialEq)]
pub enum Linear {
    Blocks(BlockMatrix),
    Regime(QMatrix),
}

impl Linear {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Linear::Blocks(b) => (b.out, b.inp),
            Linear::Regime(q) => q.shape(),
        }
    }
    /// Bytes a product reads.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Blocks(b) => b.data.len(),
            Linear::Regime(q) => q.bytes(),
        }
    }
    /// Whether the product runs on 8-bit activations (the integer path).
    pub fn integer(&self) -> bool {
        match self {
            Linear::Blocks(b) => !matches!(b.ty, BlockType::F16 | BlockType::F32),
            Linear::Regime(q) => !matches!(q, QMatrix::Fp16 { .. }),
        }
    }
    /// Whether the product reads the per-256 activations (the K-quants).
    pub fn k_quant(&self) -> bool {
        matches!(self, Linear::Blocks(b) if matches!(b.ty, BlockType::Q4K | BlockType::Q6K))
    }
    /// The activation forms the product reads: (per 32, per 256).
    pub fn needs(&self) -> (bool, bool) {
        (self.integer() && !self.k_quant(), self.k_quant())
    }
    /// A short name of the storage: "Q4_K", "int8", ...
    pub fn kind(&self) -> &'static str {
        match self {
            Linear::Blocks(b) => b.ty.name(),
            Linear::Regime(q) => q.format().name(),
        }
    }
    /// Checks that the integer path can take the rows (whole 32-element sub-blocks; NF4 rows of
    /// whole 64-element blocks so no block spans two rows).
    pub fn check(&self) -> Result<()> {
        let (_, inp) = self.shape();
        let need = match self {
            Linear::Regime(QMatrix::Nf4 { .. }) => NF4_BLOCK,
            l if l.integer() => 32,
            _ => 1,
        };
        if inp % need != 0 {
            return Err(Error::BadModel(format!(
                "{} rows of {inp} elements: the CPU product needs a multiple of {need}",
                self.kind()
            )));
        }
        Ok(())
    }
    /// The matrix as f32 (reference).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Linear::Blocks(b) => b.dequantize(),
            Linear::Regime(q) => q.dequantize(),
        }
    }
}

/// NF4 code values × 127, rounded: the int8 table of the integer NF4 product (as llama.cpp's
/// IQ4_NL does with its own table). Largest change of a code value: 0.5 / 127 of the absmax.
pub fn nf4_i8() -> [i8; 16] {
    let mut t = [0i8; 16];
    for (d, c) in t.iter_mut().zip(NF4_CODE) {
        *d = (c * 127.0).round() as i8;
    }
    t
}

/// 8-bit activations of each position, twice:
/// - per 32-element block: codes q (i8), scale dx = absmax / 127, and dx · Σq per 16-element half
///   (the offset terms need it) — for the 32-element block types, INT8 and NF4;
/// - per 256-element block (when 256 | k): codes, one scale, and Σq per 16 elements — for the
///   K-quants, whose sub-block scales are small integers, so a whole 256-element block is summed
///   in integers and scaled once.
pub struct Acts {
    m: usize,
    k: usize,
    /// Which of the two forms the last `quantize_for` wrote.
    has32: bool,
    has256: bool,
    qs: Vec<i8>,
    dx: Vec<f32>,
    d16: Vec<f32>,
    qk: Vec<i8>,
    dk: Vec<f32>,
    bsum: Vec<i16>,
}

impl Acts {
    /// Buffers for up to `MAX_M` positions of `max_k` elements.
    pub fn new(max_k: usize) -> Acts {
        let k = max_k.div_ceil(32) * 32;
        Acts {
            m: 0,
            k: 0,
            has32: false,
            has256: false,
            qs: vec![0; MAX_M * k],
            dx: vec![0.0; MAX_M * k / 32],
            d16: vec![0.0; MAX_M * k / 16],
            qk: vec![0; MAX_M * k],
            dk: vec![0.0; MAX_M * k / 32],
            bsum: vec![0; MAX_M * k / 16],
        }
    }

    /// Quantises x `[m, k]` (k a multiple of 32, within capacity) in both forms (the second when
    /// 256 | k).
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        self.quantize_for(x, m, k, (true, true))
    }

    /// Quantises x in the forms `needs` = (per 32, per 256) asks for — what [`Linear::needs`]
    /// returns — so the decoding path never writes a form no product will read.
    pub fn quantize_for(
        &mut self,
        x: &[f32],
        m: usize,
        k: usize,
        needs: (bool, bool),
    ) -> Result<()> {
        if !k.is_multiple_of(32) || m == 0 || m > MAX_M || m * k > self.qs.len() || x.len() != m * k
        {
            return Err(Error::Other(format!(
                "activations [{m}, {k}] ({} values) do not fit 8-bit blocks of 32 within [{MAX_M}, {}]",
                x.len(),
                self.qs.len() / MAX_M
            )));
        }
        self.m = m;
        self.k = k;
        self.has32 = needs.0;
        self.has256 = needs.1 && k.is_multiple_of(256);
        for (b, xb) in x
            .chunks_exact(32)
            .enumerate()
            .take(if needs.0 { usize::MAX } else { 0 })
        {
            let a = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = a / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.qs[32 * b..32 * b + 32];
            let mut sums = [0i32; 2];
            for (j, (qj, v)) in q.iter_mut().zip(xb).enumerate() {
                let c = (v * id).round().clamp(-127.0, 127.0) as i8;
                *qj = c;
                sums[j / 16] += c as i32;
            }
            self.dx[b] = d;
            self.d16[2 * b] = d * sums[0] as f32;
            self.d16[2 * b + 1] = d * sums[1] as f32;
        }
        if self.has256 {
            for (b, xb) in x.chunks_exact(256).enumerate() {
                let a = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = a / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q = &mut self.qk[256 * b..256 * b + 256];
                for (qj, v) in q.iter_mut().zip(xb) {
                    *qj = (v * id).round().clamp(-127.0, 127.0) as i8;
                }
                for (g, s) in self.bsum[16 * b..16 * b + 16].iter_mut().enumerate() {
                    *s = q[16 * g..16 * g + 16].iter().map(|&c| c as i16).sum();
                }
                self.dk[b] = d;
            }
        }
        Ok(())
    }

    /// Position i's per-256 codes, scales and sums of 16 (valid when 256 | k).
    #[inline(always)]
    pub(crate) fn row_k(&self, i: usize) -> (&[i8], &[f32], &[i16]) {
        let nb = self.k / 256;
        (
            &self.qk[i * self.k..(i + 1) * self.k],
            &self.dk[i * nb..(i + 1) * nb],
            &self.bsum[16 * i * nb..16 * (i + 1) * nb],
        )
    }

    /// Position i's codes, scales and half sums.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize) -> (&[i8], &[f32], &[f32]) {
        let nb = self.k / 32;
        (
            &self.qs[i * self.k..(i + 1) * self.k],
            &self.dx[i * nb..(i + 1) * nb],
            &self.d16[2 * i * nb..2 * (i + 1) * nb],
        )
    }
}

/// The instruction set the products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Isa {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

impl Isa {
    /// Every ISA this CPU can run (the scalar oracle first).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let base = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            if base {
                v.push(Isa::Avx2);
                if std::is_x86_feature_detected!("avxvnni") {
                    v.push(Isa::AvxVnni);
                }
                if std::is_x86_feature_detected!("avx512vnni")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        v
    }

    /// Whether this CPU runs `isa` (checked once).
    pub fn supported(isa: Isa) -> bool {
        static AV: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        AV.get_or_init(Isa::available).contains(&isa)
    }

    /// The fastest available: VNNI when the CPU has it, then AVX2. `SPECKV_CPU_ISA=scalar|avx2|
    /// avxvnni|avx512vnni` forces one the CPU has.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let av = Isa::available();
            if let Ok(s) = std::env::var("SPECKV_CPU_ISA") {
                if let Some(i) = av
                    .iter()
                    .find(|i| format!("{i:?}").eq_ignore_ascii_case(&s))
                {
                    return *i;
                }
            }
            [Isa::AvxVnni, Isa::Avx512Vnni, Isa::Avx2]
                .into_iter()
                .find(|i| av.contains(i))
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// y `[m, out]` = x · Wᵀ with `isa`; `acts` must hold x quantised when `w.integer()`, `yt` is
/// `[out, m]` scratch.
pub fn matmul_with(
    isa: Isa,
    w: &Linear,
    x: &[f32],
    acts: &Acts,
    m: usize,
    y: &mut [f32],
    yt: &mut [f32],
) -> Result<()> {
    let (out, inp) = w.shape();
    if m == 0 || m > MAX_M || x.len() < m * inp || y.len() < m * out || yt.len() < m * out {
        return Err(Error::Other(format!(
            "product of [{m}, {inp}] by [{out}, {inp}]ᵀ: x has {}, y {}, scratch {} values",
            x.len(),
            y.len(),
            yt.len()
        )));
    }
    w.check()?;
    let (n32, n256) = w.needs();
    if w.integer()
        && (acts.m != m || acts.k != inp || (n32 && !acts.has32) || (n256 && !acts.has256))
    {
        return Err(Error::Other(format!(
            "the 8-bit activations hold [{}, {}] (per 32: {}, per 256: {}), the product needs [{m}, {inp}] (per 32: {n32}, per 256: {n256})",
            acts.m, acts.k, acts.has32, acts.has256
        )));
    }
    if !Isa::supported(isa) {
        return Err(Error::Other(format!("this CPU cannot run {isa:?}")));
    }
    let x = &x[..m * inp];
    yt[..m * out]
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, chunk)| {
            let r0 = t * ROWS_PER_TASK;
            rows(isa, w, x, acts, m, r0, chunk);
        });
    for r in 0..out {
        for i in 0..m {
            y[i * out + r] = yt[r * m + i];
        }
    }
    Ok(())
}

/// [`matmul_with`] on the fastest ISA.
pub fn matmul(
    w: &Linear,
    x: &[f32],
    acts: &Acts,
    m: usize,
    y: &mut [f32],
    yt: &mut [f32],
) -> Result<()> {
    matmul_with(Isa::best(), w, x, acts, m, y, yt)
}

/// Output rows r0.. (as many as `yt` holds, `[rows, m]`).
fn rows(isa: Isa, w: &Linear, x: &[f32], a: &Acts, m: usize, r0: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `matmul_with` checked that this CPU has the ISA's features; shapes are checked
        // there and every load inside goes through a bounds-checked slice.
        match isa {
            Isa::Avx2 => return unsafe { simd::avx2::rows(w, x, a, m, r0, yt) },
            Isa::AvxVnni => return unsafe { simd::avxvnni::rows(w, x, a, m, r0, yt) },
            Isa::Avx512Vnni => return unsafe { simd::avx512vnni::rows(w, x, a, m, r0, yt) },
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    scalar::rows(w, x, a, m, r0, yt)
}

/// Sub-block `b` (32 elements) of row `r`: codes, whether they are signed, per-half scale s and
/// offset o (value = s · c + o). Shared by the scalar path and the tests.
pub(crate) struct Sub {
    pub c: [u8; 32],
    pub signed: bool,
    pub s: [f32; 2],
    pub o: [f32; 2],
}

pub(crate) fn sub_block(w: &Linear, r: usize, b: usize) -> Sub {
    let mut c = [0u8; 32];
    let (mut signed, mut s, mut o) = (false, [0f32; 2], [0f32; 2]);
    match w {
        Linear::Blocks(bm) => {
            let (bt, nb) = (bm.ty.block(), bm.ty.bytes());
            let row = bm.row(r);
            let blk = &row[(32 * b / bt) * nb..(32 * b / bt + 1) * nb];
            match bm.ty {
                BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 => {
                    // The codes are the unsigned nibble (plus high bit); the dequantised value
                    // gives them back exactly: q = (v − o) / d.
                    let d = crate::weights::ggml::half_at(blk, 0);
                    let off = match bm.ty {
                        BlockType::Q4_0 => -8.0 * d,
                        BlockType::Q5_0 => -16.0 * d,
                        _ => crate::weights::ggml::half_at(blk, 2),
                    };
                    let (qs, qh) = match bm.ty {
                        BlockType::Q4_1 => (&blk[4..20], 0u32),
                        BlockType::Q5_0 => (
                            &blk[6..22],
                            u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                        ),
                        _ => (&blk[2..18], 0u32),
                    };
                    for j in 0..16 {
                        c[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) << 4) as u8);
                        c[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
                    }
                    s = [d; 2];
                    o = [off; 2];
                }
                BlockType::Q8_0 => {
                    c.copy_from_slice(&blk[2..34]);
                    signed = true;
                    s = [crate::weights::ggml::half_at(blk, 0); 2];
                }
                BlockType::Q4K => {
                    let sub = b % 8;
                    let (d, dmin) = (
                        crate::weights::ggml::half_at(blk, 0),
                        crate::weights::ggml::half_at(blk, 2),
                    );
                    let (sc, mn) = crate::weights::ggml::q4k_scale_min(sub, &blk[4..16]);
                    let qs = &blk[16 + 32 * (sub / 2)..16 + 32 * (sub / 2) + 32];
                    for (cj, q) in c.iter_mut().zip(qs) {
                        *cj = if sub.is_multiple_of(2) {
                            q & 0xF
                        } else {
                            q >> 4
                        };
                    }
                    s = [d * sc as f32; 2];
                    o = [-dmin * mn as f32; 2];
                }
                BlockType::Q6K => {
                    let sub = b % 8;
                    let d = crate::weights::ggml::half_at(blk, 208);
                    for (j, cj) in c.iter_mut().enumerate() {
                        *cj = crate::weights::ggml::q6k_code(blk, 32 * sub + j);
                    }
                    for h in 0..2 {
                        let sc = blk[192 + 2 * sub + h] as i8 as f32;
                        s[h] = d * sc;
                        o[h] = -32.0 * d * sc;
                    }
                }
                // Float rows never take the integer path.
                BlockType::F16 | BlockType::F32 => {}
            }
        }
        Linear::Regime(QMatrix::Int8 { q, scale, inp, .. }) => {
            let at = r * inp + 32 * b;
            for (cj, v) in c.iter_mut().zip(&q[at..at + 32]) {
                *cj = *v as u8;
            }
            signed = true;
            s = [scale[r]; 2];
        }
        Linear::Regime(QMatrix::Nf4 {
            packed,
            absmax,
            inp,
            ..
        }) => {
            let e0 = r * inp + 32 * b;
            let t = nf4_i8();
            for (j, cj) in c.iter_mut().enumerate() {
                let byte = packed[(e0 + j) / 2];
                let nib = if (e0 + j).is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 15
                };
                *cj = t[nib as usize] as u8;
            }
            signed = true;
            s = [absmax[e0 / NF4_BLOCK] / 127.0; 2];
        }
        Linear::Regime(QMatrix::Fp16 { .. }) => {}
    }
    Sub { c, signed, s, o }
}

/// Float row `r` of an F16 / F32 / FP16 matrix: its bytes (little-endian) and whether they are
/// f16. Loads from it are unaligned, so no cast is needed.
pub(crate) fn float_row(w: &Linear, r: usize) -> (&[u8], bool) {
    match w {
        Linear::Regime(QMatrix::Fp16 { w, inp, .. }) => {
            (bytemuck::cast_slice(&w[r * inp..(r + 1) * inp]), true)
        }
        Linear::Blocks(b) => (b.row(r), b.ty == BlockType::F16),
        Linear::Regime(_) => (&[], false),
    }
}

//! The weight regimes: FP16, INT8 (per-row scale) and NF4 (64-element blocks) — their formats and
//! safetensors and .npy files ([`quant`], [`io`]), the fused dequantise + GEMV on every backend
//! ([`gemv`]) — and GGUF blocks kept as stored ([`ggml`]), with the CPU decoding path's integer and
//! float products over all of them ([`cpu`]).

pub mod cpu;
pub mod gemv;
pub mod ggml;
pub mod io;
pub mod quant;

use crate::weights::quant::Format;

/// The weight regime of a real model: its GGUF blocks as stored, or re-stored in one of speckv's
/// formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Regime {
    Gguf,
    Fp16,
    Int8,
    Nf4,
}

impl Regime {
    pub const ALL: [Regime; 4] = [Regime::Gguf, Regime::Fp16, Regime::Int8, Regime::Nf4];

    pub fn name(self) -> &'static str {
        match self {
            Regime::Gguf => "gguf",
            Regime::Fp16 => "fp16",
            Regime::Int8 => "int8",
            Regime::Nf4 => "nf4",
        }
    }

    /// The speckv format, `None` for GGUF blocks.
    pub fn format(self) -> Option<Format> {
        match self {
            Regime::Gguf => None,
            Regime::Fp16 => Some(Format::Fp16),
            Regime::Int8 => Some(Format::Int8),
            Regime::Nf4 => Some(Format::Nf4),
        }
    }
}

impl From<Format> for Regime {
    fn from(f: Format) -> Regime {
        match f {
            Format::Fp16 => Regime::Fp16,
            Format::Int8 => Regime::Int8,
            Format::Nf4 => Regime::Nf4,
        }
    }
}

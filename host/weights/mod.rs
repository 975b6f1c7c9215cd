//! The weight regimes: FP16, INT8 (per-row scale) and NF4 (64-element blocks) — their formats and
//! safetensors and .npy files ([`quant`], [`io`]), the fused dequantise + GEMV on every backend ([`gemv`]), and the
//! regime comparison and measured step-cost models ([`regime`]).

pub mod gemv;
pub mod io;
pub mod quant;

//! The weight regimes: FP16, INT8 (per-row scale) and NF4 (64-element blocks) — their formats and
//! safetensors files ([`quant`]), the fused dequantise + GEMV on every backend ([`gemv`]), and the
//! regime comparison and measured step-cost models ([`regime`]).

pub mod gemv;
pub mod quant;
pub mod regime;

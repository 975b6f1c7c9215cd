//! The weight regimes: FP16, INT8 (per-row scale) and NF4 (64-element blocks) — their formats and
//! safetensors and .npy files ([`quant`], [`io`]), the fused dequantise + GEMV on every backend
//! ([`gemv`]) — and GGUF blocks kept as stored ([`ggml`]), with the CPU decoding path's integer and
//! float products over all of them ([`cpu`]).

pub mod cpu;
pub mod gemv;
pub mod ggml;
pub mod io;
pub mod quant;

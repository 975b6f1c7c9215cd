//! speckv: speculative decoding with an adaptive speculation length γ, built around GPU kernels
//! written in Rust (`speckv-kernels`, compiled to PTX by rustc's nvptx64 backend).
//!
//! Data flows logits → statistics → decision → verification, and the modules follow it:
//! - [`stats`]: validated logits and options, and the CPU twin of the `softmax_stats` kernel;
//! - [`controller`]: the γ decision (the 16-unit MLP, policies, the `gamma_mlp` kernel's host
//!   side) and its evaluation on step records;
//! - [`verify`]: batched lossless verification (inputs, outputs, the CPU twin of the kernel);
//! - [`weights`]: the FP16 / INT8 / NF4 weight regimes and their fused GEMV;
//! - [`model`] and [`decode`]: real GGUF models, plain and speculative decoding, traces;
//! - [`backend`]: where kernels run — the native CPU, CUDA (cudarc, the embedded [`ptx`]), the
//!   emulator of the CUDA execution model, or a caller's CUDA context;
//! - [`plan`]: the launch (entry point, grid, block, shared memory) of every kernel for a shape;
//! - [`measure`]: `speckv report`, `verify-sim`, overhead and step-cost measurements.

pub mod backend;
pub mod controller;
pub mod decode;
pub mod error;
pub mod measure;
pub mod model;
pub mod plan;
pub mod ptx;
pub mod stats;
pub mod verify;
pub mod weights;

pub use backend::{Backend, BackendKind};
pub use error::{Error, Result};
pub use speckv_kernels::params::{
    FeatureAccum, RowStats, StatsRow, GAMMA_EMPTY, GAMMA_FLAGGED_ROWS, GAMMA_NONFINITE,
    ROW_ALL_MASKED, ROW_BAD_INDEX, ROW_BAD_TEMPERATURE, ROW_NONFINITE, VERIFY_ALL_MASKED,
    VERIFY_BAD_DRAFT, VERIFY_BAD_GAMMA, VERIFY_BAD_TEMPERATURE, VERIFY_BAD_TOKEN, VERIFY_NONFINITE,
};
pub use speckv_kernels::philox;
pub use stats::{Accumulate, Dtype, Logits, LogitsData, StatsOptions};
pub use verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyStep};

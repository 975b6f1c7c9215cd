//! speckv: speculative decoding with an adaptive speculation length γ, built around GPU kernels
//! written in Rust (`speckv-kernels`, compiled to PTX by rustc's nvptx64 backend).
//!
//! Data flows logits → statistics → decision → verification. This crate holds the host side:
//! - [`logits`]: validated inputs and options;
//! - [`cpu`]: the native CPU backend (every feature works without a GPU);
//! - [`cuda`]: the CUDA backend (cudarc, dynamic loading, the embedded [`ptx`]);
//! - [`emulate`]: the kernels' own source run on the CPU emulator of the CUDA execution model;
//! - [`backend`]: selection between CPU and CUDA; [`report`]: `speckv report`.

pub mod backend;
pub mod calibrate;
pub mod controller;
pub mod cpu;
pub mod cuda;
pub mod decode;
pub mod emulate;
pub mod error;
pub mod evaluate;
pub mod external;
pub mod gemv;
pub mod logits;
pub mod mlp;
pub mod model;
pub mod overhead;
pub mod pair;
pub mod plot;
pub mod profile;
pub mod ptx;
pub mod quant;
pub mod records;
pub mod regime;
pub mod report;
pub mod sim;
pub mod simulate;
pub mod tokenizer;
pub mod verify;

pub use backend::{Backend, BackendKind};
pub use error::{Error, Result};
pub use logits::{Accumulate, Dtype, Logits, LogitsData, StatsOptions};
pub use speckv_kernels::params::{
    FeatureAccum, RowStats, ROW_ALL_MASKED, ROW_BAD_TEMPERATURE, ROW_NONFINITE, VERIFY_ALL_MASKED,
    VERIFY_BAD_GAMMA, VERIFY_BAD_TEMPERATURE, VERIFY_BAD_TOKEN, VERIFY_NONFINITE,
};
pub use speckv_kernels::philox;
pub use verify::{DraftDist, VerifyBatch, VerifyOutput};

//! Launches the kernels' own source on the CPU emulator of the CUDA execution model
//! ([`speckv_kernels::emu`]) with host buffers: the path `cargo test` uses to check every kernel
//! without a GPU. Slow by design (one coroutine per GPU thread); use the CPU backend for speed.
//!
//! Every launch runs with the sanitizer on (its buffers registered with their lengths and
//! directions), under several seeded schedules ([`emu::schedule_seeds`], `SPECKV_EMU_SCHEDULES`),
//! whose outputs must agree bit for bit; [`Emulator::math`] selects exact or GPU-approximate
//! `ex2` / `lg2` / `rcp`.

use speckv_kernels::emu::Math;
use speckv_kernels::params::{FeatureAccum, MlpWeights, RowStats};

use crate::controller::Controller;
use crate::error::Result;
use crate::stats::{Logits, StatsOptions};
use crate::verify::{VerifyBatch, VerifyOutput};
use crate::weights::quant::QMatrix;

mod controller;
mod forward;
mod gemv;
mod stats;
mod stats_v3;
mod stop;
mod verify;

pub use stats::{Decision, StatsV2Output};
pub use stop::Stop;

/// The emulator as a backend: a block size and a math mode for every launch.
#[derive(Clone, Copy, Debug)]
pub struct Emulator {
    pub block: u32,
    pub math: Math,
}

impl Emulator {
    /// `block` threads per block, exact math.
    pub fn new(block: u32) -> Emulator {
        Emulator {
            block,
            math: Math::Exact,
        }
    }

    /// `ex2` / `lg2` / `rcp` as the GPU's `.approx.ftz` instructions compute them.
    pub fn gpu_math(mut self, seed: u64) -> Emulator {
        self.math = Math::GpuApprox { seed };
        self
    }
}

/// Runs `softmax_stats` on the emulator with `block` threads per row (exact math).
pub fn softmax_stats(
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
    block: u32,
) -> Result<Vec<RowStats>> {
    Emulator::new(block).softmax_stats(logits, opts, accum)
}

/// Runs `verify` on the emulator with `block` threads per sequence (exact math).
pub fn verify(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify(v)
}

/// Runs `verify` with only the shapes validated (see [`Emulator::verify_unchecked_values`]).
pub fn verify_unchecked_values(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify_unchecked_values(v)
}

/// Runs `gamma_mlp` on the emulator (see [`Emulator::gamma_mlp`]).
pub fn gamma_mlp(
    controller: &Controller,
    weights: &MlpWeights,
    accum: &[FeatureAccum],
    compression_code: f32,
    fallback: i32,
    block: u32,
) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
    Emulator::new(block).gamma_mlp(controller, weights, accum, compression_code, fallback)
}

/// Runs the GEMV on the emulator with `block` threads per block (see [`Emulator::gemv`]).
pub fn gemv(w: &QMatrix, x: &[f32], m: usize, block: u32) -> Result<Vec<f32>> {
    Emulator::new(block).gemv(w, x, m)
}

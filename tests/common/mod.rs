//! Shared test helpers: seeded inputs and the CUDA backend when one is present.
#![allow(dead_code)]

use std::io::Write;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use speckv::backend::cuda::CudaBackend;

/// Seeded normal logits scaled by `scale`.
pub fn normal_logits(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            scale * z as f32
        })
        .collect()
}

/// Logits on a coarse grid (multiples of 1/4 in [−4, 4]): exact in f16 and bf16, so every dtype
/// sees the same values, sums are exact-ish, and the argmax has ties.
pub fn grid_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.gen_range(-16i32..=16) as f32 * 0.25)
        .collect()
}

/// The CUDA backend, or `None` (and a visible message) where this machine has no usable GPU.
/// The message goes straight to the process's stderr, past libtest's output capture, so a
/// skipped GPU test is visible in a normal `cargo test` run.
pub fn cuda() -> Option<&'static CudaBackend> {
    static CUDA: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let c = CUDA.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string()));
    match c {
        Ok(c) => Some(c),
        Err(e) => {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            let _ = writeln!(std::io::stderr(), "{name}: skipped: no CUDA device ({e})");
            None
        }
    }
}

/// |a − b| within `rel` relative or `abs` absolute.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    let d = (a - b).abs();
    d <= abs || d <= rel * b.abs().max(a.abs())
}

//! `speckv bench overhead`: what one γ decision costs, against the paper's 0.34 ms.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use speckv_kernels::params::FeatureAccum;

use crate::backend::Backend;
use crate::controller::mlp::{Mlp, HIDDEN, INPUTS};
use crate::controller::records::Compression;
use crate::controller::{Controller, PAPER_CANDIDATES};
use crate::error::Result;

/// The paper's measured decision time (MLP-16 on the host, per step).
pub const PAPER_MS: f64 = 0.336;

#[derive(Debug, Serialize)]
pub struct Overhead {
    pub backend: &'static str,
    pub device: String,
    pub model: String,
    pub candidates: Vec<u32>,
    /// One decision on the CPU: all candidate γ through the MLP, f64.
    pub cpu_us_per_decision: f64,
    pub cpu_decisions_timed: usize,
    /// One `gamma_mlp` launch for `gpu_batch` sequences (CUDA events), null without a GPU.
    pub gpu_us_per_batch: Option<f64>,
    pub gpu_batch: usize,
    pub paper_ms: f64,
}

/// Seeded random weights (decision time does not depend on the values).
pub fn random_mlp(seed: u64) -> Mlp {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Mlp {
        w1: [[0.0; HIDDEN]; INPUTS],
        b1: [0.0; HIDDEN],
        w2: [[0.0; 1]; HIDDEN],
        b2: [0.3],
        feature_mean: [0.0; INPUTS],
        feature_std: [1.0; INPUTS],
    };
    for row in m.w1.iter_mut() {
        for w in row.iter_mut() {
            *w = rng.gen_range(-1.0..1.0);
        }
    }
    for (b, w) in m.b1.iter_mut().zip(m.w2.iter_mut()) {
        *b = rng.gen_range(-0.5..0.5);
        w[0] = rng.gen_range(-0.3..0.3);
    }
    m
}

pub fn measure(backend: &Backend, model: Option<&std::path::Path>) -> Result<Overhead> {
    let (mlp, name) = match model {
        Some(p) => (Mlp::load(p)?, p.display().to_string()),
        None => (random_mlp(1), "seeded random weights".to_string()),
    };
    let c = Controller::new(mlp, &PAPER_CANDIDATES, None)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let feats: Vec<[f64; 4]> = (0..4096)
        .map(|_| {
            [
                rng.gen_range(0.0..4.0),
                rng.gen_range(0.0..1.0),
                rng.gen_range(0.0..6.0),
                rng.gen_range(0.0..1.0),
            ]
        })
        .collect();
    let comps = Compression::ALL;
    let mut sink = 0u32;
    for (i, f) in feats.iter().enumerate() {
        sink = sink.wrapping_add(c.decide(*f, comps[i % 3]).gamma);
    }
    let n = 400_000;
    let start = Instant::now();
    for i in 0..n {
        sink = sink.wrapping_add(c.decide(feats[i % feats.len()], comps[i % 3]).gamma);
    }
    let cpu_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    std::hint::black_box(sink);
    let gpu_batch = 256;
    let gpu_us = match backend {
        Backend::Cuda(cu) => {
            let dc = cu.upload_controller(&c)?;
            let accum: Vec<FeatureAccum> = (0..gpu_batch)
                .map(|i| FeatureAccum {
                    count: 4,
                    flags: 0,
                    entropy_sum: 4.0 * feats[i][0] as f32,
                    entropy_max: feats[i][2] as f32,
                    confidence_sum: 4.0 * feats[i][1] as f32,
                    confidence_min: feats[i][3] as f32,
                })
                .collect();
            Some(cu.time_gamma_mlp(&dc, &accum, 1000)?.as_secs_f64() * 1e6)
        }
        Backend::Cpu(_) => None,
    };
    Ok(Overhead {
        backend: backend.name(),
        device: backend.device(),
        model: name,
        candidates: PAPER_CANDIDATES.to_vec(),
        cpu_us_per_decision: cpu_us,
        cpu_decisions_timed: n,
        gpu_us_per_batch: gpu_us,
        gpu_batch,
        paper_ms: PAPER_MS,
    })
}

pub fn render(o: &Overhead) -> String {
    let mut s = format!(
        "γ decision overhead (candidates {:?}, {})\n",
        o.candidates, o.model
    );
    s.push_str(&format!(
        "  CPU: {:.3} µs per decision ({} timed) — {:.0}× faster than the paper's {} ms\n",
        o.cpu_us_per_decision,
        o.cpu_decisions_timed,
        o.paper_ms * 1e3 / o.cpu_us_per_decision,
        o.paper_ms
    ));
    match o.gpu_us_per_batch {
        Some(g) => s.push_str(&format!(
            "  GPU ({}): {:.2} µs per batch of {} sequences (gamma_mlp kernel)\n",
            o.device, g, o.gpu_batch
        )),
        None => s.push_str("  GPU: not measured (no CUDA device)\n"),
    }
    s
}

//! `speckv bench gpu`: every kernel, v1 and v2 (and the statistics' v3), timed on the device with a cold L2 (a buffer of
//! twice the L2 zeroed before every timed launch) and reported as a share of the device-to-device
//! copy bandwidth measured in the same run — the honest ceiling of a memory-bound kernel. The
//! PyTorch peers (eager statistics and verification, `torch.matmul` for the GEMV) run beside it
//! from `scripts/gpu_peers.py` in the gpu-check bundle; `scripts/gpu_summary.py` puts both in one
//! JSON with the goals.

use std::time::Duration;

use serde::Serialize;

use crate::backend::cuda::{CudaBackend, GemvVersion, KernelVersion};
use crate::controller::{Controller, CostModel, PAPER_CANDIDATES};
use crate::error::Result;
use crate::stats::{Logits, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch};
use crate::weights::quant::{Format, QMatrix};

/// One timed case.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub kernel: &'static str,
    pub version: u32,
    pub shape: String,
    /// Bytes the case must read (and write) at least: the logits, or the weights.
    pub bytes: u64,
    pub us: f64,
    pub gbps: f64,
    /// `gbps` over the copy bandwidth measured in the same run.
    pub share_of_copy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GpuBench {
    pub device: String,
    pub sm_count: u32,
    pub l2_bytes: usize,
    /// Device-to-device copy, read + write bytes per second over time, 1 GiB, cold L2.
    pub copy_gbps: f64,
    pub timing: &'static str,
    pub cases: Vec<Case>,
    /// Microseconds the fused γ decision adds to a `softmax_stats_v2` launch (64 rows × 128256).
    pub fused_decision_us: f64,
}

fn f16_logits(n: usize, seed: u64) -> Vec<half::f16> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| half::f16::from_f32(rng.gen_range(-8.0..8.0)))
        .collect()
}

/// Runs every case; `quick` uses fewer iterations and shapes.
pub fn run(cuda: &CudaBackend, quick: bool) -> Result<GpuBench> {
    let iters = if quick { 5 } else { 20 };
    // Progress on stderr, one line per case, so a run cut short by a time limit still says how far
    // it got and what each case took.
    let t0 = std::time::Instant::now();
    let copy_gbps = cuda.copy_bandwidth(1 << 30, iters)? / 1e9;
    eprintln!(
        "[{:6.1} s] copy {copy_gbps:.0} GB/s",
        t0.elapsed().as_secs_f64()
    );
    let mut cases = Vec::new();
    let mut push = |kernel, version, shape: String, bytes: u64, t: Duration| {
        let us = t.as_secs_f64() * 1e6;
        let gbps = bytes as f64 / t.as_secs_f64() / 1e9;
        eprintln!(
            "[{:6.1} s] {kernel} v{version} {shape}: {us:.2} µs, {gbps:.0} GB/s",
            t0.elapsed().as_secs_f64()
        );
        cases.push(Case {
            kernel,
            version,
            shape,
            bytes,
            us,
            gbps,
            share_of_copy: gbps / copy_gbps,
        });
    };
    const V: usize = 128_256;
    // softmax_stats: batch 1 and 64, greedy statistics and sampling.
    for rows in [1usize, 64] {
        let x = f16_logits(rows * V, rows as u64);
        let l = Logits::dense(LogitsData::F16(&x), V)?;
        for sample in [false, true] {
            let opts = StatsOptions {
                temperature: 1.0,
                sample,
                seed: 7,
                step: 0,
                ..Default::default()
            };
            for (v, version) in [(1, KernelVersion::V1), (2, KernelVersion::V2)] {
                let t = cuda.time_softmax_stats(&l, &opts, iters, version)?;
                push(
                    "softmax_stats",
                    v,
                    format!("{rows}x{V} f16{}", if sample { " sample" } else { "" }),
                    (rows * V * 2) as u64,
                    t,
                );
            }
        }
    }
    // Batched decoding's row statistics at the Qwen pair's vocabulary, on f32 rows as the forward
    // pass leaves them, each row its own seed and accumulator: v2 one launch per row (as before
    // v3) against v3's one launch.
    const QV: usize = 151_936;
    for b in [4usize, 16] {
        let x: Vec<f32> = f16_logits(b * QV, 300 + b as u64)
            .iter()
            .map(|h| h.to_f32())
            .collect();
        let l = Logits::dense(LogitsData::F32(&x), QV)?;
        let rows: Vec<usize> = (0..b).collect();
        let opts: Vec<StatsOptions> = (0..b)
            .map(|k| StatsOptions {
                temperature: 0.8,
                sample: true,
                seed: k as u64,
                step: 1,
                accumulate: crate::stats::Accumulate::Add,
            })
            .collect();
        for (v, one_launch) in [(2, false), (3, true)] {
            let t = cuda.time_rows_stats(&l, &rows, &opts, iters, one_launch)?;
            push(
                "rows_stats",
                v,
                format!("{b}x{QV} f32 sample"),
                (b * QV * 4) as u64,
                t,
            );
        }
    }
    // verify: draft = target (everything accepted: the most a step reads), stochastic, γ = 4.
    for batch in if quick {
        vec![1usize, 64]
    } else {
        vec![1usize, 8, 64]
    } {
        let g = 4usize;
        let target = f16_logits(batch * (g + 1) * V, 100 + batch as u64);
        let mut draft = Vec::with_capacity(batch * g * V);
        for b in 0..batch {
            for i in 0..g {
                let at = (b * (g + 1) + i) * V;
                draft.extend_from_slice(&target[at..at + V]);
            }
        }
        let tokens = vec![3i32; batch * g];
        let gammas = vec![g as i32; batch];
        let temps = vec![1.0f32; batch];
        let vb = VerifyBatch {
            target: LogitsData::F16(&target),
            target_stride: V,
            draft: DraftDist::Logits {
                data: LogitsData::F16(&draft),
                temperature: &temps,
            },
            draft_stride: V,
            draft_tokens: &tokens,
            gammas: &gammas,
            target_temperature: &temps,
            batch,
            gamma_max: g,
            vocab: V,
            seed: 1,
            step: 0,
        };
        let bytes = vb.bytes_read_all_accepted() as u64;
        for (v, version) in [(1, KernelVersion::V1), (2, KernelVersion::V2)] {
            let t = cuda.time_verify(&vb, iters, version)?;
            push("verify", v, format!("B{batch} γ{g} V{V} f16"), bytes, t);
        }
    }
    // GEMV: decode (M = 1) and verification batches (M = 5, 16) on model-shaped matrices.
    let shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096), (1536, 8960)]
    } else {
        &[
            (4096, 4096),
            (14336, 4096),
            (4096, 14336),
            (1536, 8960),
            (8960, 1536),
        ]
    };
    for &(out, inp) in shapes {
        let w: Vec<f32> = {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64((out * 31 + inp) as u64);
            (0..out * inp).map(|_| rng.gen_range(-0.05..0.05)).collect()
        };
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false)?;
            let d = cuda.upload_matrix(&q)?;
            for m in [1usize, 5, 16] {
                for (v, version) in [
                    (1, GemvVersion::V1),
                    (2, GemvVersion::V2),
                    (3, GemvVersion::V3),
                    (4, GemvVersion::V4),
                ] {
                    // v3 differs from v2 only at M = 1 (its streaming kernel), v4 from v3 only
                    // for INT8 and NF4 at M = 1 (integer dot products).
                    if (v >= 3 && m != 1) || (v == 4 && format == Format::Fp16) {
                        continue;
                    }
                    let t = cuda.time_gemv(&d, m, iters, version)?;
                    push(
                        "gemv",
                        v,
                        format!("{} {out}x{inp} M{m}", format.name()),
                        d.bytes() as u64,
                        t,
                    );
                }
            }
        }
    }
    // The fused γ decision: softmax_stats_v2 with and without it.
    let x = f16_logits(64 * V, 9);
    let l = Logits::dense(LogitsData::F16(&x), V)?;
    let ctl = Controller::new(
        crate::measure::overhead::random_mlp(1),
        &PAPER_CANDIDATES,
        Some(CostModel::assumed()),
    )?;
    let dc = cuda.upload_controller(&ctl)?;
    let with = cuda.time_stats_decide(&dc, &l, iters, true)?;
    let without = cuda.time_stats_decide(&dc, &l, iters, false)?;
    eprintln!("[{:6.1} s] fused decision done", t0.elapsed().as_secs_f64());
    Ok(GpuBench {
        device: cuda.device_name().to_string(),
        sm_count: cuda.sm_count(),
        l2_bytes: cuda.l2_bytes()?,
        copy_gbps,
        timing: "CUDA events around each launch; a buffer of twice the L2 zeroed before every timed launch",
        cases,
        fused_decision_us: (with.as_secs_f64() - without.as_secs_f64()) * 1e6,
    })
}

/// The report as text.
pub fn render(r: &GpuBench) -> String {
    let mut s = format!(
        "{} ({} SMs, L2 {} MB); device copy {:.0} GB/s (cold L2)\n{}\n\n{:<14} {:>2} {:<26} {:>10} {:>9} {:>8}\n",
        r.device,
        r.sm_count,
        r.l2_bytes >> 20,
        r.copy_gbps,
        r.timing,
        "kernel",
        "v",
        "shape",
        "µs",
        "GB/s",
        "of copy"
    );
    for c in &r.cases {
        s.push_str(&format!(
            "{:<14} {:>2} {:<26} {:>10.2} {:>9.0} {:>7.0}%\n",
            c.kernel,
            c.version,
            c.shape,
            c.us,
            c.gbps,
            100.0 * c.share_of_copy
        ));
    }
    s.push_str(&format!(
        "\nfused γ decision adds {:.2} µs to softmax_stats_v2 (64 × 128256)\n",
        r.fused_decision_us
    ));
    s
}

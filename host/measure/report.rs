//! `speckv report`: what this build and machine are, and the statistics kernel's throughput on
//! the current backend. Later capabilities add their sections.

use std::time::Duration;

use half::f16;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::Result;
use crate::philox;
use crate::ptx;
use crate::stats::{Dtype, Logits, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch};

/// Every kernel's CUDA tests (CUDA v1 and v2 against the CPU reference on the same inputs) passed on
/// an NVIDIA H200 (`scripts/gpu-check`, `results/gpu/tests.json`).
pub const VALIDATED_ON_GPU: bool = true;

#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: &'static str,
    pub device: String,
    pub ptx_archs: Vec<&'static str>,
    pub ptx_toolchain: &'static str,
    pub ptx_build_error: Option<&'static str>,
    pub kernels: Kernels,
    /// Per weight regime: GEMV throughput and the estimated verification step of a
    /// Llama-3-8B-shaped target (see `regime`).
    pub regimes: Vec<crate::measure::regime::RegimeRow>,
    /// The CPU γ decision (µs), its share of each regime's step is in `regimes`; the paper's is 0.336 ms.
    pub decision_us: f64,
    pub paper_decision_ms: f64,
    pub quantization_error: crate::measure::regime::QuantError,
}

#[derive(Debug, Serialize)]
pub struct Kernels {
    pub softmax_stats: StatsReport,
    pub verify: VerifyReport,
}

/// Verification throughput on one case: f16, all drafted tokens accepted (p = q), the most the
/// kernel reads.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub gbps: f64,
    pub batch: usize,
    pub gamma: usize,
    pub vocab: usize,
    pub us_per_call: f64,
    pub validated_on_gpu: bool,
}

#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// GB/s of logits read, for the headline case (f16, 64 × 128256).
    pub gbps: f64,
    pub dtype: Dtype,
    pub rows: usize,
    pub vocab: usize,
    pub us_per_call: f64,
    pub cases: Vec<StatsCase>,
    /// Device-to-device copy bandwidth measured in the same run (CUDA only).
    pub copy_gbps: Option<f64>,
    pub fraction_of_copy: Option<f64>,
    pub validated_on_gpu: bool,
}

#[derive(Debug, Serialize)]
pub struct StatsCase {
    pub dtype: Dtype,
    pub rows: usize,
    pub vocab: usize,
    pub gbps: f64,
    pub us_per_call: f64,
}

/// Deterministic synthetic logits: a sum of three Philox uniforms (a bell on [−6, 6]) with one
/// peaked token per row, so entropy and confidence are neither trivial nor degenerate.
pub fn synthetic_logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        for i in 0..vocab {
            let e = i as u32;
            let a = philox::uniform_open(philox::bits(seed, e, r as u32, 0));
            let b = philox::uniform_open(philox::bits(seed, e, r as u32, 1));
            let c = philox::uniform_open(philox::bits(seed, e, r as u32, 2));
            v.push((a + b + c - 1.5) * 4.0);
        }
        let peak = (philox::bits(seed, 0, r as u32, 3) as usize) % vocab;
        v[r * vocab + peak] = 14.0;
    }
    v
}

/// Measures and assembles the report on `backend`, spending about `budget` per case.
pub fn build(backend: &Backend, budget: Duration) -> Result<Report> {
    let vocab = 128_256;
    let rows_cases = [1usize, 64];
    let mut cases = Vec::new();
    let opts = StatsOptions::default();
    let base = synthetic_logits(*rows_cases.iter().max().unwrap_or(&1), vocab, 7);
    let base16: Vec<f16> = base.iter().map(|&x| f16::from_f32(x)).collect();
    for &rows in &rows_cases {
        for dtype in [Dtype::F16, Dtype::F32] {
            let n = rows * vocab;
            let data = match dtype {
                Dtype::F16 => LogitsData::F16(&base16[..n]),
                _ => LogitsData::F32(&base[..n]),
            };
            let logits = Logits::dense(data, vocab)?;
            let t = backend.time_softmax_stats(&logits, &opts, budget)?;
            cases.push(StatsCase {
                dtype,
                rows,
                vocab,
                gbps: logits.bytes_read() as f64 / t.as_secs_f64() / 1e9,
                us_per_call: t.as_secs_f64() * 1e6,
            });
        }
    }
    let head = cases
        .iter()
        .find(|c| c.dtype == Dtype::F16 && c.rows == 64)
        .expect("the headline case is measured above");
    let verify = measure_verify(backend, budget)?;
    let copy_gbps = match backend {
        Backend::Cuda(c) => Some(c.copy_bandwidth(256 << 20, 20)? / 1e9),
        Backend::Cpu(_) => None,
    };
    let decision_us = crate::measure::overhead::measure(backend, None)?.cpu_us_per_decision;
    let regimes = crate::measure::regime::regimes(backend, decision_us, budget / 5)?;
    Ok(Report {
        regimes,
        decision_us,
        paper_decision_ms: crate::measure::overhead::PAPER_MS,
        quantization_error: crate::measure::regime::quant_error()?,
        backend: backend.name(),
        device: backend.device(),
        ptx_archs: ptx::built_archs(),
        ptx_toolchain: ptx::PTX_TOOLCHAIN,
        ptx_build_error: ptx::PTX_BUILD_ERROR,
        kernels: Kernels {
            softmax_stats: StatsReport {
                gbps: head.gbps,
                dtype: head.dtype,
                rows: head.rows,
                vocab: head.vocab,
                us_per_call: head.us_per_call,
                fraction_of_copy: copy_gbps.map(|c| head.gbps / c),
                copy_gbps,
                cases,
                validated_on_gpu: VALIDATED_ON_GPU,
            },
            verify,
        },
    })
}

fn measure_verify(backend: &Backend, budget: Duration) -> Result<VerifyReport> {
    let (batch, gamma, vocab) = (8usize, 4usize, 128_256usize);
    let base = synthetic_logits(batch * (gamma + 1), vocab, 11);
    let target: Vec<f16> = base.iter().map(|&x| f16::from_f32(x)).collect();
    let mut draft = Vec::with_capacity(batch * gamma * vocab);
    for b in 0..batch {
        draft
            .extend_from_slice(&target[b * (gamma + 1) * vocab..(b * (gamma + 1) + gamma) * vocab]);
    }
    let tokens: Vec<i32> = (0..batch * gamma)
        .map(|i| (i * 7919 % vocab) as i32)
        .collect();
    let gammas = vec![gamma as i32; batch];
    let temps = vec![1.0f32; batch];
    let v = VerifyBatch {
        target: LogitsData::F16(&target),
        target_stride: vocab,
        draft: DraftDist::Logits {
            data: LogitsData::F16(&draft),
            temperature: &temps,
        },
        draft_stride: vocab,
        draft_tokens: &tokens,
        gammas: &gammas,
        target_temperature: &temps,
        batch,
        gamma_max: gamma,
        vocab,
        seed: 1,
        step: 0,
    };
    let t = backend.time_verify(&v, budget)?;
    Ok(VerifyReport {
        gbps: v.bytes_read_all_accepted() as f64 / t.as_secs_f64() / 1e9,
        batch,
        gamma,
        vocab,
        us_per_call: t.as_secs_f64() * 1e6,
        validated_on_gpu: VALIDATED_ON_GPU,
    })
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("backend     {}\n", r.backend));
    s.push_str(&format!("device      {}\n", r.device));
    let archs = if r.ptx_archs.is_empty() {
        "none".to_string()
    } else {
        r.ptx_archs.join(", ")
    };
    s.push_str(&format!(
        "ptx         {archs} ({})\n",
        if r.ptx_toolchain.is_empty() {
            "-"
        } else {
            r.ptx_toolchain
        }
    ));
    if let Some(e) = r.ptx_build_error {
        s.push_str(&format!("ptx error   {e}\n"));
    }
    let st = &r.kernels.softmax_stats;
    s.push_str("\nsoftmax_stats (one read: max, log-sum-exp, entropy, confidence, argmax)\n");
    s.push_str("  dtype  rows   vocab     µs/call     GB/s\n");
    for c in &st.cases {
        s.push_str(&format!(
            "  {:<5} {:>5} {:>7} {:>11.1} {:>8.2}\n",
            c.dtype.name(),
            c.rows,
            c.vocab,
            c.us_per_call,
            c.gbps
        ));
    }
    if let (Some(copy), Some(f)) = (st.copy_gbps, st.fraction_of_copy) {
        s.push_str(&format!(
            "  device copy bandwidth {copy:.1} GB/s; headline case at {:.0} % of it\n",
            f * 100.0
        ));
    }
    if !st.validated_on_gpu {
        s.push_str("  (the CUDA kernel is validated on the CPU emulator and by ptxas only)\n");
    }
    let v = &r.kernels.verify;
    s.push_str(&format!(
        "\nverify (batch {}, γ {}, vocab {}, f16, all accepted)\n  {:.1} µs/call, {:.2} GB/s read\n",
        v.batch, v.gamma, v.vocab, v.us_per_call, v.gbps
    ));
    if !v.validated_on_gpu {
        s.push_str("  (the CUDA kernel is validated on the CPU emulator and by ptxas only)\n");
    }
    s.push_str("\nweight regimes (Llama-3-8B-shaped target: 32 layers of q,o 4096×4096, k,v 1024×4096, gate,up 14336×4096, down 4096×14336)\n");
    s.push_str("  regime        bits/w  GEMV GB/s (14336×4096, M=1)  decode ms (M=1)  verify step ms (γ=4, M=5)  decision share\n");
    for g in &r.regimes {
        s.push_str(&format!(
            "  {:<12} {:>6.2} {:>29.2} {:>16.1} {:>26.1} {:>13.1e}%\n",
            g.name,
            g.bits_per_weight,
            g.gemv_gbps,
            g.decode_ms,
            g.step_ms,
            100.0 * g.decision_share
        ));
    }
    s.push_str(&format!(
        "  γ decision: {:.3} µs on the CPU (paper: {} ms, < 0.5 % of its step)\n",
        r.decision_us, r.paper_decision_ms
    ));
    let q = &r.quantization_error;
    s.push_str(&format!(
        "\nquantisation error (relative RMS, {}×{} weights)\n",
        q.shape[0], q.shape[1]
    ));
    for (name, rows) in [("gaussian", &q.gaussian), ("student-t ν=3", &q.student_t3)] {
        let cells: Vec<String> = rows
            .iter()
            .map(|(f, e)| format!("{} {:.2e}", f.name(), e))
            .collect();
        s.push_str(&format!("  {name:<14} {}\n", cells.join("   ")));
    }
    s
}

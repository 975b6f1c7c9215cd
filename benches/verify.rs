//! criterion bench of batched verification: B ∈ {1, 8, 64, 256} × γ ∈ {2, 4, 8}, V = 128256, f16
//! logits, stochastic mode with draft = target (p = q: every token is accepted, so the kernel reads
//! the most it ever reads — γ target and γ draft rows plus the bonus row per sequence). Throughput in
//! bytes read per second. After criterion, the same cases side by side with a vectorised reference of
//! the same algorithm in the environment's framework, measured in the same run: numpy on the CPU
//! (cases up to 300 MB of logits), PyTorch on a GPU machine, and the device's copy bandwidth.
//!
//! `SPECKV_BENCH_QUICK=1` runs B ∈ {8, 64} × γ = 4 only.

mod common;

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::{Rng, SeedableRng};
use speckv::backend::cpu::CpuBackend;
use speckv::backend::cuda::CudaBackend;
use speckv::{Backend, DraftDist, LogitsData, VerifyBatch};

const VOCAB: usize = 128_256;

struct Case {
    batch: usize,
    gamma: usize,
}

fn cases() -> Vec<Case> {
    let quick = std::env::var("SPECKV_BENCH_QUICK")
        .map(|v| v == "1")
        .unwrap_or(false);
    let (bs, gs): (&[usize], &[usize]) = if quick {
        (&[8, 64], &[4])
    } else {
        (&[1, 8, 64, 256], &[2, 4, 8])
    };
    bs.iter()
        .flat_map(|&batch| gs.iter().map(move |&gamma| Case { batch, gamma }))
        .collect()
}

/// Inputs of one case: target logits, draft logits (= target rows 0..γ), tokens, γ, temperatures.
struct Data {
    target: Vec<f16>,
    draft: Vec<f16>,
    tokens: Vec<i32>,
    gammas: Vec<i32>,
    t_temp: Vec<f32>,
    d_temp: Vec<f32>,
}

fn data(c: &Case) -> Data {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(c.batch as u64 * 31 + c.gamma as u64);
    let (b, g, v) = (c.batch, c.gamma, VOCAB);
    let target: Vec<f16> = (0..b * (g + 1) * v)
        .map(|_| f16::from_f32(rng.gen_range(-6.0f32..6.0)))
        .collect();
    let mut draft = Vec::with_capacity(b * g * v);
    for s in 0..b {
        draft.extend_from_slice(&target[s * (g + 1) * v..(s * (g + 1) + g) * v]);
    }
    let tokens = (0..b * g).map(|_| rng.gen_range(0..v as i32)).collect();
    Data {
        target,
        draft,
        tokens,
        gammas: vec![g as i32; b],
        t_temp: vec![1.0; b],
        d_temp: vec![1.0; b],
    }
}

fn batch<'a>(c: &Case, d: &'a Data) -> VerifyBatch<'a> {
    VerifyBatch {
        target: LogitsData::F16(&d.target),
        target_stride: VOCAB,
        draft: DraftDist::Logits {
            data: LogitsData::F16(&d.draft),
            temperature: &d.d_temp,
        },
        draft_stride: VOCAB,
        draft_tokens: &d.tokens,
        gammas: &d.gammas,
        target_temperature: &d.t_temp,
        batch: c.batch,
        gamma_max: c.gamma,
        vocab: VOCAB,
        seed: 1,
        step: 0,
    }
}

fn name(c: &Case) -> String {
    format!("B{}/g{}", c.batch, c.gamma)
}

fn bench(cr: &mut Criterion) {
    let cpu = CpuBackend::new();
    let cuda = CudaBackend::new(0).ok();
    let mut g = cr.benchmark_group("verify");
    for c in cases() {
        let d = data(&c);
        let v = batch(&c, &d);
        g.throughput(Throughput::Bytes(v.bytes_read_all_accepted() as u64));
        g.bench_function(BenchmarkId::new("cpu", name(&c)), |b| {
            b.iter(|| cpu.verify(&v).expect("valid"))
        });
        if let Some(cu) = &cuda {
            for (label, version) in [
                ("cuda_v1", speckv::backend::cuda::KernelVersion::V1),
                ("cuda_v2", speckv::backend::cuda::KernelVersion::V2),
            ] {
                g.bench_function(BenchmarkId::new(label, name(&c)), |b| {
                    b.iter_custom(|iters| {
                        cu.time_verify(&v, iters as u32, version).expect("launch") * iters as u32
                    })
                });
            }
        }
    }
    g.finish();
}

/// Writes the case for the Python peers.
fn write_case(dir: &Path, c: &Case, d: &Data) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (b, g, v) = (c.batch, c.gamma, VOCAB);
    common::write_npy(
        &dir.join("target.npy"),
        "<f2",
        &[b, g + 1, v],
        bytemuck::cast_slice(&d.target),
    )?;
    common::write_npy(
        &dir.join("draft.npy"),
        "<f2",
        &[b, g, v],
        bytemuck::cast_slice(&d.draft),
    )?;
    common::write_npy(
        &dir.join("tokens.npy"),
        "<i4",
        &[b, g],
        bytemuck::cast_slice(&d.tokens),
    )?;
    common::write_npy(
        &dir.join("gammas.npy"),
        "<i4",
        &[b],
        bytemuck::cast_slice(&d.gammas),
    )
}

fn peers() {
    let budget = Duration::from_millis(400);
    let dir = common::root().join("target/bench/verify-case");
    let numpy = common::venv_python();
    let torch = common::torch_python();
    let cuda = CudaBackend::new(0).ok().map(|c| Backend::Cuda(Box::new(c)));
    let cpu = Backend::Cpu(CpuBackend::new());
    let copy = match &cuda {
        Some(Backend::Cuda(c)) => c.copy_bandwidth(512 << 20, 20).ok(),
        _ => None,
    };
    println!("\nverify, V = {VOCAB}, f16, all accepted (p = q); bytes read per second; peers in the same run");
    println!(
        "{:<10} {:>9} {:>11} {:>11} {:>8} {:>11} {:>11} {:>9} {:>9}",
        "case",
        "MB read",
        "cpu GB/s",
        "numpy GB/s",
        "×numpy",
        "cuda GB/s",
        "torch GB/s",
        "×torch",
        "% copy"
    );
    let mut json = Vec::new();
    for c in cases() {
        let d = data(&c);
        let v = batch(&c, &d);
        let bytes = v.bytes_read_all_accepted() as f64;
        let t_cpu = cpu.time_verify(&v, budget).expect("valid").as_secs_f64();
        let small = bytes <= 300e6;
        let wrote = (numpy.is_some() && small) || torch.is_some();
        if wrote {
            write_case(&dir, &c, &d).expect("write case files");
        }
        let np = match (&numpy, small) {
            (Some(py), true) => common::peer_seconds(
                py,
                "numpy_verify.py",
                &[dir.to_str().unwrap_or(""), "0.4", "numpy"],
            ),
            _ => None,
        };
        let t_cuda = cuda
            .as_ref()
            .map(|b| b.time_verify(&v, budget).expect("launch").as_secs_f64());
        let th = torch.as_ref().and_then(|py| {
            common::peer_seconds(
                py,
                "numpy_verify.py",
                &[dir.to_str().unwrap_or(""), "0.4", "torch"],
            )
        });
        let f = |x: Option<f64>| {
            x.map(|s| format!("{:.2}", bytes / s / 1e9))
                .unwrap_or_else(|| "-".into())
        };
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.1}×", a / b),
            _ => "-".into(),
        };
        let pct = match (t_cuda, copy) {
            (Some(t), Some(cp)) => format!("{:.0}%", 100.0 * bytes / t / cp),
            _ => "-".into(),
        };
        println!(
            "{:<10} {:>9.1} {:>11} {:>11} {:>8} {:>11} {:>11} {:>9} {:>9}",
            name(&c),
            bytes / 1e6,
            f(Some(t_cpu)),
            f(np),
            r(np, Some(t_cpu)),
            f(t_cuda),
            f(th),
            r(th, t_cuda),
            pct
        );
        json.push(serde_json::json!({
            "case": name(&c), "batch": c.batch, "gamma": c.gamma, "vocab": VOCAB, "bytes": bytes,
            "cpu_seconds": t_cpu, "numpy_seconds": np, "cuda_seconds": t_cuda, "torch_seconds": th,
            "copy_bytes_per_second": copy,
        }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    common::write_json("verify", &json);
}

fn config() -> Criterion {
    common::criterion_config(200)
}

criterion_group! { name = benches; config = config(); targets = bench }

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    peers();
}

//! criterion bench of `softmax_stats`: rows 1, 8, 64, 256 × vocab 32000, 128256 × f16, f32, on the
//! CPU backend always and the CUDA backend when a device is present, in bytes of logits read per
//! second. After criterion, the same cases side by side with their peers measured in the same run:
//! the usual multi-pass numpy computation on the CPU (numpy from the project's venv,
//! `scripts/venv`), and the device's copy bandwidth on a GPU. Ratios are printed and written to
//! `target/bench/softmax_stats.json`.
//!
//! `SPECKV_BENCH_QUICK=1` runs only rows 64 × vocab 128256 (used by scripts/gpu-check).

use std::path::Path;
use std::time::Duration;

mod common;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use speckv::backend::cpu::CpuBackend;
use speckv::backend::cuda::CudaBackend;
use speckv::{Backend, Dtype, Logits, LogitsData, StatsOptions};

struct Case {
    rows: usize,
    vocab: usize,
    dtype: Dtype,
}

fn cases() -> Vec<Case> {
    let quick = std::env::var("SPECKV_BENCH_QUICK")
        .map(|v| v == "1")
        .unwrap_or(false);
    let mut v = Vec::new();
    let rows: &[usize] = if quick { &[64] } else { &[1, 8, 64, 256] };
    let vocabs: &[usize] = if quick {
        &[128_256]
    } else {
        &[32_000, 128_256]
    };
    for &vocab in vocabs {
        for &rows in rows {
            for dtype in [Dtype::F16, Dtype::F32] {
                v.push(Case { rows, vocab, dtype });
            }
        }
    }
    v
}

struct Data {
    f32s: Vec<f32>,
    f16s: Vec<f16>,
}

fn data(n: usize) -> Data {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let f32s: Vec<f32> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            3.0 * z as f32
        })
        .collect();
    let f16s = f32s.iter().map(|&x| f16::from_f32(x)).collect();
    Data { f32s, f16s }
}

fn logits<'a>(d: &'a Data, c: &Case) -> Logits<'a> {
    let n = c.rows * c.vocab;
    let data = match c.dtype {
        Dtype::F16 => LogitsData::F16(&d.f16s[..n]),
        _ => LogitsData::F32(&d.f32s[..n]),
    };
    Logits::dense(data, c.vocab).expect("bench shapes are valid")
}

fn name(c: &Case) -> String {
    format!("{}x{}/{}", c.rows, c.vocab, c.dtype.name())
}

fn bench(cr: &mut Criterion) {
    let cs = cases();
    let max_n = cs.iter().map(|c| c.rows * c.vocab).max().unwrap_or(0);
    let d = data(max_n);
    let opts = StatsOptions::default();
    let cpu = CpuBackend::new();
    let mut g = cr.benchmark_group("softmax_stats/cpu");
    for c in &cs {
        let l = logits(&d, c);
        g.throughput(Throughput::Bytes(l.bytes_read() as u64));
        g.bench_function(BenchmarkId::from_parameter(name(c)), |b| {
            b.iter(|| cpu.softmax_stats(&l, &opts, None).expect("valid input"))
        });
    }
    g.finish();
    if let Some(cuda) = cuda_backend() {
        let mut g = cr.benchmark_group("softmax_stats/cuda");
        // Ids are v1/<case> and v2/<case>.
        for c in &cs {
            let l = logits(&d, c);
            g.throughput(Throughput::Bytes(l.bytes_read() as u64));
            for (v, version) in VERSIONS {
                g.bench_function(BenchmarkId::new(v, name(c)), |b| {
                    b.iter_custom(|iters| {
                        cuda.time_softmax_stats(&l, &opts, iters as u32, version)
                            .expect("launch")
                            * iters as u32
                    })
                });
            }
        }
        g.finish();
    }
}

fn cuda_backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("softmax_stats bench: CUDA skipped ({e})");
            None
        }
    }
}

fn numpy_seconds(python: &Path, l: &Logits<'_>, dir: &Path) -> Option<f64> {
    let file = dir.join("logits.npy");
    let descr = if l.dtype() == Dtype::F16 {
        "<f2"
    } else {
        "<f4"
    };
    common::write_npy(
        &file,
        descr,
        &[l.rows(), l.vocab()],
        &l.data().bytes()[..l.bytes_read()],
    )
    .ok()?;
    common::peer_seconds(
        python,
        "numpy_softmax_stats.py",
        &[file.to_str()?, "1.0", "0.5"],
    )
}

/// Our time and the peers', same data, same run.
fn peers() {
    let cs = cases();
    let max_n = cs.iter().map(|c| c.rows * c.vocab).max().unwrap_or(0);
    let d = data(max_n);
    let opts = StatsOptions::default();
    let budget = Duration::from_millis(500);
    let dir = common::root().join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let mut json = Vec::new();

    let cpu = Backend::Cpu(CpuBackend::new());
    let python = common::venv_python();
    println!(
        "\nsoftmax_stats on the CPU ({}) vs multi-pass numpy, same data, same run",
        cpu.device()
    );
    println!(
        "{:<22} {:>12} {:>12} {:>10}",
        "case", "speckv GB/s", "numpy GB/s", "speedup"
    );
    for c in &cs {
        let l = logits(&d, c);
        let ours = cpu
            .time_softmax_stats(&l, &opts, budget)
            .expect("valid input")
            .as_secs_f64();
        let gb = l.bytes_read() as f64 / 1e9;
        let np = python.as_ref().and_then(|p| numpy_seconds(p, &l, &dir));
        match np {
            Some(np) => println!(
                "{:<22} {:>12.2} {:>12.2} {:>9.1}×",
                name(c),
                gb / ours,
                gb / np,
                np / ours
            ),
            None => println!(
                "{:<22} {:>12.2} {:>12} {:>10}",
                name(c),
                gb / ours,
                "-",
                "-"
            ),
        }
        json.push(serde_json::json!({
            "backend": "cpu", "case": name(c), "rows": c.rows, "vocab": c.vocab, "dtype": c.dtype,
            "seconds": ours, "gbps": gb / ours, "numpy_seconds": np, "speedup_vs_numpy": np.map(|n| n / ours),
        }));
    }
    let _ = std::fs::remove_file(dir.join("logits.npy"));

    if let Some(cuda) = cuda_backend() {
        let copy = cuda.copy_bandwidth(512 << 20, 20).expect("device copy");
        println!(
            "\nsoftmax_stats on {} vs its measured device-to-device copy bandwidth {:.1} GB/s",
            cuda.device_name(),
            copy / 1e9
        );
        println!("{:<22} {:>12} {:>14}", "case", "speckv GB/s", "% of copy");
        let cuda = Backend::Cuda(Box::new(cuda));
        for c in &cs {
            let l = logits(&d, c);
            let t = cuda
                .time_softmax_stats(&l, &opts, budget)
                .expect("launch")
                .as_secs_f64();
            let gbps = l.bytes_read() as f64 / t;
            println!(
                "{:<22} {:>12.1} {:>13.1}%",
                name(c),
                gbps / 1e9,
                100.0 * gbps / copy
            );
            json.push(serde_json::json!({
                "backend": "cuda", "case": name(c), "rows": c.rows, "vocab": c.vocab, "dtype": c.dtype,
                "seconds": t, "gbps": gbps / 1e9, "copy_gbps": copy / 1e9, "fraction_of_copy": gbps / copy,
            }));
        }
    }
    common::write_json("softmax_stats", &json);
}

fn config() -> Criterion {
    common::criterion_config(300)
}

criterion_group! { name = benches; config = config(); targets = bench }

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    peers();
}

/// Both versions on the device: v1 (the oracle, one block per row) beside v2.
const VERSIONS: [(&str, speckv::backend::cuda::KernelVersion); 2] = [
    ("v1", speckv::backend::cuda::KernelVersion::V1),
    ("v2", speckv::backend::cuda::KernelVersion::V2),
];

//! criterion bench of the fused dequantise-GEMV per weight regime on model-shaped layers
//! (4096×4096, 4096×14336, 14336×4096, 8192×28672 as out × in) at M = 1, 5, 9, in weight bytes per
//! second. After criterion, side by side in the same run: INT8 and NF4 against our FP16 at the same
//! shape (goals on a GPU: ≥ 1.8× and ≥ 3.3× at M = 1), numpy's f32 matvec on the CPU (shapes up to
//! 300 MB of f32), and on a GPU the device's copy bandwidth and torch.matmul in f16 (cuBLAS).
//!
//! `SPECKV_BENCH_QUICK=1`: 4096×4096 and 14336×4096 at M = 1 and 5 only.

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use speckv::backend::cuda::CudaBackend;
use speckv::measure::regime::random_weights;
use speckv::weights::quant::{Format, QMatrix};

fn quick() -> bool {
    std::env::var("SPECKV_BENCH_QUICK")
        .map(|v| v == "1")
        .unwrap_or(false)
}

fn shapes() -> Vec<(usize, usize)> {
    if quick() {
        vec![(4096, 4096), (14336, 4096)]
    } else {
        vec![(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
    }
}

fn ms() -> Vec<usize> {
    if quick() {
        vec![1, 5]
    } else {
        vec![1, 5, 9]
    }
}

fn bench(c: &mut Criterion) {
    let cuda = CudaBackend::new(0).ok();
    let mut g = c.benchmark_group("gemv");
    for (out, inp) in shapes() {
        let w = random_weights(out, inp, 1);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).expect("shape fits");
            let dev = cuda
                .as_ref()
                .map(|cu| cu.upload_matrix(&q).expect("upload"));
            for m in ms() {
                let x = vec![0.5f32; m * inp];
                g.throughput(Throughput::Bytes(q.bytes() as u64));
                let id = format!("{}/{out}x{inp}/M{m}", format.name());
                g.bench_function(BenchmarkId::new("cpu", &id), |b| {
                    b.iter(|| speckv::weights::gemv::cpu(&q, &x, m).expect("valid"))
                });
                if let (Some(cu), Some(d)) = (&cuda, &dev) {
                    for (label, version) in [
                        ("cuda_v1", speckv::backend::cuda::GemvVersion::V1),
                        ("cuda_v2", speckv::backend::cuda::GemvVersion::V2),
                        ("cuda_v3", speckv::backend::cuda::GemvVersion::V3),
                        ("cuda_v4", speckv::backend::cuda::GemvVersion::V4),
                    ] {
                        g.bench_function(BenchmarkId::new(label, &id), |b| {
                            b.iter_custom(|iters| {
                                cu.time_gemv(d, m, iters as u32, version).expect("launch")
                                    * iters as u32
                            })
                        });
                    }
                }
            }
        }
    }
    g.finish();
}

fn time_cpu(q: &QMatrix, m: usize, budget: Duration) -> f64 {
    let (_, inp) = q.shape();
    let x = vec![0.5f32; m * inp];
    let _ = speckv::weights::gemv::cpu(q, &x, m);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget || n < 2 {
        std::hint::black_box(speckv::weights::gemv::cpu(q, &x, m).expect("valid"));
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn peers() {
    let budget = Duration::from_millis(400);
    let cuda = CudaBackend::new(0).ok();
    let numpy = common::venv_python();
    let torch = common::torch_python();
    let copy = cuda
        .as_ref()
        .and_then(|c| c.copy_bandwidth(512 << 20, 20).ok());
    println!("\ngemv: weight GB/s per regime; ratios against our FP16 and the peers, same run");
    println!(
        "{:<16} {:>3} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>8}   (CPU, GB/s of weights; numpy: f32 weights)",
        "shape",
        "M",
        "fp16",
        "int8",
        "nf4",
        "int8/fp16",
        "nf4/fp16",
        "numpy f32",
        "fp16/np",
    );
    let mut json = Vec::new();
    for (out, inp) in shapes() {
        let w = random_weights(out, inp, 1);
        let qs: Vec<QMatrix> = Format::ALL
            .iter()
            .map(|&f| QMatrix::quantize(&w, out, inp, f, false).expect("shape fits"))
            .collect();
        drop(w);
        for m in ms() {
            let t: Vec<f64> = qs.iter().map(|q| time_cpu(q, m, budget)).collect();
            let gb: Vec<f64> = qs
                .iter()
                .zip(&t)
                .map(|(q, t)| q.bytes() as f64 / t / 1e9)
                .collect();
            let np = match (&numpy, out * inp * 4 <= 300_000_000) {
                (Some(py), true) => common::peer_seconds(
                    py,
                    "numpy_matvec.py",
                    &[
                        &out.to_string(),
                        &inp.to_string(),
                        &m.to_string(),
                        "0.4",
                        "numpy",
                    ],
                ),
                _ => None,
            };
            println!(
                "{:<16} {:>3} {:>9.2} {:>9.2} {:>9.2} {:>8.2}× {:>7.2}× {:>10} {:>8}",
                format!("{out}×{inp}"),
                m,
                gb[0],
                gb[1],
                gb[2],
                t[0] / t[1],
                t[0] / t[2],
                np.map(|s| format!("{:.2}", (out * inp * 4) as f64 / s / 1e9))
                    .unwrap_or("-".into()),
                np.map(|s| format!("{:.2}×", s / t[0]))
                    .unwrap_or("-".into()),
            );
            let mut rec = serde_json::json!({
                "backend": "cpu", "out": out, "in": inp, "m": m,
                "seconds": {"fp16": t[0], "int8": t[1], "nf4": t[2]}, "numpy_f32_seconds": np,
            });
            if let Some(cu) = &cuda {
                let tg: Vec<f64> = qs
                    .iter()
                    .map(|q| {
                        let d = cu.upload_matrix(q).expect("upload");
                        cu.time_gemv(&d, m, 200, speckv::backend::cuda::GemvVersion::V4)
                            .expect("launch")
                            .as_secs_f64()
                    })
                    .collect();
                let th = torch.as_ref().and_then(|py| {
                    common::peer_seconds(
                        py,
                        "numpy_matvec.py",
                        &[
                            &out.to_string(),
                            &inp.to_string(),
                            &m.to_string(),
                            "0.4",
                            "torch",
                        ],
                    )
                });
                let gbg: Vec<f64> = qs
                    .iter()
                    .zip(&tg)
                    .map(|(q, t)| q.bytes() as f64 / t / 1e9)
                    .collect();
                println!(
                    "{:<16} {:>3} {:>9.1} {:>9.1} {:>9.1} {:>8.2}× {:>7.2}×  cuda; fp16 at {:.0}% of copy; torch.matmul f16 {}",
                    "",
                    m,
                    gbg[0],
                    gbg[1],
                    gbg[2],
                    tg[0] / tg[1],
                    tg[0] / tg[2],
                    copy.map(|c| 100.0 * gbg[0] * 1e9 / c).unwrap_or(f64::NAN),
                    th.map(|s| format!("{:.2}× ours", s / tg[0])).unwrap_or("-".into())
                );
                rec["cuda_seconds"] =
                    serde_json::json!({"fp16": tg[0], "int8": tg[1], "nf4": tg[2]});
                rec["torch_f16_seconds"] = serde_json::json!(th);
                rec["copy_bytes_per_second"] = serde_json::json!(copy);
            }
            json.push(rec);
        }
    }
    common::write_json("gemv", &json);
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

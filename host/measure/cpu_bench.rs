//! `speckv bench cpu`: the CPU decoding path's products at memory scale, next to the machine's
//! memory bandwidth measured in the same run — the copy bandwidth (bytes read + written per second
//! by a threaded copy) and the read bandwidth (a threaded sum). For each storage (GGUF blocks, and
//! speckv's FP16 / INT8 / NF4) one matrix of rows of 1536 (Qwen2.5-1.5B's width) large enough to
//! stream from DRAM (twice the L3 by default) is multiplied at M = 1..=9: weight GB/s at M = 1, its
//! share of each bandwidth, and the cost of each extra position as a share of the M = 1 time.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::weights::cpu::{matmul, Acts, Isa, Linear, MAX_M};
use crate::weights::ggml::{self, BlockType};
use crate::weights::quant::QMatrix;

/// Row width of every benchmarked matrix.
pub const WIDTH: usize = 1536;
/// Positions timed: 1 (decoding) to 9 (verifying γ = 8).
pub const MS: [usize; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];

#[derive(Debug, Serialize)]
pub struct StorageRow {
    pub storage: String,
    pub bits_per_weight: f64,
    pub bytes: usize,
    /// Milliseconds per product at M = 1..=9.
    pub ms: Vec<f64>,
    /// Weight bytes per second at M = 1.
    pub gbps: f64,
    pub share_of_copy: f64,
    pub share_of_read: f64,
    /// Mean of (t(M) − t(1)) / ((M − 1) · t(1)) over M = 2..=9: one extra verified position as a
    /// share of a decoded token's product.
    pub extra_position: f64,
}

#[derive(Debug, Serialize)]
pub struct CpuBench {
    pub isa: Isa,
    pub threads: usize,
    /// Bytes read + written per second by a threaded copy of `buffer_mib`.
    pub copy_gbps: f64,
    /// Bytes read per second by a threaded sum.
    pub read_gbps: f64,
    pub buffer_mib: usize,
    pub rows: Vec<StorageRow>,
}

fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Copy and read bandwidth over `bytes`-sized buffers, rayon's threads.
pub fn bandwidth(bytes: usize) -> (f64, f64) {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).collect();
    let mut dst = vec![0u64; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1);
    let copy = best_of(3, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&dst);
    });
    let read = best_of(3, || {
        let s: u64 = src
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        std::hint::black_box(s);
    });
    let gb = (n * 8) as f64 / 1e9;
    (2.0 * gb / copy.as_secs_f64(), gb / read.as_secs_f64())
}

/// A matrix of `rows × WIDTH` in `storage`, random contents.
fn matrix(storage: &str, rows: usize, seed: u64) -> Result<Linear> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let n = rows * WIDTH;
    Ok(match storage {
        "fp16" => Linear::Regime(QMatrix::Fp16 {
            out: rows,
            inp: WIDTH,
            w: (0..n)
                .map(|_| half::f16::from_f32(rng.gen_range(-0.05..0.05)))
                .collect(),
        }),
        "int8" => Linear::Regime(QMatrix::Int8 {
            out: rows,
            inp: WIDTH,
            q: (0..n).map(|_| rng.gen_range(-127i8..=127)).collect(),
            scale: (0..rows).map(|_| rng.gen_range(1e-4..1e-3)).collect(),
        }),
        "nf4" => Linear::Regime(QMatrix::Nf4 {
            out: rows,
            inp: WIDTH,
            packed: (0..n / 2).map(|_| rng.gen()).collect(),
            absmax: (0..n / 64).map(|_| rng.gen_range(0.01..0.1)).collect(),
            double: None,
        }),
        other => {
            let ty = BlockType::ALL
                .into_iter()
                .find(|t| t.name() == other)
                .ok_or_else(|| crate::Error::Other(format!("unknown storage {other}")))?;
            Linear::Blocks(ggml::random(ty, rows, WIDTH, seed)?)
        }
    })
}

/// The storages `speckv bench cpu` times.
pub const STORAGES: [&str; 8] = [
    "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "int8", "nf4",
];

/// Runs the benchmark with matrices of about `mib` MiB each (`fp16` included first).
pub fn run(mib: usize) -> Result<CpuBench> {
    let (copy_gbps, read_gbps) = bandwidth(mib << 20);
    let mut rows = Vec::new();
    let mut storages = vec!["fp16", "F16"];
    storages.extend(STORAGES);
    // SPECKV_BENCH_ONLY=Q4_K,fp16 restricts the run (profiling one kernel).
    if let Ok(only) = std::env::var("SPECKV_BENCH_ONLY") {
        storages.retain(|s| only.split(',').any(|o| o == *s));
    }
    for (k, storage) in storages.into_iter().enumerate() {
        let probe = matrix(storage, 8, 1)?;
        let row_bytes = probe.bytes() / 8;
        let n_rows = ((mib << 20) / row_bytes).max(64);
        let w = matrix(storage, n_rows, 100 + k as u64)?;
        let mut acts = Acts::new(WIDTH);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let x: Vec<f32> = (0..MAX_M * WIDTH)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let mut y = vec![0f32; MAX_M * n_rows];
        let mut yt = vec![0f32; MAX_M * n_rows];
        let mut ms = Vec::new();
        for &m in &MS {
            acts.quantize(&x[..m * WIDTH], m, WIDTH)?;
            let mut err = Ok(());
            let t = best_of(3, || {
                if let Err(e) = matmul(&w, &x, &acts, m, &mut y, &mut yt) {
                    err = Err(e);
                }
            });
            err?;
            ms.push(t.as_secs_f64() * 1e3);
        }
        let gbps = w.bytes() as f64 / (ms[0] * 1e-3) / 1e9;
        let extra = ms[1..]
            .iter()
            .zip(&MS[1..])
            .map(|(t, &m)| (t - ms[0]) / ((m - 1) as f64 * ms[0]))
            .sum::<f64>()
            / (MS.len() - 1) as f64;
        rows.push(StorageRow {
            storage: storage.to_string(),
            bits_per_weight: 8.0 * w.bytes() as f64 / (n_rows * WIDTH) as f64,
            bytes: w.bytes(),
            ms,
            gbps,
            share_of_copy: gbps / copy_gbps,
            share_of_read: gbps / read_gbps,
            extra_position: extra,
        });
    }
    Ok(CpuBench {
        isa: Isa::best(),
        threads: rayon::current_num_threads(),
        copy_gbps,
        read_gbps,
        buffer_mib: mib,
        rows,
    })
}

pub fn render(b: &CpuBench) -> String {
    let mut s = format!(
        "CPU products, {:?}, {} threads; copy bandwidth {:.1} GB/s (read + write), read bandwidth {:.1} GB/s, matrices of {} MiB × rows of {WIDTH}\n\n",
        b.isa, b.threads, b.copy_gbps, b.read_gbps, b.buffer_mib
    );
    s += "| storage | bits/weight | ms at M=1 | GB/s | × copy | × read | ms at M=5 | ms at M=9 | each extra position |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &b.rows {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.0} % | {:.0} % | {:.2} | {:.2} | {:.1} % |\n",
            r.storage,
            r.bits_per_weight,
            r.ms[0],
            r.gbps,
            100.0 * r.share_of_copy,
            100.0 * r.share_of_read,
            r.ms[4],
            r.ms[8],
            100.0 * r.extra_position
        );
    }
    s
}

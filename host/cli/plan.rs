//! `speckv plan`: the launch (entry point, grid, block, dynamic shared memory, blocks per SM) a
//! kernel gets for a shape — exactly what the backends launch.

use speckv::plan::{self, LaunchPlan};
use speckv::weights::quant::Format;
use speckv::{BackendKind, Dtype, Error};

use crate::args::json_out;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    #[value(name = "softmax_stats")]
    SoftmaxStats,
    Verify,
    Gemv,
    /// The whole device decode step of a model's shapes (`--shapes`, `--format`, `--m`).
    Step,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    kernel: Kernel,
    /// softmax_stats: rows of logits.
    #[arg(long)]
    rows: Option<u32>,
    /// verify, step: sequences (step: default 1).
    #[arg(long)]
    batch: Option<u32>,
    /// verify: γmax.
    #[arg(long)]
    gamma: Option<u32>,
    #[arg(long)]
    vocab: Option<u32>,
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    dtype: DtypeArg,
    /// gemv: weight format.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// gemv: output features.
    #[arg(long)]
    out: Option<u32>,
    /// gemv: input features.
    #[arg(long = "in")]
    inp: Option<u32>,
    /// gemv: rows of x (1..=16).
    #[arg(long)]
    m: Option<u32>,
    /// Kernel version (1: the oracle, 2: what the backends launch; softmax_stats also 3, a batch's
    /// rows with their own options, which batched decoding launches; gemv also 3, the streaming
    /// kernel at M = 1, and 4, INT8 and NF4 at M = 1 by integer dot products, which the device
    /// forward pass launches).
    #[arg(long, default_value_t = 2)]
    version: u32,
    /// gemv: how x is read — as it is, normalised (`_norm`: the RMSNorm fused in front) or as
    /// silu(gate) · up (`_silu`); the fused reads are v3's and v4's at M = 1 (an error elsewhere).
    #[arg(long, value_enum, default_value_t = plan::XRead::Plain)]
    read: plan::XRead,
    /// step: a model's shapes (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b).
    #[arg(long)]
    shapes: Option<String>,
    /// SMs to plan for (default: the CUDA device's, else an H200's 132).
    #[arg(long)]
    sms: Option<u32>,
    #[arg(long)]
    json: bool,
}

fn need(v: Option<u32>, what: &str) -> speckv::Result<u32> {
    match v {
        Some(x) if x > 0 => Ok(x),
        Some(_) => Err(Error::Other(format!("--{what} must be at least 1"))),
        None => Err(Error::Other(format!(
            "--{what} is required for this kernel"
        ))),
    }
}

pub fn run(a: Args, backend: BackendKind) -> speckv::Result<()> {
    let sms = match a.sms {
        Some(0) => return Err(Error::Other("--sms must be at least 1".to_string())),
        Some(s) => s,
        None => match (backend, speckv::backend::cuda::driver_present()) {
            (BackendKind::Cpu, _) | (_, false) => plan::H200_SMS,
            _ => speckv::backend::cuda::CudaBackend::new(0)
                .map(|c| c.sm_count())
                .unwrap_or(plan::H200_SMS),
        },
    };
    let most = match a.kernel {
        Kernel::Gemv => 4,
        Kernel::SoftmaxStats => 3,
        _ => 2,
    };
    if a.version == 0 || a.version > most {
        return Err(Error::Other(format!(
            "--version must be 1 to {most} for this kernel, got {}",
            a.version
        )));
    }
    let dtype = match a.dtype {
        DtypeArg::F32 => Dtype::F32,
        DtypeArg::F16 => Dtype::F16,
        DtypeArg::Bf16 => Dtype::Bf16,
    };
    let (main, all, details): (LaunchPlan, Vec<LaunchPlan>, serde_json::Value) = match a.kernel {
        Kernel::SoftmaxStats => {
            let rows = need(a.rows, "rows")?;
            let vocab = need(a.vocab, "vocab")?;
            if a.version == 1 {
                let p = plan::softmax_stats_v1(rows, dtype, sms);
                (p.clone(), vec![p], serde_json::json!({}))
            } else {
                let (p, k) = if a.version == 3 {
                    plan::softmax_stats_v3(rows, vocab, dtype, sms)
                } else {
                    plan::softmax_stats_v2(rows, vocab, dtype, sms)
                };
                (
                    p.clone(),
                    vec![p],
                    serde_json::json!({"splits": k.splits, "chunk_vecs": k.chunk_vecs}),
                )
            }
        }
        Kernel::Verify => {
            let batch = need(a.batch, "batch")?;
            let gamma = a
                .gamma
                .ok_or_else(|| Error::Other("--gamma is required".into()))?;
            let vocab = need(a.vocab, "vocab")?;
            if a.version == 1 {
                let p = plan::verify_v1(batch, dtype, sms);
                (p.clone(), vec![p], serde_json::json!({}))
            } else {
                let (ps, f) = plan::verify_v2(batch, gamma, vocab, dtype, sms);
                let main = ps
                    .iter()
                    .find(|p| p.entry.starts_with("verify_v2_rows"))
                    .cloned()
                    .unwrap_or_else(|| ps[0].clone());
                (
                    main,
                    ps,
                    serde_json::json!({"row_splits": f.verify.row_splits, "sample_splits": f.verify.sample_splits, "workspace_bytes": f.bytes}),
                )
            }
        }
        Kernel::Step => {
            let name = a
                .shapes
                .as_deref()
                .ok_or_else(|| Error::Other("--shapes is required for the step".into()))?;
            let format = a
                .format
                .ok_or_else(|| Error::Other("--format is required".into()))?;
            let m = need(a.m, "m")?;
            let shape =
                speckv::model::device::Shape::of(&speckv::model::device::named_shape(name)?)?;
            let seqs = need(a.batch.or(Some(1)), "batch")?;
            let ops =
                speckv::model::device::step_plan(&shape, format, m as usize, seqs as usize, sms)?;
            let launches: Vec<LaunchPlan> = ops.iter().map(|(_, p)| p.clone()).collect();
            let fewest = launches
                .iter()
                .min_by_key(|p| p.grid[0])
                .cloned()
                .ok_or(Error::Empty { what: "launches" })?;
            let under = launches.iter().filter(|p| p.grid[0] < sms).count();
            (
                fewest,
                launches,
                serde_json::json!({"launches": ops.len(), "launches_with_fewer_blocks_than_sms": under}),
            )
        }
        Kernel::Gemv => {
            let format = a
                .format
                .ok_or_else(|| Error::Other("--format is required".into()))?;
            let out = need(a.out, "out")?;
            let inp = need(a.inp, "in")?;
            let m = need(a.m, "m")?;
            if m > 16 {
                return Err(Error::Other(format!("--m must be 1..=16, got {m}")));
            }
            if a.version == 1 && a.read == plan::XRead::Plain {
                let p = plan::gemv_v1(format, out, m, sms);
                (p.clone(), vec![p], serde_json::json!({}))
            } else {
                let version =
                    plan::GemvVersion::from_number(a.version).unwrap_or(plan::GemvVersion::V2);
                let (p, k) = plan::plan_fused(
                    version,
                    format,
                    out as usize,
                    inp as usize,
                    m as usize,
                    sms,
                    a.read,
                    None,
                )?;
                (
                    p.clone(),
                    vec![p],
                    serde_json::json!({"ksplits": k.ksplits, "kt": k.kt, "rows_per_block": k.rows_per_block, "workspace_bytes": k.workspace_bytes}),
                )
            }
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&main).map_err(|e| Error::Other(e.to_string()))?;
        v["version"] = a.version.into();
        v["launches"] = serde_json::to_value(&all).map_err(|e| Error::Other(e.to_string()))?;
        v["details"] = details;
        return json_out(&v);
    }
    // Identical launches (a step repeats each layer's) are printed once with their count.
    let mut seen: Vec<(&LaunchPlan, usize)> = Vec::new();
    for p in &all {
        match seen.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => seen.push((p, 1)),
        }
    }
    for (p, n) in seen {
        println!(
            "{:<24} grid {:>6} × block {:>4}, {:>6} B shared, {:.2} blocks/SM on {} SMs{}",
            p.entry,
            p.grid[0],
            p.block[0],
            p.shared_bytes,
            p.ctas_per_sm,
            p.sm_count,
            if n > 1 {
                format!("  (× {n})")
            } else {
                String::new()
            }
        );
    }
    if details != serde_json::json!({}) {
        println!("{details}");
    }
    Ok(())
}

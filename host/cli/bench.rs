//! `speckv bench …`: decoding tokens/s of every policy on real models, the γ decision's overhead,
//! and measured step-cost models per weight regime.

use std::collections::BTreeMap;
use std::path::PathBuf;

use speckv::controller::{self, records};
use speckv::decode::{pair, profile, GenConfig};
use speckv::measure;
use speckv::{Backend, BackendKind, Error};

use crate::args::{check_seconds, json_out, progress_bar, write_json, CatchUpArgs, ModelArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Decoding tokens/s of plain decoding and of each γ policy over a prompt set, models loaded
    /// once (greedy; the CPU pass, or speckv's device pass with --backend cuda); with --traces and
    /// --cost, the trace-based predictions too.
    Decode(Box<DecodeArgs>),
    /// Several prompts decoded together (`generate --prompt A --prompt B …`) against the same
    /// prompts decoded one at a time, on the same backend in the same run: tokens/s of both and
    /// their ratio, per batch size and policy (greedy).
    Batch(Box<crate::bench_batch::BatchArgs>),
    /// Tokens/s predicted from traced steps under a cost model, no model run: plain decoding,
    /// every fixed γ, HF's default schedule and its heuristic, llama.cpp's p-min rule at P =
    /// 0.1..0.9, `auto` (replayed, with its gate and without) and the oracle — e.g. the CPU's
    /// traces under the GPU cost model of `bench step --backend cuda --shapes`, or HF's
    /// (`scripts/hf_peer.py --cost-out`).
    Predict {
        /// Traces from `speckv profile`.
        #[arg(long)]
        traces: PathBuf,
        /// Cost model (`profile`'s .cost.json, `bench step`'s cost_REGIME.json).
        #[arg(long)]
        cost: PathBuf,
        /// Hazard model `auto` is replayed with (from `speckv train --hazard`); default: the
        /// shipped one.
        #[arg(long)]
        hazard: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Time of one γ decision: CPU µs per decision (all candidates through the MLP) and, with a
    /// GPU, µs per batch decision of 256 sequences, next to the paper's 0.34 ms.
    Overhead {
        /// Predictor to time (default: seeded random weights; the time does not depend on them).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Every kernel, v1 and v2, on the CUDA device with a cold L2, as a share of the device's
    /// copy bandwidth measured in the same run (the gpu-check bundle runs it).
    Gpu {
        /// Fewer shapes and iterations.
        #[arg(long)]
        quick: bool,
        #[arg(long)]
        json: bool,
    },
    /// The CPU decoding path's products (GGUF blocks, FP16, INT8, NF4) streaming from memory at
    /// M = 1..=9, next to the copy and read bandwidth measured in the same run.
    Cpu {
        /// MiB per matrix (default: twice this machine's 300 MiB L3, so weights come from DRAM).
        #[arg(long, default_value_t = 640)]
        mib: usize,
        #[arg(long)]
        json: bool,
    },
    /// Draft time per token and verification time as a function of γ, per weight regime, on the
    /// current backend; writes the cost models `speckv evaluate --cost` reads.
    Step {
        /// Directory for cost_fp16.json, cost_int8.json, cost_nf4.json.
        #[arg(long, default_value = "target/cost")]
        out_dir: PathBuf,
        /// Seconds of measurement per timing.
        #[arg(long, default_value_t = 0.1)]
        seconds: f64,
        /// Time speckv's whole device decode step at a model's shapes (CUDA only; weights made on
        /// the device): qwen2.5-coder-1.5b or qwen2.5-coder-0.5b.
        #[arg(long)]
        shapes: Option<String>,
        /// With --shapes: the draft's shapes (default: the same as the target's).
        #[arg(long)]
        draft_shapes: Option<String>,
        /// With --shapes: the cache length the steps attend over.
        #[arg(long, default_value_t = 256)]
        position: usize,
        /// With --shapes: timed launches per measurement.
        #[arg(long, default_value_t = 20)]
        iters: u32,
        /// With --shapes: also time decode steps of this many sequences together (one position
        /// each, 2..=16), e.g. 4,16.
        #[arg(long, value_delimiter = ',')]
        batch_sizes: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[arg(long, default_value = "prompts/prompts.jsonl")]
    prompts: PathBuf,
    #[arg(long, default_value_t = 5)]
    offset: usize,
    #[arg(long, default_value_t = 1)]
    per_category: usize,
    /// Runs of the prompt set per policy (each run of a prompt is one unit of the paired
    /// intervals).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Comma-separated: plain, auto, auto-nogate, fixed:N, every:N:G (G drafts every N-th step),
    /// speckv, speckv-cost, confidence:P, hf-dynamic, heuristic, adaedl[:LAMBDA[:KAPPA]].
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,auto,fixed:1,fixed:2,fixed:3,fixed:4,fixed:5,fixed:6,fixed:7,fixed:8,heuristic,hf-dynamic,adaedl,confidence:0.75"
    )]
    policies: Vec<String>,
    /// Predictor for speckv / speckv-cost (from `speckv train`); default: the shipped one.
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Hazard model for auto and auto-nogate, and for the replay of auto with --traces (from
    /// `speckv train --hazard`); default: the shipped one.
    #[arg(long)]
    hazard: Option<PathBuf>,
    /// Cost model (speckv-cost; the oracle with --traces).
    #[arg(long)]
    cost: Option<PathBuf>,
    /// Traces from `speckv profile` for the oracle.
    #[arg(long)]
    traces: Option<PathBuf>,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    gamma_max: u32,
    #[command(flatten)]
    catch_up: CatchUpArgs,
    #[arg(long)]
    json: bool,
}

pub fn run(what: Command, backend: BackendKind) -> speckv::Result<()> {
    match what {
        Command::Decode(a) => decode(*a, backend),
        Command::Batch(a) => crate::bench_batch::run(*a, backend),
        Command::Predict {
            traces,
            cost,
            hazard,
            json,
        } => {
            let v = predict(&traces, &cost, hazard.as_deref())?;
            if json {
                return json_out(&v);
            }
            print!("{}", render_predict(&v));
            Ok(())
        }
        Command::Overhead { model, json } => {
            let backend = Backend::new(backend)?;
            let r = measure::overhead::measure(&backend, model.as_deref())?;
            if json {
                json_out(&r)
            } else {
                print!("{}", measure::overhead::render(&r));
                Ok(())
            }
        }
        Command::Gpu { quick, json } => {
            let cuda = speckv::backend::cuda::CudaBackend::new(0)?;
            let r = measure::gpu_bench::run(&cuda, quick)?;
            if json {
                json_out(&r)
            } else {
                print!("{}", measure::gpu_bench::render(&r));
                Ok(())
            }
        }
        Command::Cpu { mib, json } => {
            if mib == 0 || mib > 8192 {
                return Err(speckv::Error::Other(format!(
                    "--mib {mib}: 1 to 8192 MiB per matrix"
                )));
            }
            let r = measure::cpu_bench::run(mib)?;
            if json {
                json_out(&r)
            } else {
                print!("{}", measure::cpu_bench::render(&r));
                Ok(())
            }
        }
        Command::Step {
            out_dir,
            seconds,
            shapes: Some(t),
            draft_shapes,
            position,
            iters,
            batch_sizes,
            json,
        } => {
            let _ = seconds;
            let o = speckv::measure::device_step::StepOptions {
                position,
                iters,
                batches: batch_sizes,
            };
            device_step(backend, &t, draft_shapes.as_deref(), &o, out_dir, json)
        }
        Command::Step {
            out_dir,
            seconds,
            json,
            ..
        } => {
            let backend = Backend::new(backend)?;
            step(&backend, out_dir, check_seconds(seconds)?, json)
        }
    }
}

/// HF transformers' default `assistant_confidence_threshold`.
const HF_CONFIDENCE_THRESHOLD: f64 = 0.4;

/// Tokens/s of plain decoding, every fixed γ, HF's default schedule and its heuristic, llama.cpp's
/// p-min rule at P = 0.1..0.9, `auto` and the oracle, predicted from traced steps under a cost
/// model; `auto` with the hazard model at `hazard`, else the shipped one.
fn predict(
    traces: &std::path::Path,
    cost: &std::path::Path,
    hazard: Option<&std::path::Path>,
) -> speckv::Result<serde_json::Value> {
    let recs = records::read_records(traces)?;
    let cm = controller::CostModel::load(cost)?;
    let traced: Vec<&records::StepRecord> = recs
        .iter()
        .filter(|r| r.trace_gamma_max == Some(r.gamma))
        .collect();
    let steps: Vec<profile::TracedStep> = traced
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let first = i == 0 || {
                let p = traced[i - 1];
                (p.run, &p.task) != (r.run, &r.task)
            };
            (r.gamma, r.accepted, first)
        })
        .collect();
    let gmax = steps.iter().map(|s| s.0).min().unwrap_or(0);
    let fixed: BTreeMap<_, _> = (1..=gmax)
        .map(|g| (g, profile::fixed_tokens_per_second(&steps, g, &cm)))
        .collect();
    // `auto` replayed on the same steps (costs held at `cm`).
    let rows = controller::hazard_training::read_trace_rows(traces)?;
    let model = match hazard {
        Some(p) => controller::hazard::HazardModel::load(p)?,
        None => controller::hazard::HazardModel::default_model()?,
    };
    let auto = controller::replay::auto_on_traces(&rows, &model, &cm)?;
    let ungated = controller::replay::auto_without_gate_on_traces(&rows, &model, &cm)?;
    let hf = controller::replay::threshold_on_traces(&rows, &cm, HF_CONFIDENCE_THRESHOLD)?;
    let mut p_min = BTreeMap::new();
    for tenth in 1..=9 {
        let p = f64::from(tenth) / 10.0;
        let r = controller::replay::p_min_on_traces(&rows, &cm, p)?;
        p_min.insert(format!("{p:.1}"), r.tokens_per_second);
    }
    Ok(serde_json::json!({
        "steps": steps.len(),
        "cost_model": cm.source,
        // Which hazard model `auto` was replayed with: a file, or the shipped one, and its source.
        "hazard_model": match hazard {
            Some(p) => format!("{} ({})", p.display(), model.source),
            None => format!("shipped ({})", model.source),
        },
        // How a step's first draft pass is charged: by the tokens it feeds, or as one token.
        "draft_first_feed": if cm.draft_feed_ms.is_empty() {
            "not in the cost model: every draft pass charged one token's time".to_string()
        } else {
            format!(
                "charged by the tokens it feeds (draft_feed_ms, 1..={} measured)",
                cm.draft_feed_ms.len()
            )
        },
        "plain_tokens_per_second": 1e3 / cm.verify(0),
        "oracle_tokens_per_second": profile::oracle_tokens_per_second(&steps, &cm),
        "fixed_tokens_per_second": fixed,
        "heuristic_tokens_per_second": profile::heuristic_tokens_per_second(&steps, &cm),
        "auto_tokens_per_second": auto.tokens_per_second,
        "auto_mean_gamma": auto.mean_gamma,
        "auto_plain_steps": auto.plain_steps,
        // The gate off: every step drafts, the stopping rule alone decides.
        "auto_gate_off_tokens_per_second": ungated.tokens_per_second,
        "auto_gate_off_mean_gamma": ungated.mean_gamma,
        "hf_default_tokens_per_second": hf.tokens_per_second,
        "hf_default_mean_gamma": hf.mean_gamma,
        "p_min_tokens_per_second": p_min,
    }))
}

/// The predictions as a table.
fn render_predict(v: &serde_json::Value) -> String {
    let mut rows: Vec<(String, Option<f64>)> = vec![
        ("plain".into(), v["plain_tokens_per_second"].as_f64()),
        (
            "auto (replayed)".into(),
            v["auto_tokens_per_second"].as_f64(),
        ),
        (
            "auto, gate off".into(),
            v["auto_gate_off_tokens_per_second"].as_f64(),
        ),
        (
            "HF default (conf 0.4)".into(),
            v["hf_default_tokens_per_second"].as_f64(),
        ),
        (
            "heuristic (HF +2/−1)".into(),
            v["heuristic_tokens_per_second"].as_f64(),
        ),
    ];
    if let Some(f) = v["fixed_tokens_per_second"].as_object() {
        for (g, t) in f {
            rows.push((format!("fixed:{g}"), t.as_f64()));
        }
    }
    // llama.cpp's p-min rule: the best P of the sweep, chosen on these very steps.
    let best_p = v["p_min_tokens_per_second"].as_object().and_then(|m| {
        m.iter()
            .filter_map(|(p, t)| Some((p.clone(), t.as_f64()?)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    });
    if let Some((p, t)) = best_p {
        rows.push((format!("p-min {p} (best P)"), Some(t)));
    }
    rows.push(("oracle".into(), v["oracle_tokens_per_second"].as_f64()));
    let plain = v["plain_tokens_per_second"].as_f64().unwrap_or(f64::NAN);
    let mut out = format!(
        "{} traced steps; cost model: {}\nauto's hazard model: {}\nthe draft's first feed: {}\n{:<22} {:>10} {:>9}\n",
        v["steps"],
        v["cost_model"].as_str().unwrap_or(""),
        v["hazard_model"].as_str().unwrap_or(""),
        v["draft_first_feed"].as_str().unwrap_or(""),
        "policy",
        "tokens/s",
        "× plain"
    );
    for (name, t) in rows {
        match t {
            Some(t) => out += &format!("{name:<22} {t:>10.2} {:>9.3}\n", t / plain),
            None => out += &format!("{name:<22} {:>10} {:>9}\n", "–", "–"),
        }
    }
    out
}

fn decode(a: DecodeArgs, backend: BackendKind) -> speckv::Result<()> {
    let chosen = pair::prompts_from_file(&a.prompts, a.offset, a.per_category)?;
    let files = speckv::decode::PolicyFiles {
        controller: a.controller.as_deref(),
        cost: a.cost.as_deref(),
        hazard: a.hazard.as_deref(),
    };
    files.check_hazard_used(a.policies.iter().map(String::as_str))?;
    let mut pols = Vec::new();
    for name in &a.policies {
        pols.push((
            name.clone(),
            speckv::decode::policy_from_name(name, &files)?,
        ));
    }
    let p = a.models.load()?;
    let device = speckv::decode::device::Device::open(backend, &p.target, p.draft_model())?;
    let once: Vec<Vec<u32>> = chosen
        .iter()
        .map(|(_, pr)| p.encode_chat(&pr.prompt))
        .collect::<speckv::Result<_>>()?;
    if a.repeats == 0 {
        return Err(Error::Other("--repeats must be at least 1".to_string()));
    }
    // Each repeat is another paired unit: every policy runs the prompt again, in the same order.
    let ids: Vec<Vec<u32>> = (0..a.repeats).flat_map(|_| once.iter().cloned()).collect();
    let cfg = GenConfig {
        max_tokens: a.max_tokens,
        temperature: 0.0,
        seed: 0,
        gamma_max: a.gamma_max,
        compression: p.compression,
        draft_catch_up: a.catch_up.window(),
    };
    let bar = progress_bar((pols.len() * ids.len()) as u64, "decoding");
    let mut started = false;
    let res = pair::bench_decode(&p, &device, &ids, &pols, &cfg, &mut |name, i| {
        bar.set_message(format!("prompt {} {name}", i + 1));
        if started {
            bar.inc(1);
        }
        started = true;
    })?;
    bar.finish_and_clear();
    // The trace-based oracle and fixed γ under the measured cost model.
    let trace = match (&a.traces, &a.cost) {
        (Some(t), Some(c)) => Some(predict(t, c, a.hazard.as_deref())?),
        (Some(_), None) => {
            return Err(Error::Other(
                "--traces needs --cost (the .cost.json speckv profile wrote)".to_string(),
            ))
        }
        _ => None,
    };
    if a.json {
        return json_out(&serde_json::json!({
            "target": a.models.target.name(), "draft": p.draft_name, "prompts": ids.len(),
            "max_tokens": a.max_tokens, "repeats": a.repeats, "policies": res,
            "paired": pair::paired_table(&res), "traces": trace,
        }));
    }
    println!(
        "target {} ({}), draft {}, {} prompts × ≤ {} tokens, greedy; decoding tokens/s (prefill excluded)\n",
        a.models.model.display(),
        a.models.target.name(),
        p.draft_name,
        ids.len(),
        a.max_tokens
    );
    print!("{}", pair::render_bench(&res));
    if let Some(t) = trace {
        println!(
            "\nfrom the traces (cost model {}): {t}",
            a.cost
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `bench step --shapes`: the device decode step at a model's shapes, on CUDA.
fn device_step(
    backend: BackendKind,
    target: &str,
    draft: Option<&str>,
    o: &speckv::measure::device_step::StepOptions,
    out_dir: PathBuf,
    json: bool,
) -> speckv::Result<()> {
    use speckv::model::device::named_shape;
    if backend == BackendKind::Cpu {
        return Err(Error::Other(
            "bench step --shapes times the CUDA decode step: use --backend cuda (or auto on a GPU)"
                .to_string(),
        ));
    }
    o.check()?;
    let t = named_shape(target)?;
    let d = named_shape(draft.unwrap_or(target))?;
    let cuda = speckv::backend::cuda::CudaBackend::new(0)?;
    let r = speckv::measure::device_step::device_steps(&cuda, &t, &d, o)?;
    std::fs::create_dir_all(&out_dir).map_err(|source| Error::Io {
        context: format!("creating {}", out_dir.display()),
        source,
    })?;
    for s in &r.regimes {
        write_json(
            &out_dir.join(format!("cost_{}.json", s.format.name())),
            &s.cost,
        )?;
    }
    if json {
        return json_out(&r);
    }
    println!(
        "device decode step on {} at cache length {} (copy bandwidth {:.0} GB/s); draft {:.3} ms \
         ({:.3} ms without a CUDA graph); a draft phase of {} drafts, per draft on the host's clock: \
         {:.3} ms enqueued at once, {:.3} ms waiting per draft",
        r.device,
        r.position,
        r.copy_bandwidth_gb_s,
        r.draft_ms_per_token,
        r.draft_eager_ms_per_token,
        speckv::measure::device_step::PHASE_GAMMA,
        r.draft_phase_ms_per_token,
        r.draft_stepwise_ms_per_token
    );
    println!(
        "draft pass fed n = 1..{} tokens (a step's first pass), ms: {}",
        r.draft_feed_ms.len(),
        r.draft_feed_ms
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for s in &r.regimes {
        println!(
            "{:<5} M=1 {:.3} ms ({:.0}% of the weights' streaming time {:.3} ms; {:.3} ms without a \
             graph); γ=0..8: {:?}",
            s.format.name(),
            s.cost.verify_ms[0],
            100.0 * s.bandwidth_fraction,
            s.stream_ms,
            s.eager_verify_ms[0],
            s.cost
                .verify_ms
                .iter()
                .map(|v| (v * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
        for b in &s.batched {
            println!(
                "      batch {:>2}: {:.3} ms per step, {:.3} ms per token ({:.1}× batch 1's tokens/s); \
                 a whole plain decode step (row statistics, copies, host clock) {:.3} ms, {:.3} ms \
                 per token",
                b.seqs, b.ms, b.ms_per_token, b.speedup, b.decode_ms, b.decode_ms_per_token
            );
        }
    }
    println!("written: {}/cost_{{fp16,int8,nf4}}.json", out_dir.display());
    Ok(())
}

fn step(
    backend: &Backend,
    out_dir: PathBuf,
    seconds: std::time::Duration,
    json: bool,
) -> speckv::Result<()> {
    let c = speckv::measure::regime::step_costs(backend, seconds)?;
    std::fs::create_dir_all(&out_dir).map_err(|source| Error::Io {
        context: format!("creating {}", out_dir.display()),
        source,
    })?;
    for (f, model) in &c.regimes {
        write_json(&out_dir.join(format!("cost_{}.json", f.name())), model)?;
    }
    if json {
        return json_out(&c);
    }
    println!(
        "step costs on {} ({}); draft (1B-shaped, fp16) {:.2} ms per token; fed n = 1..8 tokens \
         (a step's first pass): {}",
        c.backend,
        c.device,
        c.draft_ms_per_token,
        c.regimes.first().map_or(String::new(), |(_, m)| m
            .draft_feed_ms
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", "))
    );
    println!(
        "{:<6} {}",
        "regime",
        (0..=8)
            .map(|g| format!("{:>8}", format!("γ={g}")))
            .collect::<String>()
    );
    for (f, m) in &c.regimes {
        println!(
            "{:<6} {}",
            f.name(),
            m.verify_ms
                .iter()
                .map(|v| format!("{v:>8.1}"))
                .collect::<String>()
        );
    }
    println!(
        "(verification ms of the 8B-shaped target at M = γ + 1)\nwritten: {}/cost_{{fp16,int8,nf4}}.json",
        out_dir.display()
    );
    Ok(())
}

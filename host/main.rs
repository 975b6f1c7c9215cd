//! The `speckv` command-line tool.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use speckv::controller::{self, evaluate, mlp, records, simulate};
use speckv::decode::pair;
use speckv::ptx::Arch;
use speckv::verify::sim::{self, SimMode};
use speckv::{report, Backend, BackendKind};

#[derive(Parser)]
#[command(
    name = "speckv",
    version,
    about = "Speculative decoding with an adaptive speculation length γ"
)]
struct Cli {
    /// Backend: CUDA when a device is present (auto), or forced.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto, global = true)]
    backend: BackendKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backend, device, PTX built, and kernel throughput on the current backend.
    Report {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds of measurement per case.
        #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
        seconds: f64,
    },
    /// Speculative sampling on seeded Dirichlet distributions through the verification kernel:
    /// emitted-token counts per position, to check that the output follows the target exactly.
    VerifySim {
        #[arg(long)]
        vocab: usize,
        #[arg(long)]
        gamma: usize,
        #[arg(long, default_value_t = 100_000)]
        samples: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = SimMode::Stochastic)]
        mode: SimMode,
        /// Sequences per verification launch.
        #[arg(long, default_value_t = 8192)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Train the 6 → 16 → 1 acceptance predictor on step records (validation and test split by
    /// prompt run); prints train / validation / test MSE and correlation.
    Train {
        #[arg(long)]
        steps: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Evaluate γ policies on step records: the paper's method and the honest (measured outcomes
    /// only) method, with paired bootstrap intervals.
    Evaluate {
        #[arg(long)]
        train: PathBuf,
        /// Use only these prompt runs of --train (comma-separated).
        #[arg(long, value_delimiter = ',')]
        train_runs: Option<Vec<u32>>,
        #[arg(long)]
        test: PathBuf,
        /// Use only these prompt runs of --test.
        #[arg(long, value_delimiter = ',')]
        test_runs: Option<Vec<u32>>,
        /// Load the predictor (JSON or .npz in the paper's layout) instead of training on --train.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Cost model JSON for speckv-cost (default: an assumed model, stated in the output).
        #[arg(long)]
        cost: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        resamples: usize,
        /// Confidence-threshold policy: stop drafting below this top-1 probability.
        #[arg(long, default_value_t = 0.5)]
        confidence_threshold: f64,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The seed note's table: expected tokens per step E(α, γ) by γ and compression, best γ, gain
    /// over fixed-4.
    Simulate {
        /// α table as JSON ({"FP16": {"1": 0.82, …}, …}); default: the seed note's.
        #[arg(long, conflicts_with = "steps")]
        alpha: Option<PathBuf>,
        /// Estimate α per (compression, γ) from step records instead.
        #[arg(long)]
        steps: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Quantise a float32 .npy matrix to FP16, INT8 or NF4 safetensors.
    Quantize {
        #[arg(long, value_enum)]
        format: speckv::weights::quant::Format,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// NF4 only: quantise the absmax values to 8 bits (blocks of 256).
        #[arg(long)]
        double_quant: bool,
        #[arg(long)]
        json: bool,
    },
    /// Generate text with speculative decoding (CPU backend): streams the text, then tokens/s,
    /// acceptance, mean γ and the γ histogram.
    Generate {
        /// Target GGUF (scripts/fetch-model).
        #[arg(long)]
        model: PathBuf,
        /// Draft GGUF (same tokenizer); default: the target itself skipping every other layer.
        #[arg(long, conflicts_with = "draft_layers")]
        draft: Option<PathBuf>,
        /// Self-speculative draft keeping these layers (from `speckv calibrate-draft`).
        #[arg(long, value_delimiter = ',')]
        draft_layers: Option<Vec<usize>>,
        #[arg(long)]
        prompt: String,
        /// Target weight regime.
        #[arg(long, value_enum, default_value_t = speckv::weights::quant::Format::Fp16)]
        target: speckv::weights::quant::Format,
        /// fixed:N, speckv, speckv-cost, confidence:P, heuristic, or plain (no draft).
        #[arg(long, default_value = "fixed:4")]
        policy: String,
        /// Predictor for speckv / speckv-cost (from `speckv train`).
        #[arg(long)]
        controller: Option<PathBuf>,
        /// Cost model for speckv-cost (from `speckv bench step`).
        #[arg(long)]
        cost: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 8)]
        gamma_max: u32,
        #[arg(long)]
        json: bool,
    },
    /// Full-information traces: every step drafts γmax tokens and verifies all, recording the
    /// outcome of every γ ≤ γmax (same random numbers), the draft features (prefix and lagged) and
    /// measured times; writes the CSV (paper schema and more) and OUT.cost.json.
    Profile {
        #[arg(long)]
        model: PathBuf,
        /// Draft GGUF (same tokenizer); default: the target skipping every other layer.
        #[arg(long, conflicts_with = "draft_layers")]
        draft: Option<PathBuf>,
        #[arg(long, value_delimiter = ',')]
        draft_layers: Option<Vec<usize>>,
        /// JSON lines {"category": …, "prompt": …}.
        #[arg(long, default_value = "prompts/prompts.jsonl")]
        prompts: PathBuf,
        /// Take prompts OFFSET..OFFSET+PER_CATEGORY of every category.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, default_value_t = 10)]
        per_category: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = speckv::weights::quant::Format::Fp16)]
        target: speckv::weights::quant::Format,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 8)]
        gamma_max: u32,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Repetitions of each cost measurement per prompt (0: no cost model).
        #[arg(long, default_value_t = 1)]
        cost_reps: usize,
    },
    /// Choose the layers of a self-speculative draft: greedy layer removal maximising measured
    /// greedy acceptance until the draft costs at most --max-cost of the target per token.
    CalibrateDraft {
        #[arg(long)]
        model: PathBuf,
        /// JSON lines with a "prompt" field (default: prompts/prompts.jsonl).
        #[arg(long, default_value = "prompts/prompts.jsonl")]
        prompts: PathBuf,
        /// How many prompts to use (the first N).
        #[arg(long, default_value_t = 4)]
        n_prompts: usize,
        #[arg(long, default_value_t = 24)]
        tokens: usize,
        #[arg(long, default_value_t = 1.0 / 3.0)]
        max_cost: f64,
        #[arg(long, value_enum, default_value_t = speckv::weights::quant::Format::Fp16)]
        target: speckv::weights::quant::Format,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Write the embedded PTX of every kernel (entry points in docs/kernels.md).
    Ptx {
        /// sm_80 or sm_90.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Decoding tokens/s of plain decoding and of each γ policy over a prompt set, models loaded
    /// once (greedy; CPU backend); with --traces and --cost, the trace-based oracle too.
    Decode {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, conflicts_with = "draft_layers")]
        draft: Option<PathBuf>,
        #[arg(long, value_delimiter = ',')]
        draft_layers: Option<Vec<usize>>,
        #[arg(long, default_value = "prompts/prompts.jsonl")]
        prompts: PathBuf,
        #[arg(long, default_value_t = 5)]
        offset: usize,
        #[arg(long, default_value_t = 1)]
        per_category: usize,
        #[arg(long, value_enum, default_value_t = speckv::weights::quant::Format::Fp16)]
        target: speckv::weights::quant::Format,
        /// Comma-separated: plain, fixed:N, speckv, speckv-cost, confidence:P, heuristic.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "plain,fixed:1,fixed:2,fixed:3,fixed:4,fixed:5,fixed:6,fixed:7,fixed:8,heuristic,confidence:0.5"
        )]
        policies: Vec<String>,
        #[arg(long)]
        controller: Option<PathBuf>,
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
    /// Draft time per token and verification time as a function of γ, per weight regime, on the
    /// current backend; writes the cost models `speckv evaluate --cost` reads.
    Step {
        /// Directory for cost_fp16.json, cost_int8.json, cost_nf4.json.
        #[arg(long, default_value = "target/cost")]
        out_dir: PathBuf,
        /// Seconds of measurement per timing.
        #[arg(long, default_value_t = 0.1)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
}

/// A progress bar on standard error (hidden when it is not a terminal).
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{elapsed}} (eta {{eta}}) {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn json_out<T: serde::Serialize>(v: &T) -> speckv::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| speckv::Error::Other(e.to_string()))?
    );
    Ok(())
}

fn filter_runs(
    mut r: Vec<speckv::controller::records::StepRecord>,
    runs: &Option<Vec<u32>>,
    what: &str,
) -> speckv::Result<Vec<speckv::controller::records::StepRecord>> {
    if let Some(runs) = runs {
        r.retain(|x| runs.contains(&x.run));
        if r.is_empty() {
            return Err(speckv::Error::Other(format!(
                "{what}: no records in runs {runs:?}"
            )));
        }
    }
    Ok(r)
}

fn run_offline(command: &Command) -> Option<speckv::Result<()>> {
    Some(match command {
        Command::Train {
            steps,
            out,
            seed,
            json,
        } => {
            (|| {
                let records = records::read_records(steps)?;
                let (tr, va, te) = mlp::split_by_run(&records)?;
                let (m, rep) = mlp::train(
                    &records,
                    &tr,
                    &va,
                    &te,
                    mlp::TrainConfig {
                        seed: *seed,
                        ..Default::default()
                    },
                )?;
                m.save(out)?;
                if *json {
                    return json_out(&rep);
                }
                println!("trained on runs {:?} ({} records), early-stopped on runs {:?} at epoch {} of {}", rep.train_runs, rep.train.n, rep.val_runs, rep.best_epoch, rep.epochs_run);
                println!(
                    "train      MSE {:.4}  corr {:.3}",
                    rep.train.mse, rep.train.corr
                );
                println!(
                    "validation MSE {:.4}  corr {:.3}",
                    rep.val.mse, rep.val.corr
                );
                match rep.test {
                Some(t) => println!("test       MSE {:.4}  corr {:.3}  (runs {:?}, {} records; paper MLP-16: 0.0896 / 0.685)", t.mse, t.corr, rep.test_runs, t.n),
                None => println!("test       (no third run to hold out)"),
            }
                println!("written: {}", out.display());
                Ok(())
            })()
        }
        Command::Evaluate {
            train,
            train_runs,
            test,
            test_runs,
            model,
            cost,
            seed,
            resamples,
            confidence_threshold,
            json,
            plot,
        } => (|| {
            let tr = filter_runs(records::read_records(train)?, train_runs, "--train")?;
            let te = filter_runs(records::read_records(test)?, test_runs, "--test")?;
            let model = match model {
                Some(p) => Some((mlp::Mlp::load(p)?, p.display().to_string())),
                None => None,
            };
            if !(0.0..=1.0).contains(confidence_threshold) {
                return Err(speckv::Error::Other(format!(
                    "--confidence-threshold must be in [0, 1], got {confidence_threshold}"
                )));
            }
            if *resamples == 0 {
                return Err(speckv::Error::Other(
                    "--resamples must be positive".to_string(),
                ));
            }
            let cfg = evaluate::EvalConfig {
                resamples: *resamples,
                seed: *seed,
                cost: match cost {
                    Some(p) => controller::CostModel::load(p)?,
                    None => controller::CostModel::assumed(),
                },
                rules: evaluate::RuleParams {
                    confidence_threshold: *confidence_threshold,
                    ..Default::default()
                },
            };
            let rep = evaluate::evaluate(&tr, &te, model, &cfg)?;
            if let Some(p) = plot {
                speckv::controller::plot::plot_evaluation(&rep, p)?;
            }
            if *json {
                json_out(&rep)
            } else {
                print!("{}", evaluate::render(&rep));
                if let Some(p) = plot {
                    println!("plot written: {}", p.display());
                }
                Ok(())
            }
        })(),
        Command::Simulate { alpha, steps, json } => (|| {
            let (table, source, compare) = match (alpha, steps) {
                (Some(a), _) => (
                    simulate::load_alpha(a)?,
                    format!("α from {}", a.display()),
                    false,
                ),
                (None, Some(s)) => (
                    simulate::alpha_from_records(&records::read_records(s)?),
                    format!("α estimated per (compression, γ) from {}", s.display()),
                    false,
                ),
                (None, None) => (
                    simulate::seed_alpha(),
                    "the seed note's α table".to_string(),
                    true,
                ),
            };
            let rows = simulate::table(&table, compare);
            if *json {
                json_out(&rows)
            } else {
                print!("{}", simulate::render(&rows, &source));
                Ok(())
            }
        })(),
        Command::CalibrateDraft {
            model,
            prompts,
            n_prompts,
            tokens,
            max_cost,
            target,
            json,
        } => (|| {
            let (c, _) = speckv::model::read_gguf(model)?;
            let tok = speckv::model::tokenizer::Tokenizer::from_gguf(&c)?;
            let m = speckv::model::Model::load(model, *target)?;
            let ids = speckv::decode::profile::read_prompts(prompts)?
                .iter()
                .take(*n_prompts)
                .map(|p| tok.encode(&speckv::model::tokenizer::Tokenizer::chat_prompt(&p.prompt)))
                .collect::<speckv::Result<Vec<_>>>()?;
            let cal =
                speckv::decode::calibrate::calibrate(&m, &ids, &tok.stop, *tokens, *max_cost)?;
            if *json {
                return json_out(&cal);
            }
            println!(
                "keep layers {:?} ({} of {})",
                cal.keep,
                cal.keep.len(),
                m.cfg.layers
            );
            println!(
                "greedy acceptance per drafted token {:.3} over {} positions; cost {:.3} of the target (weight bytes), measured time ratio {:.3}",
                cal.agreement, cal.positions, cal.cost_ratio, cal.measured_time_ratio
            );
            println!(
                "search path (layers kept, acceptance, cost): {:?}",
                cal.path
                    .iter()
                    .map(|(k, a, c)| format!("({k}, {a:.3}, {c:.3})"))
                    .collect::<Vec<_>>()
            );
            println!(
                "use it: speckv generate --model {} --draft-layers {} …",
                model.display(),
                cal.keep
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Ok(())
        })(),
        Command::Generate {
            model,
            draft,
            draft_layers,
            prompt,
            target,
            policy,
            controller,
            cost,
            max_tokens,
            temperature,
            seed,
            gamma_max,
            json,
        } => (|| {
            use speckv::decode::GenConfig;
            use std::io::Write;
            if !(temperature.is_finite() && *temperature >= 0.0) {
                return Err(speckv::Error::BadTemperature(*temperature));
            }
            let pol = pair::policy_from_name(policy, controller.as_deref(), cost.as_deref())?;
            let p = pair::Pair::load(model, draft.as_deref(), draft_layers.as_deref(), *target)?;
            let ids = p.encode_chat(prompt)?;
            let cfg = GenConfig {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
                gamma_max: *gamma_max,
                compression: p.compression,
            };
            // Stream: after each step, print what the text so far adds (BPE pieces can only be
            // decoded whole, so decode the committed tokens and print the new suffix).
            let mut shown = String::new();
            let mut committed: Vec<u32> = Vec::new();
            let mut stream = |new: &[u32]| {
                if *json {
                    return;
                }
                committed.extend(new.iter().filter(|t| !p.tokenizer.stop.contains(t)));
                if let Ok(text) = p.tokenizer.decode(&committed) {
                    if let Some(rest) = text.strip_prefix(shown.as_str()) {
                        print!("{rest}");
                        let _ = std::io::stdout().flush();
                        shown = text;
                    }
                }
            };
            let stats = match &pol {
                None => speckv::decode::plain_streamed(
                    &p.target,
                    &ids,
                    &p.tokenizer.stop,
                    &cfg,
                    &mut |t| stream(&[t]),
                )?,
                Some(pl) => speckv::decode::speculative_traced(
                    &p.target,
                    &p.draft(),
                    &ids,
                    &p.tokenizer.stop,
                    pl,
                    &cfg,
                    &mut |s| stream(&s.emitted),
                )?,
            };
            let text = p.tokenizer.decode(&stats.tokens)?;
            if *json {
                return json_out(&serde_json::json!({
                    "text": text, "tokens": stats.tokens, "tokens_per_second": stats.tokens_per_second,
                    "acceptance_rate": stats.acceptance_rate, "mean_gamma": stats.mean_gamma,
                    "gamma_histogram": stats.gamma_histogram, "steps": stats.steps, "seconds": stats.seconds,
                    "prefill_seconds": stats.prefill_seconds,
                }));
            }
            if let Some(rest) = text.strip_prefix(shown.as_str()) {
                print!("{rest}");
            }
            println!();
            eprintln!(
                "\n{} tokens in {:.2} s ({:.2} s prefill): {:.2} tokens/s decoding; {} steps, acceptance {:.3}, mean γ {:.2}, γ histogram {:?}",
                stats.tokens.len(),
                stats.seconds,
                stats.prefill_seconds,
                stats.tokens_per_second,
                stats.steps,
                stats.acceptance_rate,
                stats.mean_gamma,
                stats.gamma_histogram
            );
            Ok(())
        })(),
        Command::Profile {
            model,
            draft,
            draft_layers,
            prompts,
            offset,
            per_category,
            out,
            target,
            max_tokens,
            gamma_max,
            temperature,
            seed,
            cost_reps,
        } => (|| {
            use speckv::decode::profile;
            use speckv::decode::{GenConfig, Policy};
            if !(temperature.is_finite() && *temperature >= 0.0) {
                return Err(speckv::Error::BadTemperature(*temperature));
            }
            let chosen = pair::prompts_from_file(prompts, *offset, *per_category)?;
            let p = pair::Pair::load(model, draft.as_deref(), draft_layers.as_deref(), *target)?;
            let cfg = GenConfig {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
                gamma_max: *gamma_max,
                compression: p.compression,
            };
            let bar = progress_bar(chosen.len() as u64, "profiling");
            let mut w = csv::Writer::from_path(out)
                .map_err(|e| speckv::Error::Other(format!("writing {}: {e}", out.display())))?;
            let mut costs = Vec::new();
            let mut runs: std::collections::BTreeMap<String, u32> = Default::default();
            let (mut n_rows, mut n_steps, mut n_tokens) = (0usize, 0usize, 0usize);
            for (index, pr) in &chosen {
                let run = runs.entry(pr.category.clone()).or_insert(0);
                bar.set_message(format!("{} #{run}", pr.category));
                let ids = p.encode_chat(&pr.prompt)?;
                let mut steps = Vec::new();
                let s = speckv::decode::speculative_traced(
                    &p.target,
                    &p.draft(),
                    &ids,
                    &p.tokenizer.stop,
                    &Policy::Fixed(*gamma_max),
                    &cfg,
                    &mut |t| steps.push(t.clone()),
                )?;
                for r in profile::trace_rows(&steps, p.compression, &pr.category, *run, *index)? {
                    w.serialize(r)
                        .map_err(|e| speckv::Error::Other(e.to_string()))?;
                    n_rows += 1;
                }
                n_steps += steps.len();
                n_tokens += s.tokens.len();
                if *cost_reps > 0 {
                    let mut ctx = ids.clone();
                    ctx.extend_from_slice(&s.tokens);
                    costs.push(profile::measure_costs(
                        &p.target,
                        &p.draft(),
                        &ctx,
                        *gamma_max,
                        *cost_reps,
                    )?);
                }
                *run += 1;
                bar.inc(1);
            }
            w.flush().map_err(|source| speckv::Error::Io {
                context: format!("writing {}", out.display()),
                source,
            })?;
            bar.finish_and_clear();
            println!(
                "{} prompts, {n_tokens} tokens, {n_steps} steps at γmax = {gamma_max} → {n_rows} rows in {}",
                chosen.len(),
                out.display()
            );
            if !costs.is_empty() {
                let c = profile::mean_costs(&costs)?;
                let path = out.with_extension("cost.json");
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&c)
                        .map_err(|e| speckv::Error::Other(e.to_string()))?,
                )
                .map_err(|source| speckv::Error::Io {
                    context: format!("writing {}", path.display()),
                    source,
                })?;
                println!(
                    "cost model: draft {:.1} ms/token, verification {:?} ms at γ = 0.. → {}",
                    c.draft_ms_per_token,
                    c.verify_ms
                        .iter()
                        .map(|v| (v * 10.0).round() / 10.0)
                        .collect::<Vec<_>>(),
                    path.display()
                );
            }
            Ok(())
        })(),
        Command::Bench {
            what:
                BenchCommand::Decode {
                    model,
                    draft,
                    draft_layers,
                    prompts,
                    offset,
                    per_category,
                    target,
                    policies,
                    controller,
                    cost,
                    traces,
                    max_tokens,
                    gamma_max,
                    json,
                },
        } => (|| {
            use speckv::decode::profile;
            use speckv::decode::GenConfig;
            let chosen = pair::prompts_from_file(prompts, *offset, *per_category)?;
            let mut pols = Vec::new();
            for name in policies {
                pols.push((
                    name.clone(),
                    pair::policy_from_name(name, controller.as_deref(), cost.as_deref())?,
                ));
            }
            let p = pair::Pair::load(model, draft.as_deref(), draft_layers.as_deref(), *target)?;
            let ids: Vec<Vec<u32>> = chosen
                .iter()
                .map(|(_, pr)| p.encode_chat(&pr.prompt))
                .collect::<speckv::Result<_>>()?;
            let cfg = GenConfig {
                max_tokens: *max_tokens,
                temperature: 0.0,
                seed: 0,
                gamma_max: *gamma_max,
                compression: p.compression,
            };
            let bar = progress_bar((pols.len() * ids.len()) as u64, "decoding");
            let mut started = false;
            let res = pair::bench_decode(&p, &ids, &pols, &cfg, &mut |name, i| {
                bar.set_message(format!("prompt {} {name}", i + 1));
                if started {
                    bar.inc(1);
                }
                started = true;
            })?;
            bar.finish_and_clear();
            // The trace-based oracle and fixed γ under the measured cost model.
            let trace = match (traces, cost) {
                (Some(t), Some(c)) => {
                    let recs = records::read_records(t)?;
                    let cm = controller::CostModel::load(c)?;
                    let steps: Vec<(u32, u32)> = recs
                        .iter()
                        .filter(|r| r.trace_gamma_max == Some(r.gamma))
                        .map(|r| (r.gamma, r.accepted))
                        .collect();
                    let gmax = steps.iter().map(|s| s.0).min().unwrap_or(0);
                    Some(serde_json::json!({
                        "steps": steps.len(),
                        "oracle_tokens_per_second": profile::oracle_tokens_per_second(&steps, &cm),
                        "fixed_tokens_per_second": (1..=gmax).map(|g| (g, profile::fixed_tokens_per_second(&steps, g, &cm))).collect::<std::collections::BTreeMap<_, _>>(),
                    }))
                }
                (Some(_), None) => {
                    return Err(speckv::Error::Other(
                        "--traces needs --cost (the .cost.json speckv profile wrote)".to_string(),
                    ))
                }
                _ => None,
            };
            if *json {
                return json_out(&serde_json::json!({
                    "target": target.name(), "draft": p.draft_name, "prompts": ids.len(),
                    "max_tokens": max_tokens, "policies": res, "traces": trace,
                }));
            }
            println!(
                "target {} ({}), draft {}, {} prompts × ≤ {max_tokens} tokens, greedy; decoding tokens/s (prefill excluded)\n",
                model.display(),
                target.name(),
                p.draft_name,
                ids.len()
            );
            print!("{}", pair::render_bench(&res));
            if let Some(t) = trace {
                println!(
                    "\nfrom the traces (cost model {}): {t}",
                    cost.as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default()
                );
            }
            Ok(())
        })(),
        Command::Quantize {
            format,
            input,
            output,
            double_quant,
            json,
        } => (|| {
            let (out, inp, w) = speckv::weights::quant::read_npy_matrix(input)?;
            let q =
                speckv::weights::quant::QMatrix::quantize(&w, out, inp, *format, *double_quant)?;
            q.save(output)?;
            let err = speckv::weights::quant::relative_rms_error(&w, &q);
            let summary = serde_json::json!({
                "format": format.name(), "shape": [out, inp], "bytes": q.bytes(),
                "bits_per_weight": format.bits_per_weight(out, inp), "relative_rms_error": err,
                "double_quant": double_quant, "output": output.display().to_string(),
            });
            if *json {
                return json_out(&summary);
            }
            println!(
                "{} {out}×{inp}: {} bytes ({:.2} bits/weight), relative RMS error {err:.3e} → {}",
                format.name(),
                q.bytes(),
                format.bits_per_weight(out, inp),
                output.display()
            );
            Ok(())
        })(),
        _ => return None,
    })
}

fn run(cli: Cli) -> speckv::Result<()> {
    if matches!(
        cli.command,
        Command::Generate { .. }
            | Command::Profile { .. }
            | Command::Bench {
                what: BenchCommand::Decode { .. }
            }
    ) && cli.backend == BackendKind::Cuda
    {
        return Err(speckv::Error::Other(
            "generate, profile and bench decode run on the CPU backend only for now (the CUDA forward pass is not written)"
                .to_string(),
        ));
    }
    if let Some(r) = run_offline(&cli.command) {
        return r;
    }
    if let Command::Ptx { arch, out } = &cli.command {
        let ptx = Arch::parse(arch)?.ptx()?;
        return match out {
            Some(path) => std::fs::write(path, ptx).map_err(|source| speckv::Error::Io {
                context: format!("writing {}", path.display()),
                source,
            }),
            None => {
                print!("{ptx}");
                Ok(())
            }
        };
    }
    let backend = Backend::new(cli.backend)?;
    match cli.command {
        Command::Ptx { .. }
        | Command::Train { .. }
        | Command::Evaluate { .. }
        | Command::Simulate { .. }
        | Command::Quantize { .. }
        | Command::Generate { .. }
        | Command::Profile { .. }
        | Command::Bench {
            what: BenchCommand::Decode { .. },
        }
        | Command::CalibrateDraft { .. } => {} // handled by run_offline
        Command::Bench {
            what:
                BenchCommand::Step {
                    out_dir,
                    seconds,
                    json,
                },
        } => {
            if !(seconds > 0.0 && seconds.is_finite()) {
                return Err(speckv::Error::Other(format!(
                    "--seconds must be positive, got {seconds}"
                )));
            }
            let c =
                speckv::weights::regime::step_costs(&backend, Duration::from_secs_f64(seconds))?;
            std::fs::create_dir_all(&out_dir).map_err(|source| speckv::Error::Io {
                context: format!("creating {}", out_dir.display()),
                source,
            })?;
            for (f, model) in &c.regimes {
                let p = out_dir.join(format!("cost_{}.json", f.name()));
                std::fs::write(
                    &p,
                    serde_json::to_string_pretty(model)
                        .map_err(|e| speckv::Error::Other(e.to_string()))?,
                )
                .map_err(|source| speckv::Error::Io {
                    context: format!("writing {}", p.display()),
                    source,
                })?;
            }
            if json {
                json_out(&c)?;
            } else {
                println!(
                    "step costs on {} ({}); draft (1B-shaped, fp16) {:.2} ms per token",
                    c.backend, c.device, c.draft_ms_per_token
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
                println!("(verification ms of the 8B-shaped target at M = γ + 1)\nwritten: {}/cost_{{fp16,int8,nf4}}.json", out_dir.display());
            }
        }
        Command::Bench {
            what: BenchCommand::Overhead { model, json },
        } => {
            let r = speckv::controller::overhead::measure(&backend, model.as_deref())?;
            if json {
                json_out(&r)?;
            } else {
                print!("{}", speckv::controller::overhead::render(&r));
            }
        }
        Command::VerifySim {
            vocab,
            gamma,
            samples,
            seed,
            mode,
            batch,
            json,
        } => {
            let (target, draft) = sim::dirichlet_pair(vocab, gamma, seed)?;
            let r = sim::run(&backend, &target, &draft, samples, seed, mode, batch)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| speckv::Error::Other(e.to_string()))?
                );
            } else {
                println!("verify-sim on {} ({}): vocab {vocab}, γ {gamma}, {samples} sequences, {mode:?}", backend.name(), backend.device());
                if gamma > 0 {
                    println!(
                        "position 0 accepted {:.5} (Σ min(p, q) = {:.5})",
                        r.accepted_first as f64 / samples as f64,
                        r.expected_accepted_first
                    );
                }
                println!(
                    "{:>8} {:>10} {:>12} {:>5} {:>12}",
                    "position", "reached", "χ²", "dof", "crit(1e-4)"
                );
                for i in 0..=gamma {
                    println!(
                        "{i:>8} {:>10} {:>12.2} {:>5} {:>12.2}",
                        r.reached[i],
                        r.chi2[i],
                        r.chi2_dof[i],
                        sim::chi2_critical_1e4(r.chi2_dof[i])
                    );
                }
            }
        }
        Command::Report { json, seconds } => {
            if !(seconds > 0.0 && seconds.is_finite()) {
                return Err(speckv::Error::Other(format!(
                    "--seconds must be positive, got {seconds}"
                )));
            }
            let r = report::build(&backend, Duration::from_secs_f64(seconds))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r)
                        .map_err(|e| speckv::Error::Other(e.to_string()))?
                );
            } else {
                print!("{}", report::render(&r));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("speckv: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The `speckv` command-line tool.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use speckv::ptx::Arch;
use speckv::sim::{self, SimMode};
use speckv::{controller, evaluate, mlp, records, simulate};
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
        format: speckv::quant::Format,
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
        #[arg(long, value_enum, default_value_t = speckv::quant::Format::Fp16)]
        target: speckv::quant::Format,
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
        #[arg(long, value_enum, default_value_t = speckv::quant::Format::Fp16)]
        target: speckv::quant::Format,
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

fn json_out<T: serde::Serialize>(v: &T) -> speckv::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| speckv::Error::Other(e.to_string()))?
    );
    Ok(())
}

fn filter_runs(
    mut r: Vec<speckv::records::StepRecord>,
    runs: &Option<Vec<u32>>,
    what: &str,
) -> speckv::Result<Vec<speckv::records::StepRecord>> {
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
                speckv::plot::plot_evaluation(&rep, p)?;
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
            let tok = speckv::tokenizer::Tokenizer::from_gguf(&c)?;
            let m = speckv::model::Model::load(model, *target)?;
            let text = std::fs::read_to_string(prompts).map_err(|source| speckv::Error::Io {
                context: format!("reading {}", prompts.display()),
                source,
            })?;
            let mut ids = Vec::new();
            for (i, line) in text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(*n_prompts)
                .enumerate()
            {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    speckv::Error::Other(format!("{} line {}: {e}", prompts.display(), i + 1))
                })?;
                let p = v["prompt"].as_str().ok_or_else(|| {
                    speckv::Error::Other(format!(
                        "{} line {}: no \"prompt\"",
                        prompts.display(),
                        i + 1
                    ))
                })?;
                ids.push(tok.encode(&speckv::tokenizer::Tokenizer::chat_prompt(p))?);
            }
            let cal = speckv::calibrate::calibrate(&m, &ids, &tok.stop, *tokens, *max_cost)?;
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
            use speckv::decode::{self, Draft, GenConfig, Policy};
            if !(temperature.is_finite() && *temperature >= 0.0) {
                return Err(speckv::Error::BadTemperature(*temperature));
            }
            let (c, _) = speckv::model::read_gguf(model)?;
            let tok = speckv::tokenizer::Tokenizer::from_gguf(&c)?;
            let m = speckv::model::Model::load(model, *target)?;
            let ids = tok.encode(&speckv::tokenizer::Tokenizer::chat_prompt(prompt))?;
            let compression = match target {
                speckv::quant::Format::Fp16 => records::Compression::Fp16,
                speckv::quant::Format::Int8 => records::Compression::Int8,
                speckv::quant::Format::Nf4 => records::Compression::Nf4,
            };
            let cfg = GenConfig {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
                gamma_max: *gamma_max,
                compression,
            };
            let stats = if policy == "plain" {
                decode::plain(&m, &ids, &tok.stop, &cfg)?
            } else {
                let ctl = match controller {
                    Some(p) => {
                        let cost = match (policy.as_str(), cost) {
                            ("speckv-cost", Some(c)) => Some(controller::CostModel::load(c)?),
                            ("speckv-cost", None) => Some(controller::CostModel::assumed()),
                            _ => None,
                        };
                        Some(controller::Controller::new(
                            mlp::Mlp::load(p)?,
                            &controller::PAPER_CANDIDATES,
                            cost,
                        )?)
                    }
                    None => None,
                };
                let pol = Policy::parse(policy, ctl)?;
                let dm;
                let d = match draft {
                    Some(dp) => {
                        dm = speckv::model::Model::load(dp, speckv::quant::Format::Fp16)?;
                        Draft::Model(&dm)
                    }
                    None => match draft_layers {
                        Some(keep) => {
                            if let Some(l) = keep.iter().find(|&&l| l >= m.cfg.layers) {
                                return Err(speckv::Error::Other(format!(
                                    "--draft-layers: layer {l} does not exist ({} layers)",
                                    m.cfg.layers
                                )));
                            }
                            Draft::SkipLayers(
                                (0..m.cfg.layers).map(|i| keep.contains(&i)).collect(),
                            )
                        }
                        None => Draft::SkipLayers(
                            (0..m.cfg.layers)
                                .map(|i| i == 0 || i + 1 == m.cfg.layers || i % 2 == 0)
                                .collect(),
                        ),
                    },
                };
                decode::speculative(&m, &d, &ids, &tok.stop, &pol, &cfg)?
            };
            let text = tok.decode(&stats.tokens)?;
            if *json {
                return json_out(&serde_json::json!({
                    "text": text, "tokens": stats.tokens, "tokens_per_second": stats.tokens_per_second,
                    "acceptance_rate": stats.acceptance_rate, "mean_gamma": stats.mean_gamma,
                    "gamma_histogram": stats.gamma_histogram, "steps": stats.steps, "seconds": stats.seconds,
                }));
            }
            println!("{text}");
            eprintln!(
                "\n{} tokens in {:.2} s: {:.2} tokens/s; {} steps, acceptance {:.3}, mean γ {:.2}, γ histogram {:?}",
                stats.tokens.len(),
                stats.seconds,
                stats.tokens_per_second,
                stats.steps,
                stats.acceptance_rate,
                stats.mean_gamma,
                stats.gamma_histogram
            );
            Ok(())
        })(),
        Command::Quantize {
            format,
            input,
            output,
            double_quant,
            json,
        } => (|| {
            let (out, inp, w) = speckv::quant::read_npy_matrix(input)?;
            let q = speckv::quant::QMatrix::quantize(&w, out, inp, *format, *double_quant)?;
            q.save(output)?;
            let err = speckv::quant::relative_rms_error(&w, &q);
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
    if matches!(cli.command, Command::Generate { .. }) && cli.backend == BackendKind::Cuda {
        return Err(speckv::Error::Other(
            "generate runs on the CPU backend only for now (the CUDA forward pass is not written)"
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
            let c = speckv::regime::step_costs(&backend, Duration::from_secs_f64(seconds))?;
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
            let r = speckv::overhead::measure(&backend, model.as_deref())?;
            if json {
                json_out(&r)?;
            } else {
                print!("{}", speckv::overhead::render(&r));
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

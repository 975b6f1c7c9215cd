//! The `speckv` command-line tool.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use speckv::ptx::Arch;
use speckv::sim::{self, SimMode};
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

fn run(cli: Cli) -> speckv::Result<()> {
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
        Command::Ptx { .. } => {}
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

//! The `speckv` command-line tool.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use speckv::ptx::Arch;
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
        Command::Ptx { .. } => unreachable!("handled above"),
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

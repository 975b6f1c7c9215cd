//! The `speckv` command-line tool.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use speckv::{report, Backend, BackendKind};

#[derive(Parser)]
#[command(name = "speckv", version, about = "Speculative decoding with an adaptive speculation length γ")]
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
        #[arg(long, default_value_t = 0.5)]
        seconds: f64,
    },
}

fn run(cli: Cli) -> speckv::Result<()> {
    let backend = Backend::new(cli.backend)?;
    match cli.command {
        Command::Report { json, seconds } => {
            if !(seconds > 0.0 && seconds.is_finite()) {
                return Err(speckv::Error::Other(format!("--seconds must be positive, got {seconds}")));
            }
            let r = report::build(&backend, Duration::from_secs_f64(seconds))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(|e| speckv::Error::Other(e.to_string()))?);
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

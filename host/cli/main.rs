//! The `speckv` command-line tool: one module per command, in the order the data flows (statistics
//! and verification kernels → the γ controller → weight regimes → real models → benchmarks).

mod args;
mod bench;
mod bench_batch;
mod calibrate;
mod evaluate;
mod generate;
mod logits;
mod plan;
mod profile;
mod ptx;
mod quantize;
mod report;
mod simulate;
mod train;
mod verify_sim;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use speckv::BackendKind;

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
    Report(report::Args),
    /// Speculative sampling on seeded Dirichlet distributions through the verification kernel:
    /// emitted-token counts per position, to check that the output follows the target exactly.
    VerifySim(verify_sim::Args),
    /// Train the 6 → 16 → 1 acceptance predictor on step records (validation and test split by
    /// prompt run); prints train / validation / test MSE and correlation.
    Train(train::Args),
    /// Evaluate γ policies on step records: the paper's method and the honest (measured outcomes
    /// only) method, with paired bootstrap intervals.
    Evaluate(evaluate::Args),
    /// The seed note's table: expected tokens per step E(α, γ) by γ and compression, best γ, gain
    /// over fixed-4.
    Simulate(simulate::Args),
    /// Quantise a float32 .npy matrix to FP16, INT8 or NF4 safetensors.
    Quantize(quantize::Args),
    /// Generate text with speculative decoding (the CPU forward pass, or speckv's device pass with
    /// --backend cuda): streams the text, then tokens/s, acceptance, mean γ and the γ histogram.
    Generate(generate::Args),
    /// Full-information traces: every step drafts γmax tokens and verifies all, recording the
    /// outcome of every γ ≤ γmax (same random numbers), the draft features (prefix and lagged) and
    /// measured times; writes the CSV (paper schema and more) and OUT.cost.json.
    Profile(profile::Args),
    /// Choose the layers of a self-speculative draft: greedy layer removal maximising measured
    /// greedy acceptance until the draft costs at most --max-cost of the target per token.
    CalibrateDraft(calibrate::Args),
    /// Next-token logits on given token ids, raw f32 (the teacher-forced comparison with
    /// llama.cpp in scripts/llamacpp_peer.py).
    Logits(logits::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::Command,
    },
    /// Write the embedded PTX of every kernel (entry points in docs/kernels.md).
    Ptx(ptx::Args),
    /// The launch a kernel gets for a shape: entry point, grid, block, shared bytes, blocks per
    /// SM (exactly what the backends launch).
    Plan(plan::Args),
}

fn run(cli: Cli) -> speckv::Result<()> {
    let backend = cli.backend;
    match cli.command {
        Command::Report(a) => report::run(a, backend),
        Command::VerifySim(a) => verify_sim::run(a, backend),
        Command::Train(a) => train::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Simulate(a) => simulate::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Generate(a) => generate::run(a, backend),
        Command::Profile(a) => profile::run(a, backend),
        Command::CalibrateDraft(a) => calibrate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Bench { what } => bench::run(what, backend),
        Command::Ptx(a) => ptx::run(a),
        Command::Plan(a) => plan::run(a, backend),
    }
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

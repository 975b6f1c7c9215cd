//! `speckv verify-sim`: losslessness of the verification kernel measured on seeded Dirichlet
//! distributions (χ² of the emitted tokens per position against the target).

use speckv::measure::verify_sim::{self, SimMode};
use speckv::{Backend, BackendKind};

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args, backend: BackendKind) -> speckv::Result<()> {
    let backend = Backend::new(backend)?;
    // Every size is checked before anything is allocated.
    verify_sim::check_sizes(
        a.vocab,
        a.gamma,
        a.batch.min(a.samples.min(usize::MAX as u64) as usize),
    )?;
    let (target, draft) = verify_sim::dirichlet_pair(a.vocab, a.gamma, a.seed)?;
    let r = verify_sim::run(
        &backend, &target, &draft, a.samples, a.seed, a.mode, a.batch,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| speckv::Error::Other(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "verify-sim on {} ({}): vocab {}, γ {}, {} sequences, {:?}",
        backend.name(),
        backend.device(),
        a.vocab,
        a.gamma,
        a.samples,
        a.mode
    );
    if a.gamma > 0 {
        println!(
            "position 0 accepted {:.5} (Σ min(p, q) = {:.5})",
            r.accepted_first as f64 / a.samples as f64,
            r.expected_accepted_first
        );
    }
    println!(
        "{:>8} {:>10} {:>12} {:>5} {:>12}",
        "position", "reached", "χ²", "dof", "crit(1e-4)"
    );
    for i in 0..=a.gamma {
        println!(
            "{i:>8} {:>10} {:>12.2} {:>5} {:>12.2}",
            r.reached[i],
            r.chi2[i],
            r.chi2_dof[i],
            verify_sim::chi2_critical_1e4(r.chi2_dof[i])
        );
    }
    Ok(())
}

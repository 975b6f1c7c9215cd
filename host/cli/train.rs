//! `speckv train`: the 6 → 16 → 1 acceptance predictor on step records, or (`--hazard`) the
//! per-token hazard model of the `auto` policy on `speckv profile`'s traces.

use std::path::PathBuf;

use speckv::controller::{hazard, mlp, records};

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    /// Step records (CSV); with `--hazard`, trace rows of `speckv profile` (one or more files,
    /// e.g. one per weight regime).
    #[arg(long, required = true, num_args = 1..)]
    steps: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Train the hazard model P(draft j accepted | drafts before it accepted) of `--policy auto`.
    #[arg(long)]
    hazard: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let cfg = mlp::TrainConfig {
        seed: a.seed,
        ..Default::default()
    };
    let (rep, what) = if a.hazard {
        let mut rows = Vec::new();
        for p in &a.steps {
            rows.extend(hazard::read_trace_rows(p)?);
        }
        let ex = hazard::examples(&rows)?;
        let (tr, va, te) = mlp::split_groups(ex.iter().map(|e| e.group))?;
        let (m, rep) = mlp::train_examples(&ex, &tr, &va, &te, cfg)?;
        let files: Vec<String> = a.steps.iter().map(|p| p.display().to_string()).collect();
        let model = hazard::HazardModel {
            mlp: m,
            source: format!(
                "speckv train --hazard --seed {} --steps {} (runs {tr:?} train, {va:?} validation, {te:?} test)",
                a.seed,
                files.join(" ")
            ),
        };
        model.save(&a.out)?;
        (rep, "drafts")
    } else {
        let mut records = Vec::new();
        for p in &a.steps {
            records.extend(records::read_records(p)?);
        }
        let (tr, va, te) = mlp::split_by_run(&records)?;
        let (m, rep) = mlp::train(&records, &tr, &va, &te, cfg)?;
        m.save(&a.out)?;
        (rep, "records")
    };
    if a.json {
        return json_out(&rep);
    }
    println!(
        "trained on runs {:?} ({} {what}), early-stopped on runs {:?} at epoch {} of {}",
        rep.train_runs, rep.train.n, rep.val_runs, rep.best_epoch, rep.epochs_run
    );
    println!(
        "train      MSE {:.4}  corr {:.3}",
        rep.train.mse, rep.train.corr
    );
    println!(
        "validation MSE {:.4}  corr {:.3}",
        rep.val.mse, rep.val.corr
    );
    match rep.test {
        Some(t) if a.hazard => println!(
            "test       MSE {:.4}  corr {:.3}  (runs {:?}, {} drafts)",
            t.mse, t.corr, rep.test_runs, t.n
        ),
        Some(t) => println!(
            "test       MSE {:.4}  corr {:.3}  (runs {:?}, {} records; paper MLP-16: 0.0896 / 0.685)",
            t.mse, t.corr, rep.test_runs, t.n
        ),
        None => println!("test       (no third run to hold out)"),
    }
    println!("written: {}", a.out.display());
    Ok(())
}

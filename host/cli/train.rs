//! `speckv train`: the 6 → 16 → 1 acceptance predictor on step records, or (`--hazard`) the
//! per-token hazard model of the `auto` policy on `speckv profile`'s traces or an engine's draft
//! records.

use std::path::PathBuf;

use speckv::controller::{hazard, hazard_training, mlp, records};

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    /// Step records (CSV); with `--hazard`, trace rows of `speckv profile` or an engine's draft
    /// records (columns run, step, position, entropy, confidence, compression, accepted; see
    /// docs/tuning.md), one or more files (e.g. one per weight regime), told apart by their header.
    #[arg(long, required = true, num_args = 1..)]
    steps: Vec<PathBuf>,
    /// With `--hazard`: trace rows of other prompts to test on (e.g. `speckv profile --offset 5`'s,
    /// prompts the training traces do not hold). Then every run of `--steps` but the last trains
    /// and the last validates; without it, the last run of `--steps` is the test.
    #[arg(long, num_args = 1..)]
    test_steps: Vec<PathBuf>,
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
    if !a.test_steps.is_empty() && !a.hazard {
        return Err(speckv::Error::Other(
            "--test-steps tests a hazard model: it needs --hazard".to_string(),
        ));
    }
    let cfg = mlp::TrainConfig {
        seed: a.seed,
        ..Default::default()
    };
    let (rep, what) = if a.hazard {
        let read = |files: &[PathBuf]| -> speckv::Result<Vec<mlp::Example>> {
            let mut ex = Vec::new();
            for p in files {
                ex.extend(hazard_training::read_examples(p)?);
            }
            Ok(ex)
        };
        let mut ex = read(&a.steps)?;
        let (tr, va, te) = if a.test_steps.is_empty() {
            mlp::split_groups(ex.iter().map(|e| e.group))?
        } else {
            // Every run of --steps but the last trains, the last validates (split_groups
            // refuses fewer than two, so the split leaves one at least to train on).
            let (mut tr, va, te) = mlp::split_groups(ex.iter().map(|e| e.group))?;
            tr.extend(va);
            tr.extend(te);
            let va = tr.split_off(tr.len() - 1);
            // The held-out traces' runs are numbered after the training traces' so the splits
            // stay apart.
            let too_large = |run: u32| {
                speckv::Error::Other(format!(
                    "run {run}: too large to number the --test-steps runs after it"
                ))
            };
            let base = va[0].checked_add(1).ok_or_else(|| too_large(va[0]))?;
            let mut held = read(&a.test_steps)?;
            for e in &mut held {
                e.group = base
                    .checked_add(e.group)
                    .ok_or_else(|| too_large(e.group))?;
            }
            let mut te: Vec<u32> = held.iter().map(|e| e.group).collect();
            te.sort_unstable();
            te.dedup();
            ex.append(&mut held);
            (tr, va, te)
        };
        let (m, rep) = mlp::train_examples(&ex, &tr, &va, &te, cfg)?;
        let names = |files: &[PathBuf]| {
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let test = if a.test_steps.is_empty() {
            format!("{te:?} test")
        } else {
            format!("tested on --test-steps {}", names(&a.test_steps))
        };
        let model = hazard::HazardModel {
            mlp: m,
            source: format!(
                "speckv train --hazard --seed {} --steps {} (runs {tr:?} train, {va:?} validation, {test})",
                a.seed,
                names(&a.steps)
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
            "test       MSE {:.4}  corr {:.3}  ({}, {} drafts)",
            t.mse,
            t.corr,
            if a.test_steps.is_empty() {
                format!("runs {:?}", rep.test_runs)
            } else {
                "--test-steps".to_string()
            },
            t.n
        ),
        Some(t) => println!(
            "test       MSE {:.4}  corr {:.3}  (runs {:?}, {} records; paper MLP-16: 0.0896 / 0.685)",
            t.mse, t.corr, rep.test_runs, t.n
        ),
        None => println!("test       (no third run to hold out)"),
    }
    println!("written: {}", a.out.display());
    if a.hazard {
        println!(
            "use it: --hazard {} (generate, bench decode, bench batch, bench predict), \
             speckv_load_hazard in the C ABI, Context.load_hazard in Python",
            a.out.display()
        );
    }
    Ok(())
}

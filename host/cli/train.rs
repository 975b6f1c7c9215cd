//! `speckv train`: the 6 → 16 → 1 acceptance predictor on step records.

use std::path::PathBuf;

use speckv::controller::{mlp, records};

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    steps: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let records = records::read_records(&a.steps)?;
    let (tr, va, te) = mlp::split_by_run(&records)?;
    let (m, rep) = mlp::train(
        &records,
        &tr,
        &va,
        &te,
        mlp::TrainConfig {
            seed: a.seed,
            ..Default::default()
        },
    )?;
    m.save(&a.out)?;
    if a.json {
        return json_out(&rep);
    }
    println!(
        "trained on runs {:?} ({} records), early-stopped on runs {:?} at epoch {} of {}",
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
        Some(t) => println!(
            "test       MSE {:.4}  corr {:.3}  (runs {:?}, {} records; paper MLP-16: 0.0896 / 0.685)",
            t.mse, t.corr, rep.test_runs, t.n
        ),
        None => println!("test       (no third run to hold out)"),
    }
    println!("written: {}", a.out.display());
    Ok(())
}

//! `speckv evaluate`: γ policies on step records, by the paper's method and the honest one.

use std::path::PathBuf;

use speckv::controller::records::{self, StepRecord};
use speckv::controller::{self, evaluate, mlp};
use speckv::Error;

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
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
}

fn filter_runs(
    mut r: Vec<StepRecord>,
    runs: &Option<Vec<u32>>,
    what: &str,
) -> speckv::Result<Vec<StepRecord>> {
    if let Some(runs) = runs {
        r.retain(|x| runs.contains(&x.run));
        if r.is_empty() {
            return Err(Error::Other(format!("{what}: no records in runs {runs:?}")));
        }
    }
    Ok(r)
}

pub fn run(a: Args) -> speckv::Result<()> {
    let tr = filter_runs(records::read_records(&a.train)?, &a.train_runs, "--train")?;
    let te = filter_runs(records::read_records(&a.test)?, &a.test_runs, "--test")?;
    let model = match &a.model {
        Some(p) => Some((mlp::Mlp::load(p)?, p.display().to_string())),
        None => None,
    };
    if !(0.0..=1.0).contains(&a.confidence_threshold) {
        return Err(Error::Other(format!(
            "--confidence-threshold must be in [0, 1], got {}",
            a.confidence_threshold
        )));
    }
    if a.resamples == 0 {
        return Err(Error::Other("--resamples must be positive".to_string()));
    }
    let cfg = evaluate::EvalConfig {
        resamples: a.resamples,
        seed: a.seed,
        cost: match &a.cost {
            Some(p) => controller::CostModel::load(p)?,
            None => controller::CostModel::assumed(),
        },
        rules: evaluate::RuleParams {
            confidence_threshold: a.confidence_threshold,
            ..Default::default()
        },
    };
    let rep = evaluate::evaluate(&tr, &te, model, &cfg)?;
    if let Some(p) = &a.plot {
        speckv::controller::plot::plot_evaluation(&rep, p)?;
    }
    if a.json {
        return json_out(&rep);
    }
    print!("{}", evaluate::render(&rep));
    if let Some(p) = &a.plot {
        println!("plot written: {}", p.display());
    }
    Ok(())
}

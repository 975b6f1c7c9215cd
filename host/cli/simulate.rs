//! `speckv simulate`: the seed note's expected-tokens table from its own formula.

use std::path::PathBuf;

use speckv::controller::{records, simulate};

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    /// α table as JSON ({"FP16": {"1": 0.82, …}, …}); default: the seed note's.
    #[arg(long, conflicts_with = "steps")]
    alpha: Option<PathBuf>,
    /// Estimate α per (compression, γ) from step records instead.
    #[arg(long)]
    steps: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let (table, source, compare) = match (&a.alpha, &a.steps) {
        (Some(p), _) => (
            simulate::load_alpha(p)?,
            format!("α from {}", p.display()),
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
    if a.json {
        return json_out(&rows);
    }
    print!("{}", simulate::render(&rows, &source));
    Ok(())
}

//! `speckv report`: backend, device, PTX built, kernel throughput, regime table.

use speckv::measure::report;
use speckv::{Backend, BackendKind};

use crate::args::{check_seconds, json_out};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Seconds of measurement per case.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    seconds: f64,
}

pub fn run(a: Args, backend: BackendKind) -> speckv::Result<()> {
    let seconds = check_seconds(a.seconds)?;
    let backend = Backend::new(backend)?;
    let r = report::build(&backend, seconds)?;
    if a.json {
        json_out(&r)
    } else {
        print!("{}", report::render(&r));
        Ok(())
    }
}

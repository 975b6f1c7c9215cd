//! `speckv calibrate-draft`: the layers of a self-speculative draft, by greedy layer removal under
//! a weight-cost bound.

use std::path::PathBuf;

use speckv::model::tokenizer::Tokenizer;
use speckv::weights::Regime;

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// JSON lines with a "prompt" field (default: prompts/prompts.jsonl).
    #[arg(long, default_value = "prompts/prompts.jsonl")]
    prompts: PathBuf,
    /// How many prompts to use (the first N).
    #[arg(long, default_value_t = 4)]
    n_prompts: usize,
    #[arg(long, default_value_t = 24)]
    tokens: usize,
    #[arg(long, default_value_t = 1.0 / 3.0)]
    max_cost: f64,
    #[arg(long, value_enum, default_value_t = Regime::Gguf)]
    target: Regime,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let (c, _) = speckv::model::read_gguf(&a.model)?;
    let tok = Tokenizer::from_gguf(&c)?;
    let m = speckv::model::Model::load(&a.model, a.target)?;
    let ids = speckv::decode::profile::read_prompts(&a.prompts)?
        .iter()
        .take(a.n_prompts)
        .map(|p| tok.encode(&Tokenizer::chat_prompt(&p.prompt)))
        .collect::<speckv::Result<Vec<_>>>()?;
    let cal = speckv::decode::calibrate::calibrate(&m, &ids, &tok.stop, a.tokens, a.max_cost)?;
    if a.json {
        return json_out(&cal);
    }
    println!(
        "keep layers {:?} ({} of {})",
        cal.keep,
        cal.keep.len(),
        m.cfg.layers
    );
    println!(
        "greedy acceptance per drafted token {:.3} over {} positions; cost {:.3} of the target (weight bytes), measured time ratio {:.3}",
        cal.agreement, cal.positions, cal.cost_ratio, cal.measured_time_ratio
    );
    println!(
        "search path (layers kept, acceptance, cost): {:?}",
        cal.path
            .iter()
            .map(|(k, a, c)| format!("({k}, {a:.3}, {c:.3})"))
            .collect::<Vec<_>>()
    );
    println!(
        "use it: speckv generate --model {} --draft-layers {} …",
        a.model.display(),
        cal.keep
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

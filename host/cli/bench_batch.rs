//! `speckv bench batch`: batched decoding against one prompt at a time, same backend, same run.

use std::path::PathBuf;

use speckv::decode::batch::bench;
use speckv::decode::{pair, GenConfig};
use speckv::BackendKind;

use crate::args::{json_out, progress_bar, CatchUpArgs, ModelArgs};

#[derive(clap::Args)]
pub struct BatchArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[arg(long, default_value = "prompts/prompts.jsonl")]
    prompts: PathBuf,
    #[arg(long, default_value_t = 5)]
    offset: usize,
    /// Prompts per category; the batches take them round-robin over the categories, so a batch of
    /// b holds the first b of that order.
    #[arg(long, default_value_t = 4)]
    per_category: usize,
    /// Sequences decoded together (1 to 16; speculative policies up to 8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batch_sizes: Vec<usize>,
    /// Comma-separated: plain, auto, auto-nogate, fixed:N, every:N:G (G drafts every N-th step),
    /// speckv, confidence:P, hf-dynamic, heuristic, adaedl[:LAMBDA[:KAPPA]] (`auto` batched
    /// decides for the batch; alone, per sequence).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,auto,fixed:3,heuristic"
    )]
    policies: Vec<String>,
    /// Predictor for speckv (from `speckv train`); default: the shipped one.
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Hazard model for auto and auto-nogate (from `speckv train --hazard`); default: the
    /// shipped one.
    #[arg(long)]
    hazard: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Capped per batch size at 16 / b − 1 (a verification of every sequence is one step of 16
    /// rows); the one-at-a-time runs use the same cap.
    #[arg(long, default_value_t = 8)]
    gamma_max: u32,
    #[command(flatten)]
    catch_up: CatchUpArgs,
    #[arg(long)]
    json: bool,
}

pub fn run(a: BatchArgs, backend: BackendKind) -> speckv::Result<()> {
    let files = speckv::decode::PolicyFiles {
        controller: a.controller.as_deref(),
        hazard: a.hazard.as_deref(),
        cost: None,
    };
    files.check_hazard_used(a.policies.iter().map(String::as_str))?;
    let mut pols = Vec::new();
    for name in &a.policies {
        pols.push((
            name.clone(),
            speckv::decode::policy_from_name(name, &files)?,
        ));
    }
    let chosen = pair::prompts_from_file(&a.prompts, a.offset, a.per_category)?;
    // Round-robin over the categories: a batch mixes them.
    let mut cats: Vec<&str> = chosen.iter().map(|(_, p)| p.category.as_str()).collect();
    cats.dedup();
    let mut order = Vec::new();
    for k in 0..a.per_category {
        for c in &cats {
            if let Some((_, p)) = chosen.iter().filter(|(_, p)| p.category == *c).nth(k) {
                order.push(p.prompt.clone());
            }
        }
    }
    let p = a.models.load()?;
    let device = speckv::decode::device::Device::open(backend, &p.target, p.draft_model())?;
    let pool = order
        .iter()
        .map(|q| p.encode_chat(q))
        .collect::<speckv::Result<Vec<_>>>()?;
    let cfg = GenConfig {
        max_tokens: a.max_tokens,
        temperature: 0.0,
        seed: 0,
        gamma_max: a.gamma_max,
        compression: p.compression,
        draft_catch_up: a.catch_up.window(),
    };
    let bar = progress_bar((pols.len() * a.batch_sizes.len()) as u64, "decoding");
    let mut started = false;
    let rows = bench::bench_batches(
        &p,
        &device,
        &pool,
        &a.batch_sizes,
        &pols,
        &cfg,
        &mut |name, b| {
            bar.set_message(format!("batch {b} {name}"));
            if started {
                bar.inc(1);
            }
            started = true;
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        return json_out(&serde_json::json!({
            "target": a.models.target.name(), "draft": p.draft_name, "backend": device.name(),
            "max_tokens": a.max_tokens, "rows": rows,
        }));
    }
    println!(
        "target {} ({}), draft {}, backend {}, ≤ {} tokens per prompt, greedy; decoding tokens/s \
         (prefill excluded) of b prompts decoded together and of the same prompts one at a time\n",
        a.models.model.display(),
        a.models.target.name(),
        p.draft_name,
        device.name(),
        a.max_tokens
    );
    print!("{}", bench::render(&rows));
    Ok(())
}

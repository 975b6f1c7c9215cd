//! `speckv profile`: full-information traces (every γ ≤ γmax measured on the same random numbers)
//! and a cost model measured on this machine.

use std::collections::BTreeMap;
use std::path::PathBuf;

use speckv::decode::{pair, profile, GenConfig, Policy};
use speckv::{BackendKind, Error};

use crate::args::{check_temperature, progress_bar, write_json, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    models: ModelArgs,
    /// JSON lines {"category": …, "prompt": …}.
    #[arg(long, default_value = "prompts/prompts.jsonl")]
    prompts: PathBuf,
    /// Take prompts OFFSET..OFFSET+PER_CATEGORY of every category.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    #[arg(long, default_value_t = 10)]
    per_category: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    gamma_max: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repetitions of each cost measurement per prompt (0: no cost model).
    #[arg(long, default_value_t = 1)]
    cost_reps: usize,
}

pub fn run(a: Args, backend: BackendKind) -> speckv::Result<()> {
    check_temperature(a.temperature)?;
    let chosen = pair::prompts_from_file(&a.prompts, a.offset, a.per_category)?;
    let p = a.models.load()?;
    let device = speckv::decode::device::Device::open(backend, &p.target, p.draft_model())?;
    let cfg = GenConfig {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        gamma_max: a.gamma_max,
        compression: p.compression,
        // Traces draft every step (a fixed γ): the draft never lags.
        draft_catch_up: None,
    };
    let bar = progress_bar(chosen.len() as u64, "profiling");
    let mut w = csv::Writer::from_path(&a.out)
        .map_err(|e| Error::Other(format!("writing {}: {e}", a.out.display())))?;
    let mut costs = Vec::new();
    let mut runs: BTreeMap<String, u32> = Default::default();
    let (mut n_rows, mut n_steps, mut n_tokens) = (0usize, 0usize, 0usize);
    for (index, pr) in &chosen {
        let run = runs.entry(pr.category.clone()).or_insert(0);
        bar.set_message(format!("{} #{run}", pr.category));
        let ids = p.encode_chat(&pr.prompt)?;
        let mut steps = Vec::new();
        // The decode (γmax drafts past the last token), then the cost measurements on the
        // decoded context: a verification of γmax + 1 positions, draft feeds of up to
        // DRAFT_CATCH_UP tokens.
        let past = (cfg.gamma_max as usize + 2).max(speckv::decode::DRAFT_CATCH_UP);
        let room = ids.len() + cfg.max_tokens + past;
        let (mut tp, mut dp) = device.passes(&p.target, p.draft_model(), p.draft_mask(), room)?;
        let s = speckv::decode::speculative_on(
            tp.as_mut(),
            dp.as_mut(),
            &ids,
            &p.tokenizer.stop,
            &Policy::Fixed(a.gamma_max),
            &cfg,
            &mut |t| steps.push(t.clone()),
        )?;
        for r in profile::trace_rows(&steps, p.compression, &pr.category, *run, *index)? {
            w.serialize(r).map_err(|e| Error::Other(e.to_string()))?;
            n_rows += 1;
        }
        n_steps += steps.len();
        n_tokens += s.tokens.len();
        if a.cost_reps > 0 {
            let mut ctx = ids.clone();
            ctx.extend_from_slice(&s.tokens);
            costs.push(profile::measure_costs_on(
                tp.as_mut(),
                dp.as_mut(),
                &ctx,
                a.gamma_max,
                a.cost_reps,
            )?);
        }
        *run += 1;
        bar.inc(1);
    }
    w.flush().map_err(|source| Error::Io {
        context: format!("writing {}", a.out.display()),
        source,
    })?;
    bar.finish_and_clear();
    println!(
        "{} prompts, {n_tokens} tokens, {n_steps} steps at γmax = {} → {n_rows} rows in {}",
        chosen.len(),
        a.gamma_max,
        a.out.display()
    );
    if !costs.is_empty() {
        let c = profile::mean_costs(&costs)?;
        let path = a.out.with_extension("cost.json");
        write_json(&path, &c)?;
        println!(
            "cost model: draft {:.1} ms/token, verification {:?} ms at γ = 0.. → {}",
            c.draft_ms_per_token,
            c.verify_ms
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            path.display()
        );
    }
    Ok(())
}

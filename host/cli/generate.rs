//! `speckv generate`: speculative (or plain) decoding of a prompt, streamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use speckv::decode::batch::BatchStep;
use speckv::decode::{pair, GenConfig, StepTrace};
use speckv::{BackendKind, Error};

use crate::args::{check_temperature, json_out, CatchUpArgs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    models: ModelArgs,
    /// The prompt. Given several times (up to 16), the prompts are decoded together as one
    /// batch (one product per weight matrix and step for all of them, on any backend), each with
    /// its own γ per step (`auto` decides for the batch: its sequences draft in lockstep).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// auto (the default: per-token stopping by the shipped hazard model, costs measured while
    /// decoding — no other flag needed), auto-nogate (auto without its plain-step gate: every
    /// step drafts), fixed:N, every:N:G (G drafts every N-th step, plain
    /// steps between), speckv, speckv-cost, confidence:P (llama.cpp's --draft-p-min), hf-dynamic
    /// (HF's confidence threshold 0.4), heuristic (HF's +2/−1), adaedl[:LAMBDA[:KAPPA]], or
    /// plain (no draft).
    #[arg(long, default_value = "auto")]
    policy: String,
    /// Predictor for speckv / speckv-cost (from `speckv train`); without it, the one shipped with
    /// speckv (trained on the Qwen2.5-Coder pair's traces of every regime).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Hazard model for auto and auto-nogate (from `speckv train --hazard`); default: the
    /// shipped one.
    #[arg(long)]
    hazard: Option<PathBuf>,
    /// Cost model for speckv-cost (from `speckv bench step`); for auto, the prior its online
    /// costs start from.
    #[arg(long)]
    cost: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most drafts per step; default 8, and with several prompts at most 16 / prompts − 1 (a
    /// verification of every sequence is one step of 16 rows; a larger value given is an error).
    #[arg(long)]
    gamma_max: Option<u32>,
    #[command(flatten)]
    catch_up: CatchUpArgs,
    /// Write one CSV row per sequence and speculative step: step, sequence, gamma (drafts
    /// verified), accepted, verify_positions (positions per sequence of the step's verification
    /// pass), draft_passes, draft_tokens (tokens fed to the draft, its catch-up included),
    /// first_feed_tokens and first_feed_seconds (the step's first draft pass: the pending token,
    /// any backlog; empty when the phase ran as one), draft_seconds, verify_seconds (a batch's
    /// passes and times are the whole batch's). Shows what the policy decided and what each step
    /// cost; plain decoding has no such steps.
    #[arg(long)]
    step_log: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// A row of `--step-log`.
#[derive(serde::Serialize)]
struct StepRow {
    step: u64,
    sequence: usize,
    gamma: i64,
    accepted: i64,
    verify_positions: usize,
    draft_passes: usize,
    draft_tokens: usize,
    first_feed_tokens: usize,
    /// Empty when the first feed was not timed apart (a draft phase run as one).
    first_feed_seconds: Option<f64>,
    draft_seconds: f64,
    verify_seconds: f64,
}

/// `--step-log`'s writer. The decoding loops call their observers without a way to fail, so the
/// first error is kept and reported when the decode ends.
struct StepLog {
    w: csv::Writer<std::fs::File>,
    path: PathBuf,
    err: Option<csv::Error>,
}

impl StepLog {
    fn create(path: &Path) -> speckv::Result<StepLog> {
        let w = csv::Writer::from_path(path)
            .map_err(|e| Error::Other(format!("writing {}: {e}", path.display())))?;
        let path = path.to_path_buf();
        Ok(StepLog { w, path, err: None })
    }

    fn row(&mut self, r: StepRow) {
        if self.err.is_none() {
            self.err = self.w.serialize(r).err();
        }
    }

    /// A single sequence's step.
    fn single(&mut self, step: u64, t: &StepTrace) {
        self.row(StepRow {
            step,
            sequence: 0,
            gamma: t.gamma.into(),
            accepted: t.accepted.into(),
            verify_positions: t.gamma as usize + 1,
            draft_passes: t.draft.passes,
            draft_tokens: t.draft_tokens,
            first_feed_tokens: t.draft.first_tokens,
            first_feed_seconds: (t.draft.first_passes > 0).then_some(t.draft.first_seconds),
            draft_seconds: t.draft.seconds,
            verify_seconds: t.verify_seconds,
        });
    }

    /// A batched step: a row for every sequence that was still decoding.
    fn batch(&mut self, s: &BatchStep<'_>) {
        for (i, _) in s.active.iter().enumerate().filter(|(_, &a)| a) {
            self.row(StepRow {
                step: s.step,
                sequence: i,
                gamma: s.gammas[i].into(),
                accepted: s.accepted[i].into(),
                verify_positions: s.verify_positions,
                draft_passes: s.draft.passes,
                draft_tokens: s.draft_tokens[i],
                first_feed_tokens: s.first_tokens[i],
                first_feed_seconds: (s.draft.first_passes > 0).then_some(s.draft.first_seconds),
                draft_seconds: s.draft.seconds,
                verify_seconds: s.verify_seconds,
            });
        }
    }

    fn finish(mut self) -> speckv::Result<()> {
        let context = format!("writing {}", self.path.display());
        if let Some(e) = self.err {
            return Err(Error::Other(format!("{context}: {e}")));
        }
        self.w
            .flush()
            .map_err(|source| Error::Io { context, source })
    }
}

pub fn run(a: Args, backend: BackendKind) -> speckv::Result<()> {
    check_temperature(a.temperature)?;
    let files = speckv::decode::PolicyFiles {
        controller: a.controller.as_deref(),
        cost: a.cost.as_deref(),
        hazard: a.hazard.as_deref(),
    };
    files.check_hazard_used(std::iter::once(a.policy.as_str()))?;
    let pol = speckv::decode::policy_from_name(&a.policy, &files)?;
    if pol.is_none() && a.step_log.is_some() {
        return Err(Error::Other(
            "--step-log records speculative steps; `--policy plain` makes none".into(),
        ));
    }
    let p = a.models.load()?;
    let device = speckv::decode::device::Device::open(backend, &p.target, p.draft_model())?;
    let cfg = GenConfig {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        gamma_max: a
            .gamma_max
            .unwrap_or_else(|| speckv::decode::batch::batch_gamma(8, a.prompt.len())),
        compression: p.compression,
        draft_catch_up: a.catch_up.window(),
    };
    let mut log = a.step_log.as_deref().map(StepLog::create).transpose()?;
    if a.prompt.len() > 1 {
        run_batch(&a, &p, &device, pol.as_ref(), &cfg, log.as_mut())?;
        return log.map_or(Ok(()), StepLog::finish);
    }
    let ids = p.encode_chat(&a.prompt[0])?;
    // Stream: after each step, print what the text so far adds (BPE pieces can only be decoded
    // whole, so decode the committed tokens and print the new suffix).
    let mut shown = String::new();
    let mut committed: Vec<u32> = Vec::new();
    let json = a.json;
    let mut stream = |new: &[u32]| {
        if json {
            return;
        }
        committed.extend(new.iter().filter(|t| !p.tokenizer.stop.contains(t)));
        if let Ok(text) = p.tokenizer.decode(&committed) {
            if let Some(rest) = text.strip_prefix(shown.as_str()) {
                print!("{rest}");
                let _ = std::io::stdout().flush();
                shown = text;
            }
        }
    };
    let room = ids.len() + cfg.max_tokens + cfg.gamma_max as usize + 2;
    let mut step = 0u64;
    let (mut tp, mut dp) = device.passes(&p.target, p.draft_model(), p.draft_mask(), room)?;
    let stats = match &pol {
        None => speckv::decode::plain_on(tp.as_mut(), &ids, &p.tokenizer.stop, &cfg, &mut |t| {
            stream(&[t])
        })?,
        Some(pl) => speckv::decode::speculative_on(
            tp.as_mut(),
            dp.as_mut(),
            &ids,
            &p.tokenizer.stop,
            pl,
            &cfg,
            &mut |s| {
                stream(&s.emitted);
                if let Some(l) = log.as_mut() {
                    l.single(step, s);
                }
                step += 1;
            },
        )?,
    };
    if let Some(l) = log {
        l.finish()?;
    }
    let text = p.tokenizer.decode(&stats.tokens)?;
    if a.json {
        return json_out(&serde_json::json!({
            "text": text, "tokens": stats.tokens, "tokens_per_second": stats.tokens_per_second,
            "acceptance_rate": stats.acceptance_rate, "mean_gamma": stats.mean_gamma,
            "gamma_histogram": stats.gamma_histogram, "steps": stats.steps, "seconds": stats.seconds,
            "prefill_seconds": stats.prefill_seconds, "draft_tokens": stats.draft_tokens,
        }));
    }
    if let Some(rest) = text.strip_prefix(shown.as_str()) {
        print!("{rest}");
    }
    println!();
    eprintln!(
        "\n{} tokens in {:.2} s ({:.2} s prefill): {:.2} tokens/s decoding; {} steps, acceptance {:.3}, mean γ {:.2}, γ histogram {:?}",
        stats.tokens.len(),
        stats.seconds,
        stats.prefill_seconds,
        stats.tokens_per_second,
        stats.steps,
        stats.acceptance_rate,
        stats.mean_gamma,
        stats.gamma_histogram
    );
    Ok(())
}

/// Several prompts decoded as one batch: each text, then the batch's summary.
fn run_batch(
    a: &Args,
    p: &pair::Pair,
    device: &speckv::decode::device::Device,
    pol: Option<&speckv::decode::Policy>,
    cfg: &GenConfig,
    mut log: Option<&mut StepLog>,
) -> speckv::Result<()> {
    use speckv::decode::batch;
    let ids = a
        .prompt
        .iter()
        .map(|q| p.encode_chat(q))
        .collect::<speckv::Result<Vec<_>>>()?;
    let stats = batch::run_batch_traced(p, device, &ids, pol, cfg, &mut |s| {
        if let Some(l) = log.as_mut() {
            l.batch(s);
        }
    })?;
    let texts = stats
        .sequences
        .iter()
        .map(|q| p.tokenizer.decode(&q.tokens))
        .collect::<speckv::Result<Vec<_>>>()?;
    if a.json {
        let seqs: Vec<_> = stats
            .sequences
            .iter()
            .zip(&texts)
            .map(|(q, text)| {
                serde_json::json!({
                    "text": text, "tokens": q.tokens, "acceptance_rate": q.acceptance_rate,
                    "mean_gamma": q.mean_gamma, "gamma_histogram": q.gamma_histogram,
                    "steps": q.steps,
                })
            })
            .collect();
        return json_out(&serde_json::json!({
            "sequences": seqs, "tokens_per_second": stats.tokens_per_second,
            "target_passes": stats.target_passes, "draft_passes": stats.draft_passes,
            "seconds": stats.seconds, "prefill_seconds": stats.prefill_seconds,
            "draft_tokens": stats.draft_tokens,
        }));
    }
    for (b, (q, text)) in stats.sequences.iter().zip(&texts).enumerate() {
        println!("--- prompt {b} ---\n{text}");
        eprintln!(
            "[{b}] {} tokens, {} steps, acceptance {:.3}, mean γ {:.2}",
            q.tokens.len(),
            q.steps,
            q.acceptance_rate,
            q.mean_gamma
        );
    }
    eprintln!(
        "\n{} prompts in {:.2} s ({:.2} s prefill): {:.2} tokens/s decoding in all; {} target \
         and {} draft passes{}",
        ids.len(),
        stats.seconds,
        stats.prefill_seconds,
        stats.tokens_per_second,
        stats.target_passes,
        stats.draft_passes,
        match pol {
            Some(_) => format!(", γmax {}", cfg.gamma_max),
            None => String::new(),
        }
    );
    Ok(())
}

//! `bench batch`: batched decoding against the same prompts decoded one at a time on the same
//! backend, in the same run — tokens/s of both and their ratio, per batch size and policy. The
//! one-at-a-time peer decodes with the γmax the batch had, so the ratio is what batching gives.

use serde::Serialize;

use super::{batch_gamma, run_batch};
use crate::backend::forward::MAX_STEP;
use crate::decode::device::Device;
use crate::decode::pair::Pair;
use crate::decode::{GenConfig, Policy};
use crate::error::{Error, Result};

/// One way of decoding a batch's prompts: its decoding time (prefill excluded) and its passes.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    pub decode_seconds: f64,
    pub tokens_per_second: f64,
    pub target_passes: usize,
    /// Tokens fed to the draft after the prefill (0 for plain decoding): its drafts, and what it
    /// caught up on after steps in which it drafted nothing (`auto`'s plain steps).
    pub draft_tokens: usize,
}

/// One policy at one batch size, batched and one prompt at a time.
#[derive(Clone, Debug, Serialize)]
pub struct BatchBench {
    pub policy: String,
    pub batch: usize,
    /// The γmax both decoded with (speculative policies): the configured one, capped so a
    /// verification of every sequence fits a step of 16 rows.
    pub gamma_max: Option<u32>,
    pub tokens: usize,
    pub batched: Side,
    pub one_at_a_time: Side,
    /// Batched tokens/s over one-at-a-time tokens/s.
    pub speedup: f64,
    /// Whether both decoded the same tokens (greedy decoding is lossless both ways; the batch's
    /// products round differently only where a backend's M changes its arithmetic).
    pub same_tokens: bool,
    pub acceptance_rate: Option<f64>,
}

/// Every batch size of `sizes` × every policy: the first b prompts of `pool` decoded together,
/// then one at a time. `progress` hears each run's policy and batch size.
pub fn bench_batches(
    pair: &Pair,
    device: &Device,
    pool: &[Vec<u32>],
    sizes: &[usize],
    policies: &[(String, Option<Policy>)],
    cfg: &GenConfig,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<Vec<BatchBench>> {
    check(pool, sizes, policies)?;
    let mut out = Vec::new();
    for &b in sizes {
        let prompts = &pool[..b];
        for (name, pol) in policies {
            progress(name, b);
            let gamma = pol.as_ref().map(|_| batch_gamma(cfg.gamma_max, b));
            let c = GenConfig {
                gamma_max: gamma.unwrap_or(cfg.gamma_max),
                ..cfg.clone()
            };
            let batched = run_batch(pair, device, prompts, pol.as_ref(), &c)?;
            let (mut secs, mut passes, mut dtokens, mut same) = (0.0, 0, 0, true);
            for (p, q) in prompts.iter().zip(&batched.sequences) {
                let s = pair.run(device, p, pol.as_ref(), &c)?;
                secs += s.seconds - s.prefill_seconds;
                // Plain decoding takes a target pass per token but the first.
                passes += match pol {
                    None => s.tokens.len().saturating_sub(1),
                    Some(_) => s.steps,
                };
                dtokens += s.draft_tokens;
                same &= s.tokens == q.tokens;
            }
            let tokens: usize = batched.sequences.iter().map(|q| q.tokens.len()).sum();
            let (drafted, accepted) = batched
                .sequences
                .iter()
                .fold((0, 0), |(d, a), q| (d + q.drafted, a + q.accepted));
            let one_tps = tokens as f64 / f64::max(secs, 1e-9);
            out.push(BatchBench {
                policy: name.clone(),
                batch: b,
                gamma_max: gamma,
                tokens,
                batched: Side {
                    decode_seconds: batched.seconds - batched.prefill_seconds,
                    tokens_per_second: batched.tokens_per_second,
                    target_passes: batched.target_passes,
                    draft_tokens: batched.draft_tokens,
                },
                one_at_a_time: Side {
                    decode_seconds: secs,
                    tokens_per_second: one_tps,
                    target_passes: passes,
                    draft_tokens: dtokens,
                },
                speedup: batched.tokens_per_second / one_tps.max(1e-12),
                same_tokens: same,
                acceptance_rate: pol
                    .as_ref()
                    .map(|_| accepted as f64 / drafted.max(1) as f64),
            });
        }
    }
    Ok(out)
}

/// The run is possible before anything runs: policies that batch, batch sizes 1..=16 with room
/// for a draft in every speculative batch, prompts for the largest.
fn check(pool: &[Vec<u32>], sizes: &[usize], policies: &[(String, Option<Policy>)]) -> Result<()> {
    if sizes.is_empty() || policies.is_empty() {
        return Err(Error::Empty {
            what: "batch sizes or policies",
        });
    }
    if let Some(&b) = sizes.iter().find(|&&b| b == 0 || b > MAX_STEP) {
        return Err(Error::Other(format!(
            "batch size {b}: 1 to {MAX_STEP} sequences"
        )));
    }
    for (name, pol) in policies {
        if pol.is_some() {
            if let Some(&b) = sizes.iter().find(|&&b| batch_gamma(1, b) == 0) {
                return Err(Error::Other(format!(
                    "`{name}` at batch size {b}: a verification of (γmax + 1) · {b} rows leaves \
                     no room for a draft in a step of {MAX_STEP}; speculative batches hold at most \
                     {} sequences",
                    MAX_STEP / 2
                )));
            }
        }
    }
    let most = sizes.iter().copied().max().unwrap_or(0);
    if pool.len() < most {
        return Err(Error::Other(format!(
            "batch size {most} needs {most} prompts; {} were chosen (--per-category)",
            pool.len()
        )));
    }
    Ok(())
}

/// The table of [`bench_batches`].
pub fn render(rows: &[BatchBench]) -> String {
    let mut s = String::from(
        "policy        batch  γmax  tokens  batched tok/s  one-at-a-time tok/s  speedup  target passes (batched / alone)  draft tokens (batched / alone)  same tokens\n",
    );
    for r in rows {
        s += &format!(
            "{:<13} {:>5}  {:>4}  {:>6}  {:>13.2}  {:>19.2}  {:>6.2}×  {:>15} / {:<15}  {:>14} / {:<14}  {}\n",
            r.policy,
            r.batch,
            r.gamma_max.map_or("-".to_string(), |g| g.to_string()),
            r.tokens,
            r.batched.tokens_per_second,
            r.one_at_a_time.tokens_per_second,
            r.speedup,
            r.batched.target_passes,
            r.one_at_a_time.target_passes,
            r.batched.draft_tokens,
            r.one_at_a_time.draft_tokens,
            if r.same_tokens { "yes" } else { "no" }
        );
    }
    s
}

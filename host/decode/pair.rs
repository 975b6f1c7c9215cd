//! A loaded target/draft pair (what `generate`, `profile` and `bench decode` share), γ policies
//! built from their command-line names, and the decode benchmark: every policy over one prompt
//! set with the models loaded once, in measured tokens per second.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::controller::records::Compression;
use crate::decode::device::Device;
use crate::decode::profile::Prompt;
use crate::decode::{self, Draft, GenConfig, GenStats, Policy};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;
use crate::model::{read_gguf, Model};
use crate::weights::Regime;

/// The controller's compression code of a weight regime. GGUF blocks map by the bits per weight
/// the model's linear layers take: under 6 → the 4-bit code, under 10 → the 8-bit code, else FP16.
pub fn compression_of(r: Regime, bits_per_weight: f64) -> Compression {
    match r {
        Regime::Fp16 => Compression::Fp16,
        Regime::Int8 => Compression::Int8,
        Regime::Nf4 => Compression::Nf4,
        Regime::Gguf if bits_per_weight < 6.0 => Compression::Nf4,
        Regime::Gguf if bits_per_weight < 10.0 => Compression::Int8,
        Regime::Gguf => Compression::Fp16,
    }
}

/// Target, draft (another model, or the target skipping layers) and their tokenizer.
pub struct Pair {
    pub tokenizer: Tokenizer,
    pub target: Model,
    draft_model: Option<Model>,
    mask: Vec<bool>,
    pub compression: Compression,
    /// Human-readable description of the draft.
    pub draft_name: String,
}

impl Pair {
    /// Loads the target in `regime`; the draft from `draft` (same vocabulary) in `draft_regime`,
    /// else a self-speculative draft keeping `draft_layers`, else every other layer (first and
    /// last kept).
    pub fn load(
        model: &Path,
        draft: Option<&Path>,
        draft_layers: Option<&[usize]>,
        regime: Regime,
        draft_regime: Regime,
    ) -> Result<Pair> {
        let (c, _) = read_gguf(model)?;
        let tokenizer = Tokenizer::from_gguf(&c)?;
        let target = Model::load(model, regime)?;
        let compression = compression_of(regime, target.bits_per_weight());
        let n = target.cfg.layers;
        let (draft_model, mask, draft_name) = match (draft, draft_layers) {
            (Some(_), Some(_)) => {
                return Err(Error::Other(
                    "give a draft model or draft layers, not both".to_string(),
                ))
            }
            (Some(p), None) => {
                let d = Model::load(p, draft_regime)?;
                if d.cfg.vocab != target.cfg.vocab {
                    return Err(Error::Other(format!(
                        "draft vocabulary {} differs from the target's {}",
                        d.cfg.vocab, target.cfg.vocab
                    )));
                }
                let name = format!("{} ({})", p.display(), draft_regime.name());
                (Some(d), Vec::new(), name)
            }
            (None, Some(keep)) => {
                if let Some(l) = keep.iter().find(|&&l| l >= n) {
                    return Err(Error::Other(format!(
                        "draft layers: layer {l} does not exist ({n} layers)"
                    )));
                }
                if keep.is_empty() {
                    return Err(Error::Empty {
                        what: "draft layers",
                    });
                }
                let mask: Vec<bool> = (0..n).map(|i| keep.contains(&i)).collect();
                (None, mask, format!("target layers {keep:?}"))
            }
            (None, None) => {
                let mask: Vec<bool> = (0..n).map(|i| i + 1 == n || i % 2 == 0).collect();
                (None, mask, "target, every other layer".to_string())
            }
        };
        Ok(Pair {
            tokenizer,
            target,
            draft_model,
            mask,
            compression,
            draft_name,
        })
    }

    /// The draft model, when it is not the target skipping layers.
    pub fn draft_model(&self) -> Option<&Model> {
        self.draft_model.as_ref()
    }

    /// The self-speculative draft's layers (empty with a draft model).
    pub fn draft_mask(&self) -> &[bool] {
        &self.mask
    }

    pub fn draft(&self) -> Draft<'_> {
        match &self.draft_model {
            Some(m) => Draft::Model(m),
            None => Draft::SkipLayers(self.mask.clone()),
        }
    }

    /// Token ids of `prompt` in the model's chat template.
    pub fn encode_chat(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(&Tokenizer::chat_prompt(prompt))
    }

    /// Decodes `prompt_ids` with `policy` (`None` = plain decoding of the target) on `device`.
    pub fn run(
        &self,
        device: &Device,
        prompt_ids: &[u32],
        policy: Option<&Policy>,
        cfg: &GenConfig,
    ) -> Result<GenStats> {
        let room = prompt_ids.len() + cfg.max_tokens + cfg.gamma_max as usize + 2;
        let (mut t, mut d) = device.passes(&self.target, self.draft_model(), &self.mask, room)?;
        let stop = &self.tokenizer.stop;
        match policy {
            None => decode::plain_on(t.as_mut(), prompt_ids, stop, cfg, &mut |_| {}),
            Some(p) => decode::speculative_on(
                t.as_mut(),
                d.as_mut(),
                prompt_ids,
                stop,
                p,
                cfg,
                &mut |_| {},
            ),
        }
    }
}

/// Takes prompts `offset..offset + per_category` of every category, in file order.
pub fn select_prompts(
    prompts: &[Prompt],
    offset: usize,
    per_category: usize,
) -> Vec<(usize, Prompt)> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let n = seen.entry(p.category.as_str()).or_insert(0);
        if *n >= offset && *n < offset + per_category {
            out.push((i, p.clone()));
        }
        *n += 1;
    }
    out
}

/// Reads `path` and takes prompts `offset..offset + per_category` of every category; none is an
/// error.
pub fn prompts_from_file(
    path: &Path,
    offset: usize,
    per_category: usize,
) -> Result<Vec<(usize, Prompt)>> {
    let chosen = select_prompts(
        &crate::decode::profile::read_prompts(path)?,
        offset,
        per_category,
    );
    if chosen.is_empty() {
        return Err(Error::Other(format!(
            "no prompts at --offset {offset} --per-category {per_category} in {}",
            path.display()
        )));
    }
    Ok(chosen)
}

/// One policy's totals over the prompt set.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    pub policy: String,
    pub tokens: usize,
    /// Decoding time (prefill excluded), summed over prompts.
    pub decode_seconds: f64,
    pub tokens_per_second: f64,
    pub steps: usize,
    pub acceptance_rate: Option<f64>,
    pub mean_gamma: Option<f64>,
    pub gamma_histogram: BTreeMap<u32, usize>,
    /// Whether the tokens equal plain greedy decoding's on every prompt (greedy runs only).
    pub matches_plain: Option<bool>,
    /// Decoding tokens/s of each prompt run, in prompt order (the unit of the paired intervals).
    pub per_prompt_tokens_per_second: Vec<f64>,
}

/// `policy` against `against` over the same prompt runs: the geometric mean of the per-prompt
/// ratios of tokens/s and its 95 % t-interval (on the log ratios).
#[derive(Clone, Debug, Serialize)]
pub struct Paired {
    pub policy: String,
    pub against: String,
    pub prompts: usize,
    pub ratio: f64,
    pub low: f64,
    pub high: f64,
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom (Cornish–Fisher expansion
/// around the normal quantile; within 0.01 of the exact value from df = 3 up).
fn t975(df: usize) -> f64 {
    let z: f64 = 1.959964;
    let d = df.max(1) as f64;
    z + (z.powi(3) + z) / (4.0 * d)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
}

/// The paired comparison of two policies in `results` (None if either is missing or fewer than
/// two prompt runs).
pub fn paired(results: &[PolicyResult], policy: &str, against: &str) -> Option<Paired> {
    let a = results.iter().find(|r| r.policy == policy)?;
    let b = results.iter().find(|r| r.policy == against)?;
    let logs: Vec<f64> = a
        .per_prompt_tokens_per_second
        .iter()
        .zip(&b.per_prompt_tokens_per_second)
        .map(|(x, y)| (x / y).ln())
        .filter(|v| v.is_finite())
        .collect();
    let n = logs.len();
    if n < 2 {
        return None;
    }
    let mean = logs.iter().sum::<f64>() / n as f64;
    let var = logs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Some(Paired {
        policy: policy.to_string(),
        against: against.to_string(),
        prompts: n,
        ratio: mean.exp(),
        low: (mean - half).exp(),
        high: (mean + half).exp(),
    })
}

/// Runs every policy over the prompts (models loaded once), each prompt once per policy. The loop
/// is prompt-major — for each prompt, every policy in turn — so a slow drift of the machine (thermal,
/// background load) spreads over all policies instead of biasing the ones that ran last.
pub fn bench_decode(
    pair: &Pair,
    device: &Device,
    prompts: &[Vec<u32>],
    policies: &[(String, Option<Policy>)],
    cfg: &GenConfig,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<Vec<PolicyResult>> {
    if prompts.is_empty() || policies.is_empty() {
        return Err(Error::Empty {
            what: "prompts or policies",
        });
    }
    #[derive(Default)]
    struct Acc {
        tokens: usize,
        secs: f64,
        steps: usize,
        drafted: usize,
        accepted: usize,
        hist: BTreeMap<u32, usize>,
        outs: Vec<Vec<u32>>,
        per_prompt: Vec<f64>,
    }
    let mut acc: Vec<Acc> = policies.iter().map(|_| Acc::default()).collect();
    for (i, ids) in prompts.iter().enumerate() {
        for ((name, pol), a) in policies.iter().zip(acc.iter_mut()) {
            progress(name, i);
            let s = pair.run(device, ids, pol.as_ref(), cfg)?;
            a.tokens += s.tokens.len();
            a.secs += s.seconds - s.prefill_seconds;
            a.steps += s.steps;
            a.drafted += s.drafted;
            a.accepted += s.accepted;
            for (g, n) in &s.gamma_histogram {
                *a.hist.entry(*g).or_insert(0) += n;
            }
            a.per_prompt
                .push(s.tokens.len() as f64 / (s.seconds - s.prefill_seconds).max(1e-9));
            a.outs.push(s.tokens);
        }
    }
    let plain = policies
        .iter()
        .position(|(_, p)| p.is_none())
        .map(|i| acc[i].outs.clone());
    Ok(policies
        .iter()
        .zip(acc)
        .map(|((name, pol), a)| PolicyResult {
            policy: name.clone(),
            tokens: a.tokens,
            decode_seconds: a.secs,
            tokens_per_second: a.tokens as f64 / a.secs.max(1e-9),
            steps: a.steps,
            acceptance_rate: pol
                .as_ref()
                .map(|_| a.accepted as f64 / a.drafted.max(1) as f64),
            mean_gamma: pol
                .as_ref()
                .map(|_| a.drafted as f64 / a.steps.max(1) as f64),
            gamma_histogram: a.hist,
            matches_plain: match (&plain, cfg.temperature == 0.0 && pol.is_some()) {
                (Some(p), true) => Some(*p == a.outs),
                _ => None,
            },
            per_prompt_tokens_per_second: a.per_prompt,
        })
        .collect())
}

/// The comparisons the controller work reports: `auto` (or each adaptive policy present) against
/// the best fixed γ of the run, fixed:4 and HF's dynamic schedule.
pub fn paired_table(results: &[PolicyResult]) -> Vec<Paired> {
    let best_fixed = results
        .iter()
        .filter(|r| r.policy.starts_with("fixed:"))
        .max_by(|a, b| a.tokens_per_second.total_cmp(&b.tokens_per_second))
        .map(|r| r.policy.clone());
    let mut out = Vec::new();
    for r in results {
        if r.policy == "plain" || r.policy.starts_with("fixed:") {
            continue;
        }
        let mut against: Vec<&str> = Vec::new();
        if let Some(b) = &best_fixed {
            against.push(b);
        }
        against.extend(["fixed:4", "hf-dynamic", "plain"]);
        against.dedup();
        for a in against {
            if a != r.policy {
                out.extend(paired(results, &r.policy, a));
            }
        }
    }
    out
}

/// Markdown table of `bench_decode`'s results, with ratios to fixed:4 and to plain where present.
pub fn render_bench(results: &[PolicyResult]) -> String {
    let tps = |name: &str| {
        results
            .iter()
            .find(|r| r.policy == name)
            .map(|r| r.tokens_per_second)
    };
    let (f4, plain) = (tps("fixed:4"), tps("plain"));
    let ratio =
        |v: f64, base: Option<f64>| base.map_or("–".to_string(), |b| format!("{:.2}×", v / b));
    let mut s = String::from(
        "| policy | tokens | tokens/s | × plain | × fixed:4 | acceptance | mean γ | = plain greedy |\n|---|---:|---:|---:|---:|---:|---:|:-:|\n",
    );
    for r in results {
        s += &format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} |\n",
            r.policy,
            r.tokens,
            r.tokens_per_second,
            ratio(r.tokens_per_second, plain),
            ratio(r.tokens_per_second, f4),
            r.acceptance_rate
                .map_or("–".to_string(), |a| format!("{a:.3}")),
            r.mean_gamma.map_or("–".to_string(), |g| format!("{g:.2}")),
            match r.matches_plain {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            }
        );
    }
    let best_fixed = results
        .iter()
        .filter(|r| r.policy.starts_with("fixed:"))
        .max_by(|a, b| a.tokens_per_second.total_cmp(&b.tokens_per_second));
    if let Some(b) = best_fixed {
        s += &format!(
            "\nbest fixed γ: {} at {:.2} tokens/s\n",
            b.policy, b.tokens_per_second
        );
    }
    let pairs = paired_table(results);
    if !pairs.is_empty() {
        s += "\npaired over the same prompt runs (geometric mean of per-prompt tokens/s ratios, 95 % t-interval):\n\n| policy | against | prompt runs | ratio | 95 % interval |\n|---|---|---:|---:|---|\n";
        for p in pairs {
            s += &format!(
                "| {} | {} | {} | {:.3}× | {:.3}–{:.3} |\n",
                p.policy, p.against, p.prompts, p.ratio, p.low, p.high
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_taken_per_category() {
        let p = |c: &str, t: &str| Prompt {
            category: c.to_string(),
            prompt: t.to_string(),
        };
        let all = [
            p("a", "a0"),
            p("b", "b0"),
            p("a", "a1"),
            p("b", "b1"),
            p("a", "a2"),
        ];
        let got: Vec<usize> = select_prompts(&all, 1, 1)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, [2, 3]);
        let got: Vec<usize> = select_prompts(&all, 0, 2)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(select_prompts(&all, 3, 1).is_empty());
    }
}

//! `speckv calibrate-draft`: choose which layers a self-speculative draft keeps. The target decodes
//! a few prompts greedily; each candidate draft (a layer mask) is then run teacher-forced over the
//! same text, and its agreement — how often its argmax equals the target's next token, which is
//! exactly greedy acceptance per drafted token — is measured. Greedy layer removal keeps the
//! removal that hurts agreement least until the draft's cost, counted in weight bytes read per token
//! (layers kept plus the embedding and LM head every draft pays), is at most `max_cost` of the
//! target's; the chosen draft's time per token is then measured against the target's.

use std::time::Instant;

use serde::Serialize;

use crate::controller::records::Compression;
use crate::decode::{self, GenConfig};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};

#[derive(Debug, Serialize)]
pub struct Calibration {
    /// Layers the draft keeps.
    pub keep: Vec<usize>,
    /// Greedy acceptance per drafted token (teacher-forced agreement) of the chosen draft.
    pub agreement: f64,
    /// Draft / target weight bytes per token.
    pub cost_ratio: f64,
    /// Measured draft / target time per token (M = 1).
    pub measured_time_ratio: f64,
    /// (layers kept, agreement, cost ratio) along the search.
    pub path: Vec<(usize, f64, f64)>,
    pub positions: usize,
}

struct Text {
    tokens: Vec<u32>,
    first: usize,
}

fn agreement(m: &Model, texts: &[Text], mask: &[bool]) -> Result<f64> {
    let (mut hit, mut n) = (0usize, 0usize);
    let v = m.cfg.vocab;
    for t in texts {
        let mut cache = KvCache::new(&m.cfg);
        let feed = &t.tokens[..t.tokens.len() - 1];
        let keep = t.tokens.len() - t.first;
        let logits = m.forward_layers(feed, &mut cache, keep, Some(mask))?;
        for (i, (row, &next)) in logits.chunks(v).zip(&t.tokens[t.first..]).enumerate() {
            hit += (decode::argmax(row, i)? == next) as usize;
            n += 1;
        }
    }
    Ok(hit as f64 / n.max(1) as f64)
}

fn time_per_token(m: &Model, mask: &[bool]) -> Result<f64> {
    let mut cache = KvCache::new(&m.cfg);
    m.forward_layers(&[1, 2, 3, 4], &mut cache, 1, Some(mask))?;
    let start = Instant::now();
    let n = 16;
    for i in 0..n {
        m.forward_layers(&[(5 + i) as u32], &mut cache, 1, Some(mask))?;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

pub fn calibrate(
    target: &Model,
    prompts: &[Vec<u32>],
    stop: &[u32],
    gen_tokens: usize,
    max_cost: f64,
) -> Result<Calibration> {
    if prompts.is_empty() || gen_tokens == 0 || !(max_cost > 0.0 && max_cost <= 1.0) {
        return Err(Error::Other(
            "calibrate-draft needs prompts, tokens to generate and a cost bound in (0, 1]"
                .to_string(),
        ));
    }
    let cfg = GenConfig {
        max_tokens: gen_tokens,
        temperature: 0.0,
        seed: 0,
        gamma_max: 8,
        compression: Compression::Fp16,
        draft_catch_up: None,
    };
    let mut texts = Vec::new();
    for p in prompts {
        let out = decode::plain(target, p, stop, &cfg)?;
        if out.tokens.is_empty() {
            continue;
        }
        let mut tokens = p.clone();
        tokens.extend_from_slice(&out.tokens);
        texts.push(Text {
            tokens,
            first: p.len(),
        });
    }
    if texts.is_empty() {
        return Err(Error::Other(
            "the target generated nothing for the calibration prompts".to_string(),
        ));
    }
    let layers = target.cfg.layers;
    let c = &target.cfg;
    let layer_bytes = (2 * c.hidden * c.hidden
        + 2 * c.hidden * c.kv_heads * c.head_dim
        + 3 * c.hidden * c.ffn) as f64;
    let head_bytes = (c.vocab * c.hidden) as f64;
    let cost = |kept: usize| {
        (kept as f64 * layer_bytes + head_bytes) / (layers as f64 * layer_bytes + head_bytes)
    };
    let mut mask = vec![true; layers];
    let mut path = vec![(layers, agreement(target, &texts, &mask)?, 1.0)];
    while cost(mask.iter().filter(|&&k| k).count()) > max_cost
        && mask.iter().filter(|&&k| k).count() > 1
    {
        let mut best: Option<(usize, f64)> = None;
        for l in 0..layers {
            if !mask[l] {
                continue;
            }
            mask[l] = false;
            let a = agreement(target, &texts, &mask)?;
            mask[l] = true;
            if best.is_none_or(|(_, b)| a > b) {
                best = Some((l, a));
            }
        }
        let Some((l, a)) = best else { break };
        mask[l] = false;
        let kept = mask.iter().filter(|&&k| k).count();
        path.push((kept, a, cost(kept)));
    }
    let kept = mask.iter().filter(|&&k| k).count();
    let all = vec![true; layers];
    let ratio = time_per_token(target, &mask)? / time_per_token(target, &all)?;
    Ok(Calibration {
        keep: (0..layers).filter(|&l| mask[l]).collect(),
        agreement: path.last().map(|p| p.1).unwrap_or(0.0),
        cost_ratio: cost(kept),
        measured_time_ratio: ratio,
        path,
        positions: texts.iter().map(|t| t.tokens.len() - t.first).sum(),
    })
}

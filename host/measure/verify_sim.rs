//! `speckv verify-sim`: speculative sampling on synthetic distributions, through the verification
//! kernel, to check losslessness. One target distribution per position (γ+1) and one draft
//! distribution per position (γ), not depending on the prefix; N independent sequences, each drafting
//! γ tokens from q (Philox, `PURPOSE_DRAFT`) and verified in batches. The emitted token at position i
//! of every sequence that reaches i must follow p_i exactly, and position 0 must accept with
//! probability Σ min(p_0, q_0).

use rand::SeedableRng;
use rand_distr::{Dirichlet, Distribution};
use serde::Serialize;
use speckv_kernels::philox;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::stats::LogitsData;
use crate::verify::{DraftDist, VerifyBatch};

/// Verification mode of every simulated sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SimMode {
    Stochastic,
    Greedy,
}

/// What `verify-sim --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct SimResult {
    pub vocab: usize,
    pub gamma: usize,
    pub samples: u64,
    pub mode: SimMode,
    pub seed: u64,
    /// γ+1 target distributions.
    pub target: Vec<Vec<f64>>,
    /// γ draft distributions.
    pub draft: Vec<Vec<f64>>,
    /// γ+1 lists of V counts: how often each token was emitted at that position.
    pub counts: Vec<Vec<u64>>,
    /// Sequences that accepted position 0.
    pub accepted_first: u64,
    /// Σ min(p_0, q_0): the acceptance probability of position 0 (stochastic mode).
    pub expected_accepted_first: f64,
    /// Sequences that emitted a token at each position.
    pub reached: Vec<u64>,
    /// Pearson χ² of each position's counts against p_i (bins expected below 5 pooled; bins with
    /// p = 0 must be empty, they add `inf` otherwise), and its degrees of freedom.
    pub chi2: Vec<f64>,
    pub chi2_dof: Vec<usize>,
}

/// Probability vectors, one per position.
pub type Dists = Vec<Vec<f64>>;

/// Bytes a simulation of `vocab` tokens and γ positions holds at once, `batch` sequences per launch:
/// the f64 distributions and their f32 rows, the per-position counts, and one launch's target
/// logits and draft probabilities (None when the product overflows).
pub fn memory_needed(vocab: usize, gamma: usize, batch: usize) -> Option<u128> {
    let (v, g, n) = (vocab as u128, gamma as u128, batch as u128);
    let rows = 2 * g + 1;
    let dists = rows.checked_mul(v)?.checked_mul(8 + 4)?;
    let counts = (g + 1).checked_mul(v)?.checked_mul(8)?;
    let launch = n.checked_mul(rows)?.checked_mul(v)?.checked_mul(4)?;
    dists.checked_add(counts)?.checked_add(launch)
}

/// What verify-sim may use: ¾ of the memory the OS reports available (4 GiB when it cannot say).
pub fn memory_budget() -> u128 {
    let avail_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u128>().ok())
    });
    match avail_kb {
        Some(kb) => kb * 1024 / 4 * 3,
        None => 4 << 30,
    }
}

/// Checks the sizes of a simulation before anything is allocated.
pub fn check_sizes(vocab: usize, gamma: usize, batch: usize) -> Result<()> {
    if vocab < 2 {
        return Err(Error::Other(format!(
            "verify-sim needs a vocabulary of at least 2, got {vocab}"
        )));
    }
    if vocab > crate::stats::MAX_VOCAB || gamma > 1024 {
        return Err(Error::Other(format!(
            "vocab {vocab} (at most {}) or γ {gamma} (at most 1024) is too large",
            crate::stats::MAX_VOCAB
        )));
    }
    let budget = memory_budget();
    let need = memory_needed(vocab, gamma, batch).unwrap_or(u128::MAX);
    if need > budget {
        return Err(Error::TooMuchMemory {
            what: "verify-sim",
            need_bytes: need,
            budget_bytes: budget,
            hint: "lower --vocab, --gamma or --batch",
        });
    }
    Ok(())
}

/// One target distribution per position (γ+1) and one draft distribution per position (γ), drawn
/// from a seeded Dirichlet(α = 1/2): peaked and flat rows both occur.
pub fn dirichlet_pair(vocab: usize, gamma: usize, seed: u64) -> Result<(Dists, Dists)> {
    check_sizes(vocab, gamma, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = Dirichlet::new(&vec![0.5f64; vocab]).map_err(|e| Error::Other(e.to_string()))?;
    let mut draw = |n: usize| -> Vec<Vec<f64>> { (0..n).map(|_| dir.sample(&mut rng)).collect() };
    let target = draw(gamma + 1);
    let draft = draw(gamma);
    Ok((target, draft))
}

/// Checks that `rows` are probability vectors of one length.
fn check_dists(what: &str, rows: &[Vec<f64>], vocab: usize) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if r.len() != vocab {
            return Err(Error::Other(format!(
                "{what} row {i} has {} entries, expected {vocab}",
                r.len()
            )));
        }
        let s: f64 = r.iter().sum();
        if r.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || (s - 1.0).abs() > 1e-6 {
            return Err(Error::Other(format!(
                "{what} row {i} is not a probability vector (sum {s})"
            )));
        }
    }
    Ok(())
}

/// Draws x ~ q by inverse CDF from one uniform.
fn draw(q: &[f64], u: f64) -> usize {
    let mut c = 0.0;
    for (j, p) in q.iter().enumerate() {
        c += p;
        if u < c {
            return j;
        }
    }
    // Rounding left u past the last cumulative sum: the last token with mass.
    q.iter().rposition(|p| *p > 0.0).unwrap_or(0)
}

/// Runs `samples` sequences through `backend`'s verification, `batch` at a time.
pub fn run(
    backend: &Backend,
    target: &[Vec<f64>],
    draft: &[Vec<f64>],
    samples: u64,
    seed: u64,
    mode: SimMode,
    batch: usize,
) -> Result<SimResult> {
    let gamma = draft.len();
    if target.len() != gamma + 1 {
        return Err(Error::Other(format!(
            "{} target rows for γ = {gamma}: need γ + 1",
            target.len()
        )));
    }
    let vocab = target.first().map(|r| r.len()).unwrap_or(0);
    check_dists("target", target, vocab)?;
    check_dists("draft", draft, vocab)?;
    if samples == 0 || batch == 0 {
        return Err(Error::Empty {
            what: "samples and batch",
        });
    }
    check_sizes(
        vocab,
        gamma,
        batch.min(samples.min(usize::MAX as u64) as usize),
    )?;
    // Target logits ln p (−inf where p = 0); draft as probabilities.
    let t_row: Vec<f32> = target
        .iter()
        .flatten()
        .map(|&p| {
            if p > 0.0 {
                p.ln() as f32
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let q_row: Vec<f32> = draft.iter().flatten().map(|&p| p as f32).collect();
    let mut counts = vec![vec![0u64; vocab]; gamma + 1];
    let mut reached = vec![0u64; gamma + 1];
    let mut accepted_first = 0u64;
    let t_temp = match mode {
        SimMode::Stochastic => 1.0f32,
        SimMode::Greedy => 0.0,
    };
    let mut done = 0u64;
    let mut step = 0u64;
    while done < samples {
        let n = ((samples - done) as usize).min(batch);
        let target_logits: Vec<f32> = (0..n).flat_map(|_| t_row.iter().copied()).collect();
        let draft_probs: Vec<f32> = (0..n).flat_map(|_| q_row.iter().copied()).collect();
        let mut tokens = vec![0i32; n * gamma];
        for i in 0..gamma {
            let dseed = philox::derive(seed, philox::PURPOSE_DRAFT, i as u32);
            for b in 0..n {
                let u = philox::uniform_open(philox::bits(dseed, b as u32, 0, step)) as f64;
                tokens[b * gamma + i] = draw(&draft[i], u) as i32;
            }
        }
        let gammas = vec![gamma as i32; n];
        let temps = vec![t_temp; n];
        let v = VerifyBatch {
            target: LogitsData::F32(&target_logits),
            target_stride: vocab,
            draft: DraftDist::Probs(&draft_probs),
            draft_stride: vocab,
            draft_tokens: &tokens,
            gammas: &gammas,
            target_temperature: &temps,
            batch: n,
            gamma_max: gamma,
            vocab,
            seed,
            step,
        };
        let out = backend.verify(&v)?;
        for b in 0..n {
            if out.flags[b] != 0 {
                return Err(Error::Other(format!(
                    "sequence flagged {:#x} in verify-sim",
                    out.flags[b]
                )));
            }
            if gamma > 0 && out.accepted[b] > 0 {
                accepted_first += 1;
            }
            for (i, &tok) in out.tokens(b).iter().enumerate() {
                counts[i][tok as usize] += 1;
                reached[i] += 1;
            }
        }
        done += n as u64;
        step += 1;
    }
    let (chi2, chi2_dof) = target
        .iter()
        .zip(&counts)
        .zip(&reached)
        .map(|((p, c), &n)| chi_square(p, c, n))
        .unzip();
    let expected_accepted_first = match draft.first() {
        Some(q) => target[0].iter().zip(q).map(|(a, b)| a.min(*b)).sum(),
        None => 0.0,
    };
    Ok(SimResult {
        vocab,
        gamma,
        samples,
        mode,
        seed,
        target: target.to_vec(),
        draft: draft.to_vec(),
        counts,
        accepted_first,
        expected_accepted_first,
        reached,
        chi2,
        chi2_dof,
    })
}

/// Pearson χ² of `counts` (n draws) against `p`. Bins expected below 5 draws are pooled into one
/// (the χ² approximation needs it); bins with p = 0 must be empty and contribute `inf` if hit.
pub fn chi_square(p: &[f64], counts: &[u64], n: u64) -> (f64, usize) {
    let mut chi2 = 0.0;
    let mut bins = 0usize;
    let (mut pool_e, mut pool_c) = (0.0, 0.0);
    for (&pj, &c) in p.iter().zip(counts) {
        if pj == 0.0 {
            if c > 0 {
                chi2 = f64::INFINITY;
            }
            continue;
        }
        let e = pj * n as f64;
        if e < 5.0 {
            pool_e += e;
            pool_c += c as f64;
            continue;
        }
        chi2 += (c as f64 - e).powi(2) / e;
        bins += 1;
    }
    if pool_e > 0.0 {
        chi2 += (pool_c - pool_e).powi(2) / pool_e;
        bins += 1;
    }
    (chi2, bins.saturating_sub(1))
}

/// Upper critical value of χ² with `dof` degrees of freedom at tail probability ≈ 1e-4
/// (Wilson–Hilferty).
pub fn chi2_critical_1e4(dof: usize) -> f64 {
    let k = dof.max(1) as f64;
    let z = 3.719; // standard normal 1 − 1e-4 quantile
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

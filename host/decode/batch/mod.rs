//! Batched decoding: several prompts decoded together on a batched state ([`BatchPass`]: the
//! CPU's, or a device executor's) — plain decoding, and speculative decoding in which every
//! sequence drafts its own γ each step and one batched verification checks them all.
//!
//! The executors step every sequence the same number of positions m. A pass whose sequences have
//! fewer tokens to feed pads them at their end (copies of their last token, or token 0) and cuts
//! the padded positions off the caches right after (`truncate_seq`): attention is causal, so no
//! real position ever sees them. A finished sequence feeds nothing and its cache stays as it was.
//!
//! Everything a step decides from logits is computed where they are, and only its result comes
//! back: each sequence's next token (plain decoding) and each draft's statistics
//! (`BatchPass::rows_stats`: its own seed, random step and accumulator, one `RowStats` back), and
//! the verdict of verification (`BatchPass::verify_step`, over the rows as the pass leaves them,
//! `[B, γ_step + 1, vocab]` with γ_step the step's largest γ; each sequence's γ_b says how many of
//! its rows are real). A draft's logits row comes back only when sampling, for verification
//! against the draft's distribution. A speculative prefill computes no logits (the prompt's last
//! token is fed with the first verification), nor does any prefill pass in which no prompt ends.
//!
//! Sampling: sequence b draws its tokens (plain decoding, drafts) with seed `seed + b`, and
//! verification uses its batch row b's stream; a batch of one decodes as the single-sequence loops
//! do, token for token.
//!
//! `auto` decides for the batch ([`crate::controller::batch_auto`]): its sequences draft in
//! lockstep, since a batched pass computes every sequence's row whether it drafts or not, and
//! the batch drafts on while the sequences' summed expected tokens per unit of batched step cost
//! rise. Its costs are the batched passes' own, measured while decoding.

use std::time::Instant;

use serde::Serialize;
use speckv_kernels::params::FeatureAccum;

pub mod bench;
mod feed;
mod seq;

use feed::{feed_with, read_rows, step_padded, Host};
use seq::{Seq, SeqCounts};

use super::device::Device;
use super::pair::Pair;
use super::{GenConfig, GenStats, Policy};
use crate::backend::forward::MAX_STEP;
use crate::controller::batch_auto::BatchAuto;
use crate::controller::hazard::DraftTime;
use crate::error::{Error, Result};
use crate::model::pass::token_of;
use crate::model::BatchPass;
use crate::stats::{Accumulate, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput};

/// What a batched decode did.
#[derive(Clone, Debug, Serialize)]
pub struct BatchStats {
    /// Each sequence's own counts; their `seconds` and `prefill_seconds` are the batch's, their
    /// `tokens_per_second` their own tokens over the batch's decoding time.
    pub sequences: Vec<GenStats>,
    /// Batched forward passes after the prefill, of the target and of the draft.
    pub target_passes: usize,
    pub draft_passes: usize,
    /// Tokens fed to the draft after the prefill, every sequence's (padding excluded).
    pub draft_tokens: usize,
    pub seconds: f64,
    pub prefill_seconds: f64,
    /// Every sequence's tokens over the decoding phase's wall time.
    pub tokens_per_second: f64,
}

/// What one batched speculative step did, for an observer ([`speculative_batch_traced`],
/// `speckv generate --step-log`): the slices are the loop's own buffers, so observing allocates
/// nothing.
#[derive(Clone, Copy, Debug)]
pub struct BatchStep<'a> {
    /// The step's index, 0 first.
    pub step: u64,
    /// The sequences still decoding when the step began.
    pub active: &'a [bool],
    /// Drafts each sequence verified (0: a plain step for it, or a finished sequence).
    pub gammas: &'a [i32],
    /// Drafts of each sequence the target accepted.
    pub accepted: &'a [i32],
    /// Positions per sequence of the step's one verification pass (its largest γ + 1).
    pub verify_positions: usize,
    /// Batched draft passes (catch-up and drafting), their wall time (statistics included) and
    /// the step's first feed apart (its passes and time; `first_tokens` the largest of
    /// [`BatchStep::first_tokens`]).
    pub draft: DraftTime,
    /// Tokens fed to each sequence's draft in the step, and in its first feed (catch-up
    /// included; padding excluded).
    pub draft_tokens: &'a [usize],
    pub first_tokens: &'a [usize],
    /// Wall time of verifying: the target pass, the accept/reject and the commits.
    pub verify_seconds: f64,
}

/// Positions each sequence's cache needs for a batched decode of `seqs` prompts, the longest
/// `longest_prompt` tokens long: the tokens it commits, a step's drafts, and the padding of a
/// pass (at most 16 / seqs positions, cut off right after).
pub fn batch_room(longest_prompt: usize, cfg: &GenConfig, seqs: usize) -> usize {
    longest_prompt + cfg.max_tokens + cfg.gamma_max as usize + 2 + MAX_STEP / seqs.max(1)
}

/// Plain decoding of every prompt on `pass`, a batched state of one sequence per prompt (fresh):
/// sequence b decodes what [`super::plain_on`] decodes with seed `seed + b`.
pub fn plain_batch(
    pass: &mut (dyn BatchPass + Send),
    prompts: &[Vec<u32>],
    stop: &[u32],
    cfg: &GenConfig,
) -> Result<BatchStats> {
    // On a pool thread, as the single-sequence loops: the products' parallel jobs then go to its
    // own queue, not the pool's injector queue (which allocates).
    rayon::scope(|_| plain_loop(pass, prompts, stop, cfg))
}

fn plain_loop(
    pass: &mut dyn BatchPass,
    prompts: &[Vec<u32>],
    stop: &[u32],
    cfg: &GenConfig,
) -> Result<BatchStats> {
    check_batch(&[&*pass], prompts, cfg)?;
    let (b, v) = (prompts.len(), pass.cfg().vocab);
    let start = Instant::now();
    let mut host = Host::new(b, v, false);
    let opts = |seq: usize, step: usize| StatsOptions {
        temperature: cfg.temperature,
        sample: cfg.temperature != 0.0,
        seed: cfg.seed.wrapping_add(seq as u64),
        step: step as u64,
        accumulate: Accumulate::No,
    };
    // Each ended sequence's next token, chosen where the logits are (one `RowStats` back each).
    let mut choose = |pass: &mut dyn BatchPass,
                      ended: &[usize],
                      rows: &[usize],
                      step: usize,
                      next: &mut [u32]| {
        let req = &mut host.req;
        req.clear();
        for &i in ended {
            req.opts.push(opts(i, step));
            req.accums.push(FeatureAccum::EMPTY);
        }
        req.run(pass, rows)?;
        for (k, &i) in ended.iter().enumerate() {
            next[i] = token_of(&req.stats[k], &req.opts[k])?;
        }
        Ok(())
    };
    let mut next = vec![0u32; b];
    feed_with(pass, prompts, &mut host.feed, true, |p, e, r| {
        choose(p, e, r, 0, &mut next)
    })?;
    let prefill = start.elapsed().as_secs_f64();
    // Each with its own room (`vec![v; b]` would clone, and a clone has no spare capacity).
    let mut outs: Vec<Vec<u32>> = (0..b).map(|_| Vec::with_capacity(cfg.max_tokens)).collect();
    let mut done = vec![cfg.max_tokens == 0; b];
    let mut passes = 0;
    let mut feeds: Vec<Vec<u32>> = (0..b).map(|_| Vec::with_capacity(1)).collect();
    for step in 0..cfg.max_tokens {
        for i in 0..b {
            if done[i] || stop.contains(&next[i]) {
                done[i] = true;
                continue;
            }
            outs[i].push(next[i]);
            done[i] = outs[i].len() == cfg.max_tokens;
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for (i, f) in feeds.iter_mut().enumerate() {
            f.clear();
            if !done[i] {
                f.push(next[i]);
            }
        }
        passes += feed_with(pass, &feeds, &mut host.feed, true, |p, e, r| {
            choose(p, e, r, step + 1, &mut next)
        })?;
    }
    let seqs = outs
        .into_iter()
        .map(|tokens| SeqCounts::default().stats(tokens))
        .collect();
    Ok(finish(seqs, passes, 0, start, prefill))
}

/// Speculative decoding of every prompt with `policy`, each sequence its own γ per step:
/// `target` and `draft` are batched states of one sequence per prompt (fresh). Greedy decoding
/// gives each sequence the tokens plain greedy decoding gives it.
pub fn speculative_batch(
    target: &mut (dyn BatchPass + Send),
    draft: &mut (dyn BatchPass + Send),
    prompts: &[Vec<u32>],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
) -> Result<BatchStats> {
    speculative_batch_traced(target, draft, prompts, stop, policy, cfg, &mut |_| {})
}

/// [`speculative_batch`], calling `on_step` after every step.
pub fn speculative_batch_traced(
    target: &mut (dyn BatchPass + Send),
    draft: &mut (dyn BatchPass + Send),
    prompts: &[Vec<u32>],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&BatchStep<'_>) + Send),
) -> Result<BatchStats> {
    // On a pool thread, as `plain_batch`.
    rayon::scope(|_| speculative_loop(target, draft, prompts, stop, policy, cfg, on_step))
}

fn speculative_loop(
    target: &mut dyn BatchPass,
    draft: &mut dyn BatchPass,
    prompts: &[Vec<u32>],
    stop: &[u32],
    policy: &Policy,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&BatchStep<'_>) + Send),
) -> Result<BatchStats> {
    check_batch(&[&*target, &*draft], prompts, cfg)?;
    cfg.check_catch_up()?;
    let (b, v, gm) = (prompts.len(), target.cfg().vocab, cfg.gamma_max as usize);
    if draft.cfg().vocab != v {
        return Err(Error::Other(format!(
            "draft vocabulary {} differs from the target's {v}",
            draft.cfg().vocab
        )));
    }
    if (MAX_STEP / b) < 2 {
        return Err(Error::Other(format!(
            "{b} sequences leave no room for a draft in a verification step of {MAX_STEP} rows: \
             speculative batches hold at most {} sequences (plain decoding batches up to \
             {MAX_STEP})",
            MAX_STEP / 2
        )));
    }
    if gm == 0 || (gm + 1) * b > MAX_STEP {
        return Err(Error::Other(format!(
            "γmax {gm} over {b} sequences: a verification pass of (γmax + 1) · sequences = {} \
             positions must fit a step of {MAX_STEP}: γmax 1 to {} (--gamma-max)",
            (gm + 1) * b,
            (MAX_STEP / b).saturating_sub(1)
        )));
    }
    // `auto`: the batch's stopping rule, under batched passes' costs measured while decoding.
    let mut auto = match policy {
        Policy::Auto(a) => {
            let mut s = BatchAuto::new(&a.model, &a.prior, b)?;
            s.gate_off = !a.gate;
            Some(s)
        }
        _ => None,
    };
    let mut active = vec![false; b];
    let greedy = cfg.temperature == 0.0;
    let start = Instant::now();
    let heads: Vec<&[u32]> = prompts.iter().map(|p| &p[..p.len() - 1]).collect();
    let mut host = Host::new(b, v, !greedy);
    let nothing = |_: &mut dyn BatchPass, _: &[usize], _: &[usize]| Ok(());
    feed_with(target, &heads, &mut host.feed, false, nothing)?;
    feed_with(draft, &heads, &mut host.feed, false, nothing)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|p| Seq::new(p[p.len() - 1], cfg, greedy, v))
        .collect();
    let (mut target_passes, mut draft_passes, mut steps) = (0, 0, 0u64);
    let mut vout = VerifyOutput::new(b, gm);
    let (mut tokens, mut gammas, mut qrows) = (Vec::new(), Vec::new(), Vec::new());
    let temps = vec![cfg.temperature; b];
    // A draft's first feed holds its backlog: up to every token of a run of plain steps.
    let room = MAX_STEP.max(cfg.max_tokens + 2);
    let mut feeds: Vec<Vec<u32>> = (0..b).map(|_| Vec::with_capacity(room)).collect();
    // Per sequence, the tokens fed to the draft in a step and in its first feed.
    let (mut fed, mut first_fed) = (vec![0usize; b], vec![0usize; b]);
    while seqs.iter().any(|s| !s.done) {
        // Draft: the first pass feeds each drafting sequence its backlog and pending token.
        let t_draft = Instant::now();
        let passes_before = draft_passes;
        for (a, s) in active.iter_mut().zip(&seqs) {
            *a = !s.done;
        }
        let gamma = auto.as_mut().map(|a| a.begin_step(gm, &active));
        for (s, f) in seqs.iter_mut().zip(&mut feeds) {
            f.clear();
            s.begin(policy, gamma, cfg, f);
        }
        for ((n, n0), f) in fed.iter_mut().zip(&mut first_fed).zip(&feeds) {
            (*n, *n0) = (0, f.len());
        }
        let mut first: Option<(usize, f64)> = None;
        while feeds.iter().any(|f| !f.is_empty()) {
            let t_feed = Instant::now();
            let passes_now = draft_passes;
            for ((s, f), n) in seqs.iter_mut().zip(&feeds).zip(&mut fed) {
                s.counts.draft_tokens += f.len();
                *n += f.len();
            }
            let (req, read, last) = (&mut host.req, &mut host.rows, &mut host.last);
            // Each ended sequence's draft statistics where the logits are (its own seed, random
            // step and accumulator); its row comes back only when sampling.
            draft_passes += feed_with(draft, &feeds, &mut host.feed, true, |p, ended, rows| {
                req.clear();
                for &i in ended {
                    req.opts.push(seqs[i].draft_options(i, cfg));
                    req.accums.push(seqs[i].accum[0]);
                }
                req.run(p, rows)?;
                for (k, &i) in ended.iter().enumerate() {
                    seqs[i].accum[0] = req.accums[k];
                    seqs[i].last = req.stats[k];
                }
                if greedy {
                    return Ok(());
                }
                read_rows(p, ended, rows, read, last)
            })?;
            // `auto`: one verdict for every sequence that drafted (they draft in lockstep).
            let verdict = auto.as_mut().map(|a| {
                let drafted = seqs.iter().zip(&feeds).enumerate();
                let drafted = drafted.filter(|(_, (_, f))| !f.is_empty());
                let v = a.decide(
                    drafted.map(|(i, (s, _))| (i, &s.accum[0], &s.last)),
                    cfg.compression,
                );
                (v.keep, v.more)
            });
            for (i, (s, f)) in seqs.iter_mut().zip(&mut feeds).enumerate() {
                if !f.is_empty() {
                    f.clear();
                    let row = if greedy { &[][..] } else { host.row(i) };
                    s.draft(i, policy, verdict, row, f)?;
                }
            }
            if first.is_none() {
                first = Some((draft_passes - passes_now, t_feed.elapsed().as_secs_f64()));
            }
        }
        let draft_seconds = t_draft.elapsed().as_secs_f64();
        let t_verify = Instant::now();
        // Verify: the target over [pending, drafts…] of every unfinished sequence, one pass.
        for (s, f) in seqs.iter().zip(&mut feeds) {
            s.verify_feed(f);
        }
        let all = |f: &[u32]| (0, f.len());
        let m = step_padded(target, &feeds, all, true, &mut host.feed.tokens)?;
        target_passes += 1;
        let g_step = m - 1;
        tokens.clear();
        gammas.clear();
        for s in &seqs {
            tokens.extend(s.xs.iter().map(|&x| x as i32));
            tokens.resize(tokens.len() + g_step - s.xs.len(), 0);
            gammas.push(s.xs.len() as i32);
        }
        qrows.clear();
        if !greedy {
            for s in &seqs {
                qrows.extend_from_slice(&s.qrows);
                qrows.resize(qrows.len() + (g_step - s.xs.len()) * v, 0.0);
            }
        }
        // Verified where the target's logits are (the draft's rows go up when sampling); only
        // the verdict comes back.
        let mut vb = VerifyBatch::resident(v, g_step, &tokens, &gammas, &temps);
        vb.draft = DraftDist::Logits {
            data: LogitsData::F32(&qrows),
            temperature: &temps,
        };
        (vb.seed, vb.step) = (cfg.seed, steps);
        target.verify_step(&vb, &mut vout)?;
        for (i, s) in seqs.iter_mut().enumerate().filter(|(_, s)| !s.done) {
            s.commit(i, &vout, target, draft, stop, cfg)?;
        }
        let verify_seconds = t_verify.elapsed().as_secs_f64();
        let (first_passes, first_seconds) = first.unwrap_or((0, 0.0));
        let draft_time = DraftTime {
            passes: draft_passes - passes_before,
            seconds: draft_seconds,
            first_passes,
            first_seconds,
            first_tokens: first_fed.iter().copied().max().unwrap_or(0),
        };
        if let Some(a) = auto.as_mut() {
            let accepted = (0..b).map(|i| (i, vout.accepted[i] as usize));
            a.end_step(&draft_time, g_step, verify_seconds, accepted);
        }
        on_step(&BatchStep {
            step: steps,
            active: &active,
            gammas: &gammas,
            accepted: &vout.accepted[..b],
            verify_positions: m,
            draft: draft_time,
            draft_tokens: &fed,
            first_tokens: &first_fed,
            verify_seconds,
        });
        steps += 1;
    }
    let seqs = seqs.into_iter().map(|s| s.counts.stats(s.out)).collect();
    Ok(finish(seqs, target_passes, draft_passes, start, prefill))
}

/// Decodes `prompts` together on `device` with `policy` (`None` = plain decoding of the target).
pub fn run_batch(
    pair: &Pair,
    device: &Device,
    prompts: &[Vec<u32>],
    policy: Option<&Policy>,
    cfg: &GenConfig,
) -> Result<BatchStats> {
    run_batch_traced(pair, device, prompts, policy, cfg, &mut |_| {})
}

/// [`run_batch`], calling `on_step` after every speculative step (plain decoding has none).
pub fn run_batch_traced(
    pair: &Pair,
    device: &Device,
    prompts: &[Vec<u32>],
    policy: Option<&Policy>,
    cfg: &GenConfig,
    on_step: &mut (dyn FnMut(&BatchStep<'_>) + Send),
) -> Result<BatchStats> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = batch_room(longest, cfg, prompts.len());
    let (mut t, mut d) = device.batch_passes(
        &pair.target,
        pair.draft_model(),
        pair.draft_mask(),
        room,
        prompts.len(),
    )?;
    let stop = &pair.tokenizer.stop;
    match policy {
        None => plain_batch(t.as_mut(), prompts, stop, cfg),
        Some(p) => speculative_batch_traced(t.as_mut(), d.as_mut(), prompts, stop, p, cfg, on_step),
    }
}

/// The γmax of a speculative batch of `b` sequences: `gamma_max`, capped at 16 / b − 1.
pub fn batch_gamma(gamma_max: u32, b: usize) -> u32 {
    gamma_max.min((MAX_STEP / b.max(1)).saturating_sub(1) as u32)
}

/// The batch's times, in every sequence's statistics too.
fn finish(
    mut seqs: Vec<GenStats>,
    target_passes: usize,
    draft_passes: usize,
    start: Instant,
    prefill: f64,
) -> BatchStats {
    let s = start.elapsed().as_secs_f64();
    let decoding = (s - prefill).max(1e-9);
    for q in &mut seqs {
        q.seconds = s;
        q.prefill_seconds = prefill;
        q.tokens_per_second = q.tokens.len() as f64 / decoding;
    }
    let all: usize = seqs.iter().map(|q| q.tokens.len()).sum();
    BatchStats {
        draft_tokens: seqs.iter().map(|q| q.draft_tokens).sum(),
        sequences: seqs,
        target_passes,
        draft_passes,
        seconds: s,
        prefill_seconds: prefill,
        tokens_per_second: all as f64 / decoding,
    }
}

/// The prompts fit the states: one per sequence, none empty, fresh states with room for them.
fn check_batch(passes: &[&dyn BatchPass], prompts: &[Vec<u32>], cfg: &GenConfig) -> Result<()> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::Empty { what: "prompt" });
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = batch_room(longest, cfg, prompts.len());
    for p in passes {
        if p.lens().len() != prompts.len() {
            return Err(Error::Other(format!(
                "{} prompts for a batched state of {} sequences",
                prompts.len(),
                p.lens().len()
            )));
        }
        if p.lens().iter().any(|&l| l != 0) {
            return Err(Error::Other(
                "a batched decode starts from empty caches".into(),
            ));
        }
        if room > p.capacity() {
            return Err(Error::Other(format!(
                "a batched decode of prompts up to {longest} tokens and {} new ones needs caches \
                 of {room} positions (`batch_room`); these hold {}",
                cfg.max_tokens,
                p.capacity()
            )));
        }
    }
    Ok(())
}

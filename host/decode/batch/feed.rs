//! The host's side of a batched decode: feeding the batched state (padded, cut back), and the
//! CPU backend turning each sequence's row into statistics and tokens.

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::backend::cpu::CpuBackend;
use crate::backend::forward::MAX_STEP;
use crate::error::Result;
use crate::model::pass::{argmax, token_of};
use crate::model::BatchPass;
use crate::stats::cpu::StatsScratch;
use crate::stats::{Logits, LogitsData, StatsOptions};

/// The host's side of a batched decode: each sequence's latest logits row, and the CPU backend
/// that turns rows into statistics, tokens and verdicts.
pub(super) struct Host {
    vocab: usize,
    /// `[B, vocab]`: each sequence's row after the last token it was fed.
    pub(super) last: Vec<f32>,
    pub(super) tokens: Vec<u32>,
    /// Rows read back from a pass.
    pub(super) rows: Vec<f32>,
    pub(super) cpu: CpuBackend,
    scratch: StatsScratch,
}

impl Host {
    pub(super) fn new(seqs: usize, vocab: usize) -> Host {
        Host {
            vocab,
            last: vec![0.0; seqs * vocab],
            tokens: Vec::with_capacity(MAX_STEP),
            rows: Vec::with_capacity(MAX_STEP * vocab),
            cpu: CpuBackend::new(),
            scratch: StatsScratch::default(),
        }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.last[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The statistics of sequence `i`'s row, `accum` updated as `opts` says, and the row.
    pub(super) fn stats(
        &mut self,
        i: usize,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum; 1],
    ) -> Result<(RowStats, &[f32])> {
        let v = self.vocab;
        let row = &self.last[i * v..(i + 1) * v];
        let l = Logits::dense(LogitsData::F32(row), v)?;
        let st = self
            .cpu
            .softmax_stats_into(&l, opts, Some(accum), &mut self.scratch)?[0];
        Ok((st, row))
    }

    /// Sequence `i`'s next token: the argmax, or the Gumbel-max draw of `opts`.
    pub(super) fn choose(&mut self, i: usize, opts: &StatsOptions) -> Result<u32> {
        if opts.temperature == 0.0 {
            return argmax(self.row(i), opts.step as usize);
        }
        let st = self.stats(i, opts, &mut [FeatureAccum::EMPTY])?.0;
        token_of(&st, opts)
    }
}

/// Feeds every sequence its tokens (none for some) in passes of at most 16 / B positions each,
/// and leaves in `host.last` each fed sequence's row after its last token. Returns the passes.
pub(super) fn feed(pass: &mut dyn BatchPass, feeds: &[&[u32]], host: &mut Host) -> Result<usize> {
    let (per, v) = (MAX_STEP / feeds.len(), host.vocab);
    let longest = feeds.iter().map(|f| f.len()).max().unwrap_or(0);
    let mut passes = 0;
    for at in (0..longest).step_by(per) {
        let parts: Vec<&[u32]> = feeds
            .iter()
            .map(|f| &f[at.min(f.len())..(at + per).min(f.len())])
            .collect();
        // Only the rows of sequences whose feed ends in this pass are read back; a pass where
        // none does skips the LM head.
        let ends: Vec<usize> = (0..feeds.len())
            .filter(|&i| !parts[i].is_empty() && at + parts[i].len() == feeds[i].len())
            .collect();
        let m = step_padded(pass, &parts, !ends.is_empty(), &mut host.tokens)?;
        passes += 1;
        let rows: Vec<usize> = ends.iter().map(|&i| i * m + parts[i].len() - 1).collect();
        host.rows.clear();
        pass.logits_rows(&rows, &mut host.rows)?;
        for (k, &i) in ends.iter().enumerate() {
            host.last[i * v..(i + 1) * v].copy_from_slice(&host.rows[k * v..(k + 1) * v]);
        }
    }
    Ok(passes)
}

/// One pass of every sequence over its part (at least one token in all), each padded to the
/// longest part m and cut back after it; with `logits` the pass leaves its logits `[B · m,
/// vocab]` on the device. Returns m.
pub(super) fn step_padded(
    pass: &mut dyn BatchPass,
    parts: &[&[u32]],
    logits: bool,
    tokens: &mut Vec<u32>,
) -> Result<usize> {
    let m = parts.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
    let before = pass.lens().to_vec();
    tokens.clear();
    for p in parts {
        tokens.extend_from_slice(p);
        let pad = p.last().copied().unwrap_or(0);
        tokens.resize(tokens.len() + m - p.len(), pad);
    }
    pass.step_batch_resident(tokens, logits)?;
    for (i, p) in parts.iter().enumerate() {
        pass.truncate_seq(i, before[i] + p.len())?;
    }
    Ok(m)
}

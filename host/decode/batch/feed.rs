//! The host's side of a batched decode: feeding the batched state (padded, cut back), the
//! sequences' rows' statistics computed where the logits are, and the buffers all that reuses.

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::backend::forward::MAX_STEP;
use crate::error::Result;
use crate::model::BatchPass;
use crate::stats::StatsOptions;

/// The host's side of a batched decode: the buffers a step reuses.
pub(super) struct Host {
    vocab: usize,
    /// `[B, vocab]`: each sequence's row after the last token it was fed, when read back (the
    /// draft's rows of a sampled verification).
    pub(super) last: Vec<f32>,
    /// Rows read back from a pass.
    pub(super) rows: Vec<f32>,
    pub(super) feed: FeedBufs,
    pub(super) req: Requests,
}

/// What [`feed_with`] fills: a pass's tokens, and the sequences whose feed ended in it with their
/// rows among the pass's.
pub(super) struct FeedBufs {
    pub(super) tokens: Vec<u32>,
    ended: Vec<usize>,
    rows: Vec<usize>,
}

/// A pass's statistics requests: one options and accumulator per ended sequence, and the
/// statistics that come back.
pub(super) struct Requests {
    pub(super) opts: Vec<StatsOptions>,
    pub(super) accums: Vec<FeatureAccum>,
    pub(super) stats: Vec<RowStats>,
}

impl Requests {
    /// Empties the requests (then one `opts` and `accums` entry per row).
    pub(super) fn clear(&mut self) {
        self.opts.clear();
        self.accums.clear();
    }

    /// The statistics of `rows`, request k with `opts[k]` and `accums[k]`, computed where the
    /// pass's logits are.
    pub(super) fn run(&mut self, pass: &mut dyn BatchPass, rows: &[usize]) -> Result<()> {
        pass.rows_stats(rows, &self.opts, &mut self.accums, &mut self.stats)
    }
}

impl Host {
    /// Buffers for `seqs` sequences; with `rows`, room to read their rows back.
    pub(super) fn new(seqs: usize, vocab: usize, rows: bool) -> Host {
        let n = if rows { seqs * vocab } else { 0 };
        Host {
            vocab,
            last: vec![0.0; n],
            rows: Vec::with_capacity(n),
            feed: FeedBufs {
                tokens: Vec::with_capacity(MAX_STEP),
                ended: Vec::with_capacity(MAX_STEP),
                rows: Vec::with_capacity(MAX_STEP),
            },
            req: Requests {
                opts: Vec::with_capacity(MAX_STEP),
                accums: Vec::with_capacity(MAX_STEP),
                stats: Vec::with_capacity(MAX_STEP),
            },
        }
    }

    /// Sequence `i`'s row, as last read back.
    pub(super) fn row(&self, i: usize) -> &[f32] {
        &self.last[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Reads the rows of the `ended` sequences (`rows` among the pass's) back into `last` (`[B,
/// vocab]`), through `read`.
pub(super) fn read_rows(
    pass: &mut dyn BatchPass,
    ended: &[usize],
    rows: &[usize],
    read: &mut Vec<f32>,
    last: &mut [f32],
) -> Result<()> {
    read.clear();
    pass.logits_rows(rows, read)?;
    let v = read.len() / rows.len().max(1);
    for (k, &i) in ended.iter().enumerate() {
        last[i * v..(i + 1) * v].copy_from_slice(&read[k * v..(k + 1) * v]);
    }
    Ok(())
}

/// Feeds every sequence its tokens (none for some) in passes of at most 16 / B positions each.
/// After each pass in which some feeds end, `at_end` gets the state, those sequences and the
/// index of each one's last row among the pass's rows. With `logits` false no pass computes
/// logits (a prefill whose last rows nobody reads); with it, only passes where a feed ends do.
/// Returns the passes.
pub(super) fn feed_with<F: AsRef<[u32]>>(
    pass: &mut dyn BatchPass,
    feeds: &[F],
    bufs: &mut FeedBufs,
    logits: bool,
    mut at_end: impl FnMut(&mut dyn BatchPass, &[usize], &[usize]) -> Result<()>,
) -> Result<usize> {
    let per = MAX_STEP / feeds.len();
    let longest = feeds.iter().map(|f| f.as_ref().len()).max().unwrap_or(0);
    let FeedBufs {
        tokens,
        ended,
        rows,
    } = bufs;
    let mut passes = 0;
    for at in (0..longest).step_by(per) {
        let part = |f: &[u32]| (at.min(f.len()), (at + per).min(f.len()));
        ended.clear();
        ended.extend((0..feeds.len()).filter(|&i| {
            let f = feeds[i].as_ref();
            let (a, b) = part(f);
            b > a && b == f.len()
        }));
        let want = logits && !ended.is_empty();
        let m = step_padded(pass, feeds, part, want, tokens)?;
        passes += 1;
        if want {
            rows.clear();
            rows.extend(ended.iter().map(|&i| {
                let (a, b) = part(feeds[i].as_ref());
                i * m + (b - a) - 1
            }));
            at_end(pass, ended, rows)?;
        }
    }
    Ok(passes)
}

/// One pass of every sequence over its part of its feed (`part(feed)`: the range of it, at
/// least one token in all), each padded to the longest part m and cut back after it; with
/// `logits` the pass leaves its logits `[B · m, vocab]` where it runs. Returns m.
pub(super) fn step_padded<F: AsRef<[u32]>>(
    pass: &mut dyn BatchPass,
    feeds: &[F],
    part: impl Fn(&[u32]) -> (usize, usize),
    logits: bool,
    tokens: &mut Vec<u32>,
) -> Result<usize> {
    let m = feeds
        .iter()
        .map(|f| {
            let (a, b) = part(f.as_ref());
            b - a
        })
        .max()
        .unwrap_or(0)
        .max(1);
    tokens.clear();
    for f in feeds {
        let f = f.as_ref();
        let (a, b) = part(f);
        tokens.extend_from_slice(&f[a..b]);
        let pad = f[a..b].last().copied().unwrap_or(0);
        tokens.resize(tokens.len() + m - (b - a), pad);
    }
    pass.step_batch_resident(tokens, logits)?;
    // Every sequence advanced by m: cut each one's padding off.
    for (i, f) in feeds.iter().enumerate() {
        let (a, b) = part(f.as_ref());
        let len = pass.lens()[i];
        pass.truncate_seq(i, len - m + (b - a))?;
    }
    Ok(m)
}

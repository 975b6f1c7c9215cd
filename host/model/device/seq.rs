//! What both device executors keep about their sequences besides the buffers ([`SeqState`]), and
//! the checks and chunking of a call (a call of more than 16 positions runs as several steps).

use super::{program, Fuse, Op, Shape};
use crate::error::{Error, Result};
use crate::model::pass;

/// What both executors keep about their sequences besides the buffers: which layers run and the
/// launch programs for them (built once, not per step), each sequence's cache length (one unless
/// the state is batched) and their capacity, and the last
/// [`Pass::run`](crate::model::Pass::run)'s logits.
pub(crate) struct SeqState {
    active: Vec<bool>,
    /// Every combination of fusions (by [`Fuse::index`]), each without and with the LM head.
    programs: [[Vec<Op>; 2]; 4],
    /// The fusions a chunk of `rows` rows allows, by rows (0..=16: [`Fuse::for_step`], planned
    /// once here, not per launch: the executors look up the program at every launch).
    can_fuse: Vec<Fuse>,
    /// The fusions a step may make (all by default; fewer to compare): each step makes those of
    /// them its rows allow ([`Fuse::for_step`]).
    pub fuse: Fuse,
    /// Every sequence's length.
    lens: Vec<usize>,
    pub capacity: usize,
    pub last: Vec<f32>,
    /// Rows of the last batched step whose logits the device holds (0: none).
    pub step_rows: usize,
}

impl SeqState {
    pub(crate) fn new(
        active: Vec<bool>,
        shape: &Shape,
        capacity: usize,
        seqs: usize,
    ) -> Result<SeqState> {
        pass::check_seqs(seqs)?;
        Ok(SeqState {
            programs: programs(&active),
            // No chunk has 0 rows (`check_batch`); its slot only keeps the index equal to rows.
            can_fuse: (0..=crate::backend::forward::MAX_STEP)
                .map(|rows| match rows {
                    0 => Fuse::NONE,
                    _ => Fuse::for_step(shape, rows),
                })
                .collect(),
            fuse: Fuse::ALL,
            active,
            lens: vec![0; seqs],
            capacity,
            last: Vec::new(),
            step_rows: 0,
        })
    }

    /// The first sequence's length (the only one of an unbatched state).
    pub(crate) fn len(&self) -> usize {
        self.lens[0]
    }

    pub(crate) fn seqs(&self) -> usize {
        self.lens.len()
    }

    /// Every sequence's length.
    pub(crate) fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The single-sequence calls (the [`Pass`](crate::model::Pass) methods) on a batched state are
    /// an error: it steps with its batch calls.
    pub(crate) fn single(&self) -> Result<()> {
        pass::check_single(self.seqs())
    }

    /// A step of `rows` tokens over every sequence checked: returns its positions per sequence.
    pub(crate) fn check_batch(&self, rows: usize) -> Result<usize> {
        crate::backend::forward::check_batch(rows, &self.lens, self.capacity)
    }

    /// After a step: every sequence holds `m` more positions.
    pub(crate) fn advance(&mut self, m: usize) {
        for l in &mut self.lens {
            *l += m;
        }
    }

    /// Forgets every position of sequence `seq` from `len` on.
    pub(crate) fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()> {
        pass::truncate_seq(&mut self.lens, seq, len)
    }

    /// `rows` of the last batched step's logits are on the device.
    pub(crate) fn check_rows(&self, rows: &[usize]) -> Result<()> {
        pass::check_rows(rows, self.step_rows)
    }

    /// `v` verifies the last batched step: one sequence per sequence of the state, γmax + 1 rows
    /// each, on the device.
    pub(crate) fn check_verify(&self, v: &crate::verify::VerifyBatch<'_>) -> Result<()> {
        pass::check_verify(v, self.seqs(), self.step_rows)
    }

    /// The launches of a chunk of `rows` rows (every sequence's), with the LM head when
    /// `logits`. A chunk is at most 16 rows (`check_batch`); past that nothing fuses.
    pub(crate) fn program(&self, rows: usize, logits: bool) -> &[Op] {
        let can = self.can_fuse.get(rows).copied().unwrap_or(Fuse::NONE);
        let fuse = Fuse {
            norm: can.norm && self.fuse.norm,
            silu: can.silu && self.fuse.silu,
        };
        &self.programs[fuse.index()][logits as usize]
    }

    /// Runs only the layers marked true (a self-speculative draft sharing the target's weights).
    pub(crate) fn set_active_layers(&mut self, active: Vec<bool>) -> Result<()> {
        if active.len() != self.active.len() {
            return Err(Error::Length {
                what: "active layers",
                got: active.len(),
                expected: self.active.len(),
            });
        }
        self.programs = programs(&active);
        self.active = active;
        Ok(())
    }

    /// Forgets every position from `len` on (of the first sequence): only the length changes, as
    /// on the device.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.lens[0] = len.min(self.lens[0]);
    }
}

/// Both executors' batched states are a [`BatchPass`](crate::model::BatchPass): their inherent
/// batch calls.
macro_rules! batch_pass {
    ($t:ty) => {
        // Each call forwards to `$t`'s own method of the same name. Were one missing, the call
        // would name this trait method itself and loop: every forward is a bare call, which the
        // compiler proves recursive, and this makes that an error.
        #[deny(unconditional_recursion)]
        impl crate::model::BatchPass for $t {
            fn lens(&self) -> &[usize] {
                self.seq.lens()
            }
            fn capacity(&self) -> usize {
                self.seq.capacity
            }
            fn step_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
                <$t>::step_batch(self, tokens)
            }
            fn step_batch_resident(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
                <$t>::step_batch_resident(self, tokens, logits)
            }
            fn logits_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
                <$t>::logits_rows(self, rows, out)
            }
            fn rows_stats(
                &mut self,
                rows: &[usize],
                opts: &[crate::stats::StatsOptions],
                accums: &mut [speckv_kernels::params::FeatureAccum],
                out: &mut Vec<speckv_kernels::params::RowStats>,
            ) -> Result<()> {
                <$t>::rows_stats(self, rows, opts, accums, out)
            }
            fn verify_step(
                &mut self,
                v: &crate::verify::VerifyBatch<'_>,
                out: &mut crate::verify::VerifyOutput,
            ) -> Result<()> {
                <$t>::verify_step(self, v, out)
            }
            fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()> {
                self.seq.truncate_seq(seq, len)
            }
        }
    };
}

pub(super) use batch_pass;

// A verification pass is one chunk of the device program.
const _: () = assert!(crate::verify::MAX_VERIFY_POSITIONS <= crate::backend::forward::MAX_STEP);

/// The checks of [`forward_chunks`] without keeping any rows: `chunk` runs each run of at most 16
/// positions, `true` for the last (its logits are computed and stay on the device).
pub(crate) fn resident_chunks(
    tokens: &[u32],
    len: usize,
    capacity: usize,
    vocab: usize,
    mut chunk: impl FnMut(&[u32], bool) -> Result<()>,
) -> Result<()> {
    check_call(tokens, 1, len, capacity, vocab)?;
    let n = tokens.len().div_ceil(crate::backend::forward::MAX_STEP);
    for (i, ch) in tokens.chunks(crate::backend::forward::MAX_STEP).enumerate() {
        chunk(ch, i + 1 == n)?;
    }
    Ok(())
}

/// Every token is inside the vocabulary.
pub(crate) fn check_vocab(tokens: &[u32], vocab: usize) -> Result<()> {
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Other(format!(
            "token {t} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// A call's tokens, `keep` and room in the cache, checked.
fn check_call(
    tokens: &[u32],
    keep: usize,
    len: usize,
    capacity: usize,
    vocab: usize,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Empty { what: "tokens" });
    }
    if keep == 0 || keep > tokens.len() {
        return Err(Error::Other(format!(
            "keep = {keep} rows of {} positions",
            tokens.len()
        )));
    }
    check_vocab(tokens, vocab)?;
    if len + tokens.len() > capacity {
        return Err(Error::Other(format!(
            "{} positions exceed the KV cache's {capacity}",
            len + tokens.len()
        )));
    }
    Ok(())
}

/// What both executors do with a call: check it (tokens, `keep`, room in the cache), then run
/// `chunk` on each run of at most 16 positions — `true` when its logits are wanted, and then it
/// returns them, `[chunk, vocab]` — and keep the logits of the last `keep` positions.
pub(crate) fn forward_chunks(
    tokens: &[u32],
    keep: usize,
    len: usize,
    capacity: usize,
    vocab: usize,
    mut chunk: impl FnMut(&[u32], bool) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    check_call(tokens, keep, len, capacity, vocab)?;
    let first_kept = tokens.len() - keep;
    let mut out = Vec::with_capacity(keep * vocab);
    let mut done = 0;
    for ch in tokens.chunks(crate::backend::forward::MAX_STEP) {
        let want = done + ch.len() > first_kept;
        let rows = chunk(ch, want)?;
        if want {
            let from = first_kept.saturating_sub(done);
            out.extend_from_slice(&rows[from * vocab..]);
        }
        done += ch.len();
    }
    Ok(out)
}

/// Every program of these layers: [fusions by `Fuse::index`][without, with the LM head].
fn programs(active: &[bool]) -> [[Vec<Op>; 2]; 4] {
    [0, 1, 2, 3].map(|i| {
        let fuse = Fuse {
            norm: i & 1 != 0,
            silu: i & 2 != 0,
        };
        [false, true].map(|logits| program(active, logits, fuse))
    })
}

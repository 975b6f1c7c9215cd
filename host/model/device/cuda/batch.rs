//! A batched decode state's calls on CUDA: steps of every sequence, the rows read back, and
//! verification where the logits are.

use speckv_kernels::params::{FeatureAccum, RowStats};

use super::CudaForward;
use crate::backend::cuda::ResidentVerify;
use crate::backend::forward::MAX_STEP;
use crate::error::Result;
use crate::stats::StatsOptions;
use crate::verify::{VerifyBatch, VerifyOutput};

impl CudaForward<'_> {
    /// One step of every sequence of the batch: `tokens` holds m tokens per sequence, sequence by
    /// sequence (at most 16 in all). Returns the logits `[seqs · m, vocab]`.
    pub fn step_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.step_batch_resident(tokens, true)?;
        let rows = tokens.len() * self.w.shape.vocab;
        Ok(self
            .cuda
            .stream()
            .clone_dtoh(&self.logits()?.slice(..rows))?)
    }

    /// [`CudaForward::step_batch`] leaving the logits on the device (none without `logits`: the
    /// LM head is skipped); [`CudaForward::logits_rows`] reads the rows wanted. Nothing waits.
    pub fn step_batch_resident(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
        super::super::check_vocab(tokens, self.w.shape.vocab)?;
        self.seq.step_rows = 0;
        self.enqueue(tokens, logits)?;
        self.seq.step_rows = if logits { tokens.len() } else { 0 };
        Ok(())
    }

    /// Verifies the last batched step's logits, `[seqs, γmax + 1, vocab]` on the device, as the
    /// target rows of `v` (one sequence per sequence of the state; `v.target` is not read).
    pub fn verify_step(&mut self, v: &VerifyBatch<'_>, out: &mut VerifyOutput) -> Result<()> {
        self.seq.check_verify(v)?;
        let mut r = self.take_verify()?;
        let done = self
            .cuda
            .verify_resident_batch(&mut r, self.logits()?, v, out);
        self.verify = Some(r);
        done
    }

    /// The verification buffers (made on first use, for every sequence at the most drafts a
    /// step of 16 rows holds), taken out while a verification borrows the logits.
    pub(super) fn take_verify(&mut self) -> Result<ResidentVerify> {
        match self.verify.take() {
            Some(r) => Ok(r),
            None => {
                let b = self.seq.seqs();
                let g = MAX_STEP / b - 1;
                self.cuda.resident_verify(b, g, self.w.shape.vocab)
            }
        }
    }

    /// The statistics of `rows` of the last batched step, each with its options and accumulator
    /// (rows the step left; the options and lengths are checked once, by
    /// `rows_stats_resident`):
    /// one copy up of the row descriptions and accumulators, one `softmax_stats_v3` launch, one
    /// copy back of every row's `RowStats` and accumulator.
    pub fn rows_stats(
        &mut self,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        out: &mut Vec<RowStats>,
    ) -> Result<()> {
        self.seq.check_rows(rows)?;
        let cuda = self.cuda;
        let mut r = match self.rows_stats.take() {
            Some(r) => r,
            None => cuda.resident_rows(MAX_STEP, self.w.shape.vocab)?,
        };
        let done = cuda.rows_stats_resident(&mut r, self.logits()?, rows, opts, accums, out);
        self.rows_stats = Some(r);
        done
    }

    /// Appends to `out` the logits of `rows` of the last batched step, in order: one copy per
    /// run of consecutive rows.
    pub fn logits_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.seq.check_rows(rows)?;
        let (v, logits, st) = (self.w.shape.vocab, self.logits()?, self.cuda.stream());
        let mut i = 0;
        while i < rows.len() {
            let mut j = i + 1;
            while j < rows.len() && rows[j] == rows[j - 1] + 1 {
                j += 1;
            }
            // Straight into `out`'s new tail (no staging vector per run).
            let (from, n) = (out.len(), (j - i) * v);
            out.resize(from + n, 0.0);
            let src = logits.slice(rows[i] * v..(rows[j - 1] + 1) * v);
            st.memcpy_dtoh(&src, &mut out[from..])?;
            i = j;
        }
        Ok(())
    }
}

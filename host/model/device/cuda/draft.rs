//! A draft phase on the device with no host wait inside it (`Pass::draft_run` of a CUDA pass): the
//! γ draft passes are enqueued back to back, each pass's token and cache length fed from device
//! memory — the token is the previous pass's `RowStats` argmax (or sampled token), copied device to
//! device into the step's token buffer — and the host reads every pass's statistics, the
//! accumulator and (when sampling) the rows back once, at the end. The per-token path
//! (`run_stats`) instead reads each pass's statistics back before the next pass: one wait per
//! draft, and a host-to-device copy of the token and length from pageable memory, which the driver
//! may complete only after the stream's earlier work.

use cudarc::driver::CudaSlice;
use speckv_kernels::params::{FeatureAccum, RowStats};

use super::{logits_of, CudaForward};
use crate::backend::forward::MAX_STEP;
use crate::error::{Error, Result};
use crate::model::pass::{check_draft_run, draft_options, token_of, DraftRun};
use crate::stats::StatsOptions;

/// `RowStats` as u32 words, and the words of its argmax and sampled token.
const SLOT: usize = std::mem::size_of::<RowStats>() / 4;
const ARGMAX_WORD: usize = std::mem::offset_of!(RowStats, argmax) / 4;
const SAMPLED_WORD: usize = std::mem::offset_of!(RowStats, sampled) / 4;

/// The device buffers of a draft phase, made on first use and kept.
pub(super) struct DraftPhase {
    /// One `RowStats` slot per draft.
    stats: CudaSlice<u32>,
    accum: CudaSlice<u32>,
    /// Each pass's cache length before it.
    lens: CudaSlice<u32>,
    /// The drafts' rows `[γ, vocab]` (sampling only).
    rows: Option<CudaSlice<f32>>,
}

impl CudaForward<'_> {
    /// [`crate::model::Pass::draft_run`] as one enqueued phase (checked first: nothing runs on a
    /// refused call).
    pub(super) fn draft_phase(
        &mut self,
        feed: &[u32],
        gamma: usize,
        opts: &StatsOptions,
        want_rows: bool,
        out: &mut DraftRun,
    ) -> Result<()> {
        check_draft_run(feed, gamma, opts)?;
        self.seq.single()?;
        let (l0, m0, v) = (self.seq.len(), feed.len(), self.w.shape.vocab);
        super::super::check_vocab(feed, v)?;
        if m0 > MAX_STEP || l0 + m0 + gamma - 1 > self.seq.capacity {
            return Err(Error::Other(format!(
                "a draft phase feeding {m0} tokens then {} drafts at length {l0}: at most \
                 {MAX_STEP} fed, and the cache holds {}",
                gamma - 1,
                self.seq.capacity
            )));
        }
        let cuda = self.cuda;
        let st = cuda.stream().clone();
        let mut r = match self.stats.take() {
            Some(r) => r,
            None => cuda.resident_stats(v)?,
        };
        let mut ph = match self.draft.take() {
            Some(p) => p,
            None => DraftPhase {
                stats: st.alloc_zeros::<u32>(MAX_STEP * SLOT)?,
                accum: st.alloc_zeros::<u32>(std::mem::size_of::<FeatureAccum>() / 4)?,
                lens: st.alloc_zeros::<u32>(MAX_STEP)?,
                rows: None,
            },
        };
        if want_rows && ph.rows.is_none() {
            ph.rows = Some(st.alloc_zeros::<f32>(MAX_STEP * v)?);
        }
        let done = self.enqueue_phase(&mut r, &mut ph, feed, gamma, opts, want_rows, out);
        self.stats = Some(r);
        self.draft = Some(ph);
        done
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue_phase(
        &mut self,
        r: &mut crate::backend::cuda::ResidentStats,
        ph: &mut DraftPhase,
        feed: &[u32],
        gamma: usize,
        opts: &StatsOptions,
        want_rows: bool,
        out: &mut DraftRun,
    ) -> Result<()> {
        let (l0, m0, v) = (self.seq.len(), feed.len(), self.w.shape.vocab);
        let st = self.cuda.stream().clone();
        // The only uploads: the fed tokens and every pass's length (nothing allocated per phase).
        let mut lens = [0u32; MAX_STEP];
        for (j, l) in lens.iter_mut().enumerate().take(gamma) {
            *l = (if j == 0 { l0 } else { l0 + m0 + j - 1 }) as u32;
        }
        st.memcpy_htod(&lens[..gamma], &mut ph.lens.slice_mut(..gamma))?;
        st.memcpy_htod(feed, &mut self.tokens_dev.slice_mut(..m0))?;
        let word = if opts.temperature == 0.0 {
            ARGMAX_WORD
        } else {
            SAMPLED_WORD
        };
        for j in 0..gamma {
            let m = if j == 0 { m0 } else { 1 };
            st.memcpy_dtod(&ph.lens.slice(j..j + 1), &mut self.len_dev.slice_mut(..1))?;
            if j > 0 {
                // The previous draft's token, where its statistics kernel wrote it.
                let at = (j - 1) * SLOT + word;
                st.memcpy_dtod(
                    &ph.stats.slice(at..at + 1),
                    &mut self.tokens_dev.slice_mut(..1),
                )?;
            }
            self.launch_program(m, true)?;
            self.seq.advance(m);
            let logits = logits_of(&self.acts)?;
            let o = draft_options(opts, j);
            self.cuda
                .stats_enqueue(r, logits, m - 1, &o, &mut ph.stats, j, &mut ph.accum, 0)?;
            if let (true, Some(rows)) = (want_rows, ph.rows.as_mut()) {
                st.memcpy_dtod(
                    &logits.slice((m - 1) * v..m * v),
                    &mut rows.slice_mut(j * v..(j + 1) * v),
                )?;
            }
        }
        // The phase's one wait.
        let mut words = [0u32; MAX_STEP * SLOT];
        st.memcpy_dtoh(&ph.stats.slice(..gamma * SLOT), &mut words[..gamma * SLOT])?;
        let mut acc = [0u32; std::mem::size_of::<FeatureAccum>() / 4];
        st.memcpy_dtoh(&ph.accum, &mut acc)?;
        out.tokens.clear();
        out.stats.clear();
        out.rows.clear();
        for j in 0..gamma {
            let s: RowStats = bytemuck::pod_read_unaligned(bytemuck::cast_slice(
                &words[j * SLOT..(j + 1) * SLOT],
            ));
            out.tokens.push(token_of(&s, &draft_options(opts, j))?);
            out.stats.push(s);
        }
        out.accum = bytemuck::pod_read_unaligned(bytemuck::cast_slice(&acc));
        if let (true, Some(rows)) = (want_rows, ph.rows.as_ref()) {
            out.rows.resize(gamma * v, 0.0);
            st.memcpy_dtoh(&rows.slice(..gamma * v), &mut out.rows)?;
        }
        Ok(())
    }
}

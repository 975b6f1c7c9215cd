//! The device forward pass on the emulator: every [`Op`] of the program is the kernel's own source
//! run by [`Emulator`] (sanitizer on, several schedules), over host buffers standing in for device
//! memory. Slow by design; it is how `cargo test` checks the GPU's decode step without a GPU.

use std::collections::HashMap;

use speckv_kernels::params::{FeatureAccum, RowStats};

use super::{
    check_vocab, forward_chunks, resident_chunks, Act, DeviceView, Fuse, Lin, Op, SeqState,
};
use crate::backend::emulate::{Emulator, Stop};
use crate::backend::forward::{AlignedF32, MAX_STEP};
use crate::error::{Error, Result};
use crate::model::pass::{check_stats_call, fixed_capacity, resident_next_token, DraftStop, Pass};
use crate::model::{Config, Model};
use crate::plan::GemvVersion;
use crate::stats::{Logits, LogitsData, StatsOptions};
use crate::verify::{VerifyBatch, VerifyOutput, VerifyStep};
use crate::weights::gemv::Fusion;

/// A model's decode state on the emulator: activations, KV cache, cache length — of one sequence,
/// or of a batch stepped together ([`EmulatedForward::new_batch`]).
pub struct EmulatedForward<'m> {
    view: DeviceView<'m>,
    emu: Emulator,
    sm_count: u32,
    acts: HashMap<Act, AlignedF32>,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    rope: Vec<[f32; 2]>,
    seq: SeqState,
}

impl<'m> EmulatedForward<'m> {
    /// A decode state for `model` holding up to `capacity` positions, launching with `emu`'s block
    /// size for the elementwise and attention kernels and GEMV plans made for `sm_count` SMs.
    pub fn new(
        model: &'m Model,
        emu: Emulator,
        sm_count: u32,
        capacity: usize,
    ) -> Result<EmulatedForward<'m>> {
        Self::new_batch(model, emu, sm_count, capacity, 1)
    }

    /// A decode state of `seqs` sequences of up to `capacity` positions each, stepped together
    /// ([`EmulatedForward::step_batch`]).
    pub fn new_batch(
        model: &'m Model,
        emu: Emulator,
        sm_count: u32,
        capacity: usize,
        seqs: usize,
    ) -> Result<EmulatedForward<'m>> {
        let view = DeviceView::new(model)?;
        if capacity == 0 || capacity > model.cfg.context {
            return Err(Error::Other(format!(
                "a KV cache of {capacity} positions: 1 to the context of {} are allowed",
                model.cfg.context
            )));
        }
        let s = view.shape;
        let acts = Act::ALL
            .iter()
            .map(|&a| (a, AlignedF32::zeros(MAX_STEP * a.width(&s))))
            .collect();
        let kvw = s.heads.kv_width();
        Ok(EmulatedForward {
            seq: SeqState::new(view.active().to_vec(), &s, capacity, seqs)?,
            rope: view.rope_table(capacity),
            view,
            emu,
            sm_count,
            acts,
            k: vec![vec![0; seqs * capacity * kvw]; s.layers],
            v: vec![vec![0; seqs * capacity * kvw]; s.layers],
        })
    }

    /// Positions in the cache (of the first sequence).
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// Every sequence's positions.
    pub fn lens(&self) -> &[usize] {
        self.seq.lens()
    }

    /// One step of every sequence of the batch: `tokens` holds m tokens per sequence, sequence by
    /// sequence (at most 16 in all). Returns the logits `[seqs · m, vocab]`.
    pub fn step_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.step_batch_resident(tokens, true)?;
        Ok(self.rows(Act::Logits, tokens.len()).to_vec())
    }

    /// [`EmulatedForward::step_batch`] leaving the logits on the device (none without `logits`:
    /// the LM head is skipped); [`EmulatedForward::logits_rows`] reads the rows wanted.
    pub fn step_batch_resident(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
        check_vocab(tokens, self.view.shape.vocab)?;
        self.seq.step_rows = 0;
        self.chunk(tokens, logits)?;
        self.seq.step_rows = if logits { tokens.len() } else { 0 };
        Ok(())
    }

    /// Verifies the last batched step's logits, `[seqs, γmax + 1, vocab]`, as the target rows of
    /// `v` (one sequence per sequence of the state; `v.target` is not read) by the emulated v2
    /// kernels.
    pub fn verify_step(&mut self, v: &VerifyBatch<'_>, out: &mut VerifyOutput) -> Result<()> {
        self.seq.check_verify(v)?;
        v.validate_device()?;
        let p = self.rows(Act::Logits, self.seq.step_rows);
        let vb = v.over_rows(p, self.view.shape.vocab);
        *out = self.emu.verify_v2(&vb, self.sm_count)?;
        Ok(())
    }

    /// The statistics of `rows` of the last batched step, each with its options and accumulator
    /// (rows the step left; the options and lengths are checked once, by the emulated launch),
    /// by the emulated `softmax_stats_v3`: one launch for every row, as on the GPU.
    pub fn rows_stats(
        &mut self,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        out: &mut Vec<RowStats>,
    ) -> Result<()> {
        self.seq.check_rows(rows)?;
        let v = self.view.shape.vocab;
        let n = self.seq.step_rows;
        let all = self::rows(&self.acts, Act::Logits, n, &self.view.shape);
        let l = Logits::dense(LogitsData::F32(&all[..n * v]), v)?;
        *out = self
            .emu
            .softmax_stats_v3(&l, rows, opts, accums, self.sm_count)?;
        Ok(())
    }

    /// Appends to `out` the logits of `rows` of the last batched step, in order.
    pub fn logits_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.seq.check_rows(rows)?;
        let v = self.view.shape.vocab;
        let all = self.rows(Act::Logits, self.seq.step_rows);
        for &r in rows {
            out.extend_from_slice(&all[r * v..(r + 1) * v]);
        }
        Ok(())
    }

    /// Forgets every position of sequence `seq` from `len` on.
    pub fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()> {
        self.seq.truncate_seq(seq, len)
    }

    /// Runs only the layers marked true (a self-speculative draft sharing the target's weights).
    pub fn set_active_layers(&mut self, active: Vec<bool>) -> Result<()> {
        self.seq.set_active_layers(active)
    }

    pub fn is_empty(&self) -> bool {
        self.seq.len() == 0
    }

    /// Forgets every position from `len` on (rejected drafts).
    pub fn truncate(&mut self, len: usize) {
        self.seq.truncate(len)
    }

    /// Logits `[keep, vocab]` of the last `keep` positions after `tokens`, appended to the cache
    /// in chunks of at most 16 (the CPU pass's [`Model::forward`], on the device kernels).
    pub fn forward(&mut self, tokens: &[u32], keep: usize) -> Result<Vec<f32>> {
        self.seq.single()?;
        let (len, capacity, vocab) = (self.seq.len(), self.seq.capacity, self.view.shape.vocab);
        forward_chunks(tokens, keep, len, capacity, vocab, |ch, want| {
            self.chunk(ch, want)?;
            Ok(if want {
                self.rows(Act::Logits, ch.len()).to_vec()
            } else {
                Vec::new()
            })
        })
    }

    /// Appends `tokens` leaving the logits of the last chunk's positions in the device's logits
    /// buffer (nothing read back); returns how many rows that chunk has.
    fn advance(&mut self, tokens: &[u32]) -> Result<usize> {
        self.seq.single()?;
        let (len, capacity, vocab) = (self.seq.len(), self.seq.capacity, self.view.shape.vocab);
        let mut last = 0;
        resident_chunks(tokens, len, capacity, vocab, |ch, want| {
            last = ch.len();
            self.chunk(ch, want)
        })?;
        Ok(last)
    }

    /// One chunk of at most 16 rows through the program: m positions of every sequence.
    fn chunk(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
        let m = self.seq.check_batch(tokens.len())?;
        for k in 0..self.seq.program(tokens.len(), logits).len() {
            let op = self.seq.program(tokens.len(), logits)[k];
            self.run(op, tokens)?;
        }
        self.seq.advance(m);
        Ok(())
    }

    /// The first `m` rows of an activation buffer.
    fn rows(&self, a: Act, m: usize) -> &[f32] {
        rows(&self.acts, a, m, &self.view.shape)
    }

    /// One projection by the v4 plan (what CUDA launches), y's rows as `fusion` leaves them.
    fn gemv(&mut self, w: Lin, x: Act, y: Act, m: usize, fusion: Fusion<&[f32]>) -> Result<()> {
        let q = self.view.matrix(w)?;
        let mut out = self.rows(y, m).to_vec();
        let (x, sm) = (self.rows(x, m), self.sm_count);
        // A gate / up row is read whole (`rows` gives it at its own width, 2·ffn).
        debug_assert_eq!(x.len(), m * fusion.x_width(q.shape().1));
        self.emu
            .gemv_into(q, x, &mut out, m, sm, GemvVersion::V4, fusion)?;
        self.put(y, &out);
        Ok(())
    }

    /// Which fusions one-row steps may make ([`Fuse::ALL`] by default; [`Fuse::NONE`] runs each
    /// norm and gate as its own launch, what the fused program is checked against).
    pub fn set_fusion(&mut self, fuse: Fuse) {
        self.seq.fuse = fuse;
    }

    /// The launches a chunk of `rows` rows makes (every sequence's), with the LM head when
    /// `logits`: the program under the fusions those rows allow and [`Self::set_fusion`] permits.
    pub fn program_for(&self, rows: usize, logits: bool) -> &[super::Op] {
        self.seq.program(rows, logits)
    }

    fn put(&mut self, a: Act, v: &[f32]) {
        if let Some(b) = self.acts.get_mut(&a) {
            b.as_mut_slice()[..v.len()].copy_from_slice(v);
        }
    }

    fn run(&mut self, op: Op, tokens: &[u32]) -> Result<()> {
        let m = tokens.len();
        let s = self.view.shape;
        match op {
            Op::Embed => {
                let x = self.emu.embed(self.view.embed_table(), s.hidden, tokens)?;
                self.put(Act::X, &x);
            }
            Op::RmsNorm { norm } => {
                let w = self.view.norm(norm)?;
                let (_, xn) = self
                    .emu
                    .rms_norm(self.rows(Act::X, m), None, w, self.view.eps())?;
                self.put(Act::Xn, &xn);
            }
            Op::Gemv { .. } | Op::NormGemv { .. } | Op::SiluGemv { .. } => {
                let g = op.gemv().ok_or_else(|| Error::Other(format!("{op:?}")))?;
                let fusion = Fusion {
                    norm: match g.norm {
                        Some(n) => Some((self.view.norm(n)?, self.view.eps())),
                        None => None,
                    },
                    silu: g.silu,
                    accumulate: g.accumulate,
                };
                self.gemv(g.w, g.x, g.y, m, fusion)?;
            }
            Op::QkvRope { layer } => {
                let q = self.emu.qkv_rope_batch(
                    rows(&self.acts, Act::Qkv, m, &s),
                    self.view.bias(layer),
                    &self.rope,
                    s.heads,
                    s.neox,
                    self.seq.lens(),
                    &mut self.k[layer],
                    &mut self.v[layer],
                )?;
                self.put(Act::Q, &q);
            }
            Op::Attention { layer } => {
                let att = self.emu.attention_v2_batch(
                    self.rows(Act::Q, m),
                    &self.k[layer],
                    &self.v[layer],
                    s.heads,
                    self.seq.lens(),
                    self.sm_count,
                )?;
                self.put(Act::Att, &att);
            }
            Op::SiluMul => {
                let f = self.emu.silu_mul(self.rows(Act::Gu, m), s.ffn)?;
                self.put(Act::Ffn, &f);
            }
        }
        Ok(())
    }
}

/// The first `m` rows of an activation buffer (a free function, so a launch can borrow the
/// activations and the cache separately).
fn rows<'a>(acts: &'a HashMap<Act, AlignedF32>, a: Act, m: usize, s: &super::Shape) -> &'a [f32] {
    match acts.get(&a) {
        Some(b) => &b.as_slice()[..m * a.width(s)],
        None => &[],
    }
}

super::seq::batch_pass!(EmulatedForward<'_>);

impl Pass for EmulatedForward<'_> {
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]> {
        self.seq.last = self.forward(tokens, keep)?;
        Ok(&self.seq.last)
    }
    fn len(&self) -> usize {
        self.seq.len()
    }
    fn truncate(&mut self, len: usize) {
        EmulatedForward::truncate(self, len)
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        fixed_capacity(positions, self.seq.capacity)
    }
    fn cfg(&self) -> &Config {
        &self.view.model.cfg
    }
    fn backend(&self) -> &'static str {
        "emulator"
    }
    fn next_token(&mut self, tokens: &[u32], opts: &StatsOptions) -> Result<u32> {
        resident_next_token(self, tokens, opts)
    }
    fn run_stats(
        &mut self,
        tokens: &[u32],
        opts: &StatsOptions,
        accum: &mut [FeatureAccum; 1],
        want_row: bool,
        stop: Option<&mut DraftStop<'_>>,
    ) -> Result<(RowStats, Option<&[f32]>)> {
        check_stats_call(opts, stop.as_deref())?;
        let m = self.advance(tokens)?;
        let v = self.view.shape.vocab;
        let row = &self.rows(Act::Logits, m)[(m - 1) * v..];
        let l = Logits::dense(LogitsData::F32(row), v)?;
        let st = match stop {
            None => {
                self.emu
                    .softmax_stats_v2(&l, opts, Some(accum), self.sm_count, None)?
                    .stats[0]
            }
            Some(s) => {
                // The decision in the statistics kernel's epilogue, as on the GPU.
                let (_, plan) = crate::plan::softmax_stats_v2(
                    1,
                    v as u32,
                    crate::stats::Dtype::F32,
                    self.sm_count,
                );
                let state = [s.state];
                let o = self.emu.softmax_stats_v2_stop(
                    &l,
                    opts,
                    accum,
                    &plan,
                    Stop {
                        weights: s.weights,
                        state: &state,
                        costs: s.costs,
                        gamma_max: s.gamma_max,
                        compression_code: s.compression_code,
                        odds_scale: s.odds_scale,
                        odds_scales: None,
                        lockstep: false,
                    },
                )?;
                if let Some(&after) = o.stop_state.as_ref().and_then(|v| v.first()) {
                    s.state = after;
                }
                o.stats[0]
            }
        };
        Ok((st, want_row.then_some(row)))
    }
    fn run_verify(
        &mut self,
        tokens: &[u32],
        step: &VerifyStep<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()> {
        step.check_positions(tokens.len())?;
        let m = self.advance(tokens)?;
        let g = step.draft_tokens.len();
        let v = self.view.shape.vocab;
        let (temps, gammas) = ([step.temperature], [g as i32]);
        let p = self.rows(Act::Logits, m);
        *out = self
            .emu
            .verify_v2(&step.batch(p, v, &temps, &gammas)?, self.sm_count)?;
        Ok(())
    }
}

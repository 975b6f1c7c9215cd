//! The CPU forward pass as a decode state: one sequence ([`CpuPass::new`], the single-sequence
//! loops' [`Pass`]) or several stepped together ([`CpuPass::new_batch`], a [`BatchPass`]). A batched
//! step runs every sequence's rows through one product per weight matrix — the weights are read
//! once per step, not once per sequence — and attention per sequence over its own cache.

use speckv_kernels::params::{FeatureAccum, RowStats};
use speckv_kernels::stop_rule;

use super::cache::{Kv, Work};
use super::pass::{
    argmax, check_rows, check_rows_stats, check_seqs, check_single, check_stats_call, check_verify,
    token_of, truncate_seq, BatchPass, DraftStop, Pass,
};
use super::{Config, Model};
use crate::backend::cpu::CpuBackend;
use crate::backend::forward::check_batch;
use crate::error::Result;
use crate::stats::cpu::StatsScratch;
use crate::stats::{Logits, LogitsData, StatsOptions};
use crate::verify::{VerifyBatch, VerifyOutput, VerifyStep};
use crate::weights::cpu::MAX_M;

/// The CPU forward pass ([`Model::forward_into`]) over its own caches, one per sequence,
/// optionally through a subset of the layers (a self-speculative draft).
pub struct CpuPass<'m> {
    model: &'m Model,
    kvs: Vec<Kv>,
    /// Every sequence's positions.
    lens: Vec<usize>,
    /// The forward pass's buffers, shared by the sequences of a batched step.
    work: Work,
    active: Option<&'m [bool]>,
    /// Logits of a call keeping more than `MAX_M` rows (scoring a text), owned.
    wide: Vec<f32>,
    /// Rows of the last batched step whose logits `work.logits` holds (0: none).
    step_rows: usize,
    /// The statistics and verification of the decode loops' steps, made once per pass.
    cpu: CpuBackend,
    scratch: StatsScratch,
}

impl<'m> CpuPass<'m> {
    /// A state of one sequence.
    pub fn new(model: &'m Model, active: Option<&'m [bool]>) -> CpuPass<'m> {
        CpuPass {
            model,
            kvs: vec![Kv::new(&model.cfg)],
            lens: vec![0],
            work: Work::new(&model.cfg),
            active,
            wide: Vec::new(),
            step_rows: 0,
            cpu: CpuBackend::new(),
            scratch: StatsScratch::default(),
        }
    }

    /// A batched state of `seqs` sequences (1 to 16), stepped together with the [`BatchPass`]
    /// calls; its caches grow as the device's do not, up to the model's context.
    pub fn new_batch(
        model: &'m Model,
        active: Option<&'m [bool]>,
        seqs: usize,
    ) -> Result<CpuPass<'m>> {
        check_seqs(seqs)?;
        let mut p = CpuPass::new(model, active);
        p.kvs = (0..seqs).map(|_| Kv::new(&model.cfg)).collect();
        p.lens = vec![0; seqs];
        Ok(p)
    }

    /// Sequence 0's forward pass (a state of one sequence): logits of the last `keep` positions.
    fn forward(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]> {
        check_single(self.lens.len())?;
        self.step_rows = 0;
        self.model.forward_parts(
            tokens,
            &mut self.kvs[0],
            &mut self.lens[0],
            &mut self.work,
            keep,
            self.active,
        )
    }

    /// The statistics of `row` as `opts` says (`accum` updated when given).
    fn stats_of(
        cpu: &CpuBackend,
        scratch: &mut StatsScratch,
        row: &[f32],
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<RowStats> {
        let l = Logits::dense(LogitsData::F32(row), row.len())?;
        Ok(cpu.softmax_stats_into(&l, opts, accum, scratch)?[0])
    }
}

impl Pass for CpuPass<'_> {
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]> {
        if keep <= MAX_M {
            return self.forward(tokens, keep);
        }
        check_single(self.lens.len())?;
        self.step_rows = 0;
        self.wide = self.model.forward_wide(
            tokens,
            &mut self.kvs[0],
            &mut self.lens[0],
            &mut self.work,
            keep,
            self.active,
        )?;
        Ok(&self.wide)
    }
    fn len(&self) -> usize {
        self.lens[0]
    }
    fn truncate(&mut self, len: usize) {
        self.lens[0] = len.min(self.lens[0]);
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        for kv in &mut self.kvs {
            kv.reserve(positions);
        }
        Ok(())
    }
    fn cfg(&self) -> &Config {
        &self.model.cfg
    }
    fn backend(&self) -> &'static str {
        "cpu"
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
        self.forward(tokens, 1)?;
        let q = &self.work.logits[..self.model.cfg.vocab];
        let before = accum[0];
        let st = Self::stats_of(&self.cpu, &mut self.scratch, q, opts, Some(accum))?;
        if let Some(s) = stop {
            let mut state = s.entry_state(opts);
            if state.stopped != 0 {
                accum[0] = before; // the kernel's epilogue leaves a stopped sequence alone
            } else {
                stop_rule::decide_host(
                    s.weights,
                    &mut state,
                    &accum[0],
                    st.entropy,
                    st.confidence,
                    s.compression_code,
                    s.odds_scale,
                    s.gamma_max,
                    &s.costs,
                );
                s.state = state;
            }
        }
        Ok((st, want_row.then_some(q)))
    }
    fn next_token(&mut self, tokens: &[u32], opts: &StatsOptions) -> Result<u32> {
        opts.validate()?;
        self.forward(tokens, 1)?;
        let row = &self.work.logits[..self.model.cfg.vocab];
        if opts.temperature == 0.0 {
            return argmax(row, opts.step as usize);
        }
        let st = Self::stats_of(&self.cpu, &mut self.scratch, row, opts, None)?;
        token_of(&st, opts)
    }
    fn run_verify(
        &mut self,
        tokens: &[u32],
        step: &VerifyStep<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()> {
        step.check_positions(tokens.len())?;
        let v = self.model.cfg.vocab;
        let (temps, gammas) = ([step.temperature], [step.draft_tokens.len() as i32]);
        self.forward(tokens, tokens.len())?;
        let p = &self.work.logits[..tokens.len() * v];
        self.cpu
            .verify_into(&step.batch(p, v, &temps, &gammas)?, out)
    }
}

impl BatchPass for CpuPass<'_> {
    fn lens(&self) -> &[usize] {
        &self.lens
    }
    /// The model's context: the CPU's caches grow.
    fn capacity(&self) -> usize {
        self.model.cfg.context
    }
    fn step_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.step_batch_resident(tokens, true)?;
        Ok(self.work.logits[..self.step_rows * self.model.cfg.vocab].to_vec())
    }
    fn step_batch_resident(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
        self.step_rows = 0;
        check_batch(tokens.len(), &self.lens, self.capacity())?;
        self.model.forward_batch(
            tokens,
            &mut self.kvs,
            &mut self.lens,
            &mut self.work,
            logits,
            self.active,
        )?;
        if logits {
            self.step_rows = tokens.len();
        }
        Ok(())
    }
    fn logits_rows(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        check_rows(rows, self.step_rows)?;
        let v = self.model.cfg.vocab;
        for &r in rows {
            out.extend_from_slice(&self.work.logits[r * v..(r + 1) * v]);
        }
        Ok(())
    }
    fn rows_stats(
        &mut self,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        out: &mut Vec<RowStats>,
    ) -> Result<()> {
        check_rows_stats(rows, opts, accums, self.step_rows)?;
        let v = self.model.cfg.vocab;
        out.clear();
        for (k, &r) in rows.iter().enumerate() {
            let row = &self.work.logits[r * v..(r + 1) * v];
            let acc = Some(&mut accums[k..k + 1]);
            out.push(Self::stats_of(
                &self.cpu,
                &mut self.scratch,
                row,
                &opts[k],
                acc,
            )?);
        }
        Ok(())
    }
    fn verify_step(&mut self, v: &VerifyBatch<'_>, out: &mut VerifyOutput) -> Result<()> {
        check_verify(v, self.lens.len(), self.step_rows)?;
        v.validate_device()?;
        let vocab = self.model.cfg.vocab;
        let p = &self.work.logits[..self.step_rows * vocab];
        self.cpu.verify_into(&v.over_rows(p, vocab), out)
    }
    fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()> {
        truncate_seq(&mut self.lens, seq, len)
    }
}

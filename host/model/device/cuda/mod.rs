//! The device forward pass on a CUDA GPU: weights uploaded once (or made on the device at a
//! model's shapes, for timing), activations, KV cache and cache length resident on the device. A
//! step is the program's launches on the backend's stream. The decode loops' steps
//! ([`Pass::run_stats`], [`Pass::next_token`], [`Pass::run_verify`]) finish on the device too —
//! statistics and verification run on the logits buffer — and the host waits only to read their
//! small results back; [`Pass::run`] reads the logits themselves back.
//!
//! Not yet run on a GPU (no device was lent while it was written): validated on the CPU emulator
//! (the same program and kernels, [`super::EmulatedForward`]) and by ptxas only.

mod batch;
mod draft;
mod weights;

pub use weights::DeviceWeights;

use std::collections::HashMap;
use std::time::Duration;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice};
use speckv_kernels::params::{FeatureAccum, RowStats};

use super::{forward_chunks, resident_chunks, Act, Fuse, Op, SeqState};
use crate::backend::cuda::{CacheRefs, CudaBackend, KernelVersion, ResidentStats, ResidentVerify};
use crate::backend::forward::MAX_STEP;
use crate::error::{Error, Result};
use crate::model::pass::{check_stats_call, fixed_capacity, resident_next_token, DraftStop, Pass};
use crate::model::Config;
use crate::stats::StatsOptions;
use crate::verify::{VerifyOutput, VerifyStep};
use crate::weights::gemv::Fusion;

/// A model's decode state on a CUDA device: of one sequence, or of a batch stepped together
/// ([`CudaForward::new_batch`]).
pub struct CudaForward<'b> {
    cuda: &'b CudaBackend,
    w: &'b DeviceWeights,
    acts: HashMap<Act, CudaSlice<f32>>,
    k: Vec<CudaSlice<u16>>,
    v: Vec<CudaSlice<u16>>,
    rope: CudaSlice<f32>,
    len_dev: CudaSlice<u32>,
    tokens_dev: CudaSlice<u32>,
    ws: CudaSlice<u8>,
    /// attention v2's workspace (counters zero between launches).
    attn_ws: CudaSlice<u8>,
    seq: SeqState,
    /// The draft step's statistics and the verification, on the logits buffer (made on first
    /// use).
    stats: Option<ResidentStats>,
    verify: Option<ResidentVerify>,
    /// A draft phase's buffers (made on first use).
    draft: Option<draft::DraftPhase>,
    /// A batched step's per-row statistics and accumulators (made on first use).
    rows_stats: Option<crate::backend::cuda::ResidentRows>,
    /// Captured steps, one CUDA graph per (positions, logits wanted): a step's launches differ only
    /// in m (the kernels read the tokens and the cache length from device memory), so one capture
    /// replays for every step of that shape.
    graphs: HashMap<(usize, bool), StepGraph>,
    use_graphs: bool,
}

/// The logits buffer among the activations (absent only after a failed launch).
fn logits_of(acts: &HashMap<Act, CudaSlice<f32>>) -> Result<&CudaSlice<f32>> {
    acts.get(&Act::Logits)
        .ok_or_else(|| Error::Other("the logits buffer is missing (a failed launch)".to_string()))
}

/// A captured step. cudarc's graph holds raw driver handles and so is not `Send`; the decode loops
/// run a pass on a pool thread.
struct StepGraph(CudaGraph);

// SAFETY: a graph's handles may be used from any thread (the driver API is thread-safe, and
// `CudaGraph::launch` binds the context to the calling thread first); a `StepGraph` is only reached
// through `&mut CudaForward`, so it is never used from two threads at once.
unsafe impl Send for StepGraph {}

impl<'b> CudaForward<'b> {
    /// A decode state of `capacity` positions (at most the weights' rotary table).
    pub fn new(cuda: &'b CudaBackend, w: &'b DeviceWeights, capacity: usize) -> Result<Self> {
        Self::new_batch(cuda, w, capacity, 1)
    }

    /// A decode state of `seqs` sequences of `capacity` positions each, stepped together
    /// ([`CudaForward::step_batch`]).
    pub fn new_batch(
        cuda: &'b CudaBackend,
        w: &'b DeviceWeights,
        capacity: usize,
        seqs: usize,
    ) -> Result<Self> {
        let seq = SeqState::new(w.active.clone(), &w.shape, capacity, seqs)?;
        let s = w.shape;
        if capacity == 0 || capacity > w.rope_positions {
            return Err(Error::Other(format!(
                "a KV cache of {capacity} positions: 1 to the weights' {} are allowed",
                w.rope_positions
            )));
        }
        let st = cuda.stream();
        let mut acts = HashMap::new();
        for a in Act::ALL {
            acts.insert(a, st.alloc_zeros::<f32>(MAX_STEP * a.width(&s))?);
        }
        let kvw = s.heads.kv_width();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..s.layers {
            k.push(st.alloc_zeros::<u16>(seqs * capacity * kvw)?);
            v.push(st.alloc_zeros::<u16>(seqs * capacity * kvw)?);
        }
        let ws_bytes = s
            .linears()
            .iter()
            .flat_map(|l| {
                let d = &w.mats[l];
                [1, MAX_STEP].map(|m| cuda.gemv_workspace_bytes(d, m))
            })
            .max()
            .unwrap_or(0)
            .max(16);
        Ok(CudaForward {
            rope: st.clone_htod(&w.rope.pairs(capacity).concat())?,
            len_dev: st.alloc_zeros::<u32>(seqs)?,
            tokens_dev: st.alloc_zeros::<u32>(MAX_STEP)?,
            ws: st.alloc_zeros::<u8>(ws_bytes)?,
            attn_ws: st
                .alloc_zeros::<u8>(cuda.attention_workspace_bytes(s.heads, MAX_STEP).max(16))?,
            cuda,
            w,
            acts,
            k,
            v,
            seq,
            stats: None,
            verify: None,
            rows_stats: None,
            draft: None,
            graphs: HashMap::new(),
            use_graphs: true,
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

    /// Forgets every position of sequence `seq` from `len` on.
    pub fn truncate_seq(&mut self, seq: usize, len: usize) -> Result<()> {
        self.seq.truncate_seq(seq, len)
    }

    /// Runs only the layers marked true (a self-speculative draft sharing the target's weights).
    pub fn set_active_layers(&mut self, active: Vec<bool>) -> Result<()> {
        self.graphs.clear(); // captured with the old program
        self.seq.set_active_layers(active)
    }

    /// Which fusions one-row steps may make ([`Fuse::ALL`] by default; fewer to time the fused
    /// program against).
    pub fn set_fusion(&mut self, fuse: Fuse) {
        self.seq.fuse = fuse;
        self.graphs.clear(); // captured with the other program
    }

    /// Whether steps replay captured CUDA graphs (the default) or issue every launch from the
    /// host.
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    pub fn is_empty(&self) -> bool {
        self.seq.len() == 0
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.seq.truncate(len)
    }

    /// Logits `[keep, vocab]` of the last `keep` positions after `tokens` (chunks of ≤ 16).
    pub fn forward(&mut self, tokens: &[u32], keep: usize) -> Result<Vec<f32>> {
        self.seq.single()?;
        let (len, capacity, vocab) = (self.seq.len(), self.seq.capacity, self.w.shape.vocab);
        forward_chunks(tokens, keep, len, capacity, vocab, |ch, want| {
            self.enqueue(ch, want)?;
            if !want {
                return Ok(Vec::new());
            }
            // Only the chunk's rows come back (the buffer holds 16).
            let logits = self.logits()?;
            Ok(self
                .cuda
                .stream()
                .clone_dtoh(&logits.slice(..ch.len() * vocab))?)
        })
    }

    /// Appends `tokens` leaving the last chunk's logits in the device's logits buffer (nothing
    /// read back, the host does not wait); returns how many rows that chunk has.
    fn advance(&mut self, tokens: &[u32]) -> Result<usize> {
        self.seq.single()?;
        let (len, capacity, vocab) = (self.seq.len(), self.seq.capacity, self.w.shape.vocab);
        let mut last = 0;
        resident_chunks(tokens, len, capacity, vocab, |ch, want| {
            last = ch.len();
            self.enqueue(ch, want)
        })?;
        Ok(last)
    }

    /// The logits buffer (absent only after a failed launch).
    fn logits(&self) -> Result<&CudaSlice<f32>> {
        logits_of(&self.acts)
    }

    /// Enqueues one chunk of m positions per sequence (tokens and lengths copied to the device,
    /// then the program); the host does not wait.
    fn enqueue(&mut self, tokens: &[u32], logits: bool) -> Result<()> {
        let m = self.seq.check_batch(tokens.len())?;
        let st = self.cuda.stream().clone();
        st.memcpy_htod(tokens, &mut self.tokens_dev)?;
        let mut lens = [0u32; MAX_STEP];
        for (d, &l) in lens.iter_mut().zip(self.seq.lens()) {
            *d = l as u32;
        }
        st.memcpy_htod(&lens[..self.seq.seqs()], &mut self.len_dev)?;
        self.launch_program(m, logits)?;
        self.seq.advance(m);
        Ok(())
    }

    /// The program's launches for `m` positions: a captured graph's replay, or each launch.
    fn launch_program(&mut self, m: usize, logits: bool) -> Result<()> {
        if !self.use_graphs {
            let rows = m * self.seq.seqs();
            for k in 0..self.seq.program(rows, logits).len() {
                let op = self.seq.program(rows, logits)[k];
                self.run(op, m)?;
            }
            return Ok(());
        }
        if !self.graphs.contains_key(&(m, logits)) {
            let g = self.capture(m, logits)?;
            self.graphs.insert((m, logits), StepGraph(g));
        }
        match self.graphs.get(&(m, logits)) {
            Some(g) => Ok(g.0.launch()?),
            None => Err(Error::Other("a captured step went missing".to_string())),
        }
    }

    /// Captures the program's launches for `m` positions as a graph (nothing runs yet).
    fn capture(&mut self, m: usize, logits: bool) -> Result<CudaGraph> {
        let st = self.cuda.stream().clone();
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let mut launched = Ok(());
        let rows = m * self.seq.seqs();
        for k in 0..self.seq.program(rows, logits).len() {
            let op = self.seq.program(rows, logits)[k];
            launched = self.run(op, m);
            if launched.is_err() {
                break;
            }
        }
        // The capture is ended either way, so the stream is usable after an error.
        let graph = st.end_capture(CUgraphInstantiate_flags(0));
        launched?;
        graph?.ok_or_else(|| Error::CudaCall("capturing a step produced no graph".to_string()))
    }

    /// Mean device time of one step of `m` positions of every sequence, each at cache length `at`
    /// (CUDA events, the L2 flushed before each), the LM head included; the cache lengths are
    /// reset before each step. With graphs on, the capture happens in the untimed warm-up.
    pub fn time_step(&mut self, m: usize, at: usize, iters: u32) -> Result<Duration> {
        let seqs = self.seq.seqs();
        crate::backend::forward::check_batch(seqs * m, &vec![at; seqs], self.seq.capacity)?;
        let st = self.cuda.stream().clone();
        st.memcpy_htod(&vec![0u32; seqs * m], &mut self.tokens_dev)?;
        let lens = vec![at as u32; seqs];
        let cuda = self.cuda;
        cuda.time_cold(iters, || {
            st.memcpy_htod(&lens, &mut self.len_dev)?;
            self.launch_program(m, true)
        })
    }

    /// Takes an activation buffer out for a launch that writes it (put back after the launch).
    fn take(&mut self, a: Act) -> Result<CudaSlice<f32>> {
        self.acts
            .remove(&a)
            .ok_or_else(|| Error::Other(format!("activation {a:?} is missing (a failed launch)")))
    }

    /// One launch of the program at `m` positions per sequence (row-wise kernels take every
    /// sequence's rows).
    fn run(&mut self, op: Op, m: usize) -> Result<()> {
        let s = self.w.shape;
        let c = self.cuda;
        let (seqs, rows) = (self.seq.seqs(), self.seq.seqs() * m);
        match op {
            Op::Embed => {
                let mut x = self.take(Act::X)?;
                let r = c.launch_embed(&self.w.table, &self.tokens_dev, &mut x, s.hidden, rows);
                self.acts.insert(Act::X, x);
                r
            }
            Op::RmsNorm { norm } => {
                let (mut x, mut xn) = (self.take(Act::X)?, self.take(Act::Xn)?);
                let r = c.launch_rms_norm(
                    &mut x,
                    None,
                    &self.w.norms[&norm],
                    &mut xn,
                    s.hidden,
                    rows,
                    self.w.eps,
                );
                self.acts.insert(Act::X, x);
                self.acts.insert(Act::Xn, xn);
                r
            }
            Op::Gemv { .. } | Op::NormGemv { .. } | Op::SiluGemv { .. } => {
                let g = op.gemv().ok_or_else(|| Error::Other(format!("{op:?}")))?;
                let mut out = self.take(g.y)?;
                let fusion = Fusion {
                    norm: g.norm.map(|n| (&self.w.norms[&n], self.w.eps)),
                    silu: g.silu,
                    accumulate: g.accumulate,
                };
                let (mats, x) = (&self.w.mats[&g.w], &self.acts[&g.x]);
                let r = c.launch_gemv_into(mats, x, &mut out, rows, &mut self.ws, fusion);
                self.acts.insert(g.y, out);
                r
            }
            Op::QkvRope { layer } => {
                let mut q = self.take(Act::Q)?;
                let cache = CacheRefs {
                    k: &mut self.k[layer],
                    v: &mut self.v[layer],
                    len: &self.len_dev,
                    capacity: self.seq.capacity,
                    seqs,
                };
                let r = c.launch_qkv_rope(
                    &self.acts[&Act::Qkv],
                    self.w.biases[layer].as_ref(),
                    &self.rope,
                    &mut q,
                    cache,
                    s.heads,
                    s.neox,
                    m,
                );
                self.acts.insert(Act::Q, q);
                r
            }
            Op::Attention { layer } => {
                let mut out = self.take(Act::Att)?;
                let cache = CacheRefs {
                    k: &mut self.k[layer],
                    v: &mut self.v[layer],
                    len: &self.len_dev,
                    capacity: self.seq.capacity,
                    seqs,
                };
                let r = c.launch_attention(
                    &self.acts[&Act::Q],
                    cache,
                    &mut out,
                    s.heads,
                    m,
                    KernelVersion::V2,
                    &mut self.attn_ws,
                );
                self.acts.insert(Act::Att, out);
                r
            }
            Op::SiluMul => {
                let mut out = self.take(Act::Ffn)?;
                let r = c.launch_silu_mul(&self.acts[&Act::Gu], &mut out, s.ffn, rows);
                self.acts.insert(Act::Ffn, out);
                r
            }
        }
    }
}

super::seq::batch_pass!(CudaForward<'_>);

impl Pass for CudaForward<'_> {
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]> {
        self.seq.last = self.forward(tokens, keep)?;
        Ok(&self.seq.last)
    }
    fn len(&self) -> usize {
        self.seq.len()
    }
    fn truncate(&mut self, len: usize) {
        CudaForward::truncate(self, len)
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        fixed_capacity(positions, self.seq.capacity)
    }
    fn cfg(&self) -> &Config {
        &self.w.cfg
    }
    fn backend(&self) -> &'static str {
        "cuda"
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
        let v = self.w.shape.vocab;
        let cuda = self.cuda;
        let mut r = match self.stats.take() {
            Some(r) => r,
            None => cuda.resident_stats(v)?,
        };
        let logits = self.logits()?;
        let st = cuda.stats_resident(&mut r, logits, m - 1, opts, accum, stop);
        self.stats = Some(r);
        let st = st?;
        if !want_row {
            return Ok((st, None));
        }
        // Into the pass's own row buffer: no allocation per draft once it has its size.
        let logits = logits_of(&self.acts)?;
        self.seq.last.resize(v, 0.0);
        cuda.stream()
            .memcpy_dtoh(&logits.slice((m - 1) * v..m * v), &mut self.seq.last)?;
        Ok((st, Some(&self.seq.last)))
    }
    fn draft_run(
        &mut self,
        feed: &[u32],
        gamma: usize,
        opts: &StatsOptions,
        want_rows: bool,
        out: &mut crate::model::DraftRun,
    ) -> Result<()> {
        self.draft_phase(feed, gamma, opts, want_rows, out)
    }
    fn run_verify(
        &mut self,
        tokens: &[u32],
        step: &VerifyStep<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()> {
        step.check_positions(tokens.len())?;
        self.advance(tokens)?;
        let mut r = self.take_verify()?;
        let done = self.cuda.verify_resident(&mut r, self.logits()?, step, out);
        self.verify = Some(r);
        done
    }
}

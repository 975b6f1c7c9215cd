//! `speckv bench step --backend cuda --shapes T --draft-shapes D`: the whole decode step of speckv's
//! device forward pass at a model's shapes, with weights made on the device (real weights cannot
//! travel to the GPU machine): the target at M = γ + 1 for γ = 0..=8 in every regime, the draft in
//! FP16 at M = 1 and fed n = 1..=[`DRAFT_CATCH_UP`] tokens (a step's first pass), each a mean over
//! timed launches with the L2 flushed before each, replayed as captured CUDA graphs (the cost
//! model) and issued launch by launch (`eager_*`). Written as the cost model `speckv profile`
//! writes, so `evaluate --cost` and `bench decode --cost` turn the CPU-measured traces into
//! predicted GPU tokens per second. With `--batch-sizes`, decode steps of
//! B sequences (one position each, every sequence at the same cache length) too: what a batch pays
//! per token once the weights are streamed for all of its rows, as device time and as the host's
//! wall clock of a whole plain decode step (the step, the row statistics, their copies).

use serde::Serialize;

use crate::backend::cuda::CudaBackend;
use crate::controller::replay::DRAFT_CATCH_UP;
use crate::controller::CostModel;
use crate::error::Result;
use crate::measure::batch_step::time_plain_decode_step;
use crate::model::device::{CudaForward, DeviceWeights, Fuse};
use crate::model::Config;
use crate::weights::quant::Format;

/// γ = 0..=GAMMA_MAX are timed (M = γ + 1).
pub const GAMMA_MAX: usize = 8;

/// Drafts per timed draft phase.
pub const PHASE_GAMMA: usize = 4;

/// One regime's measured step.
#[derive(Debug, Serialize)]
pub struct RegimeStep {
    pub format: Format,
    pub cost: CostModel,
    /// Bytes of the target's linear layers and LM head (what a step streams).
    pub weight_bytes: usize,
    /// Those bytes at the measured copy bandwidth (read + write counted as the copy does: the
    /// step only reads, so this is bytes / (bandwidth / 2)).
    pub stream_ms: f64,
    /// stream_ms over the measured M = 1 step: the goal is ≥ 0.8 at FP16.
    pub bandwidth_fraction: f64,
    /// The M = 1 step with nothing fused (each norm and gate its own launch; graphs on): what the
    /// fused reads of v3 / v4 save or cost against `cost.verify_ms[0]`.
    pub unfused_ms: f64,
    /// The M = 1 step with the norms fused and each `silu_mul` its own launch: the gate's share.
    pub norm_fused_ms: f64,
    /// The same steps with every launch issued by the host (no CUDA graph), M = γ + 1: what the
    /// graphs save in launch gaps.
    pub eager_verify_ms: Vec<f64>,
    /// Decode steps of several sequences together (M = 1 each), as asked.
    pub batched: Vec<BatchStep>,
}

/// One batched decode step: `seqs` sequences, one new position each.
#[derive(Debug, Serialize)]
pub struct BatchStep {
    pub seqs: usize,
    /// The forward step's device time (L2 flushed), as the cost model's steps.
    pub ms: f64,
    /// ms per sequence: the cost of a token at this batch size.
    pub ms_per_token: f64,
    /// The batch-1 step's ms over ms_per_token: how many times the batch-1 throughput.
    pub speedup: f64,
    /// A whole plain decode step as the batched loop makes it, host wall clock: the forward step,
    /// `softmax_stats_v3` on every sequence's row and its two copies, and the wait
    /// ([`crate::measure::batch_step::time_plain_decode_step`]; the L2 not flushed).
    pub decode_ms: f64,
    /// decode_ms per sequence.
    pub decode_ms_per_token: f64,
}

/// What `bench step --shapes` measures besides the shapes.
#[derive(Clone, Debug)]
pub struct StepOptions {
    /// Cache length the steps attend over.
    pub position: usize,
    /// Timed launches per measurement.
    pub iters: u32,
    /// Batch sizes of the batched decode steps (each 2..=16; empty: none).
    pub batches: Vec<usize>,
}

impl StepOptions {
    /// At least one launch at a cache length of at least 1; batch sizes within one step.
    pub fn check(&self) -> Result<()> {
        use crate::error::Error;
        if self.iters == 0 || self.position == 0 {
            return Err(Error::Other(
                "--iters and --position must be at least 1".to_string(),
            ));
        }
        let max = crate::backend::forward::MAX_STEP;
        if let Some(&b) = self.batches.iter().find(|&&b| b < 2 || b > max) {
            return Err(Error::Other(format!(
                "batch size {b}: 2 to {max} sequences (one position each in a step)"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct DeviceSteps {
    pub device: String,
    pub target: Config,
    pub draft: Config,
    /// Cache length the steps attend over.
    pub position: usize,
    pub copy_bandwidth_gb_s: f64,
    pub draft_ms_per_token: f64,
    /// The draft's pass fed n = 1..=[`DRAFT_CATCH_UP`] tokens (index n − 1; graphs on, the L2
    /// flushed): a step's first draft pass, which feeds the pending token, a draft a fully
    /// accepted step left unseen and the tokens of plain steps. The device pass runs its LM head
    /// on every fed row, so this is what the decode loop pays. Every regime's cost model carries it.
    pub draft_feed_ms: Vec<f64>,
    /// The draft's step without a graph.
    pub draft_eager_ms_per_token: f64,
    /// A greedy draft phase of [`PHASE_GAMMA`] drafts, host wall clock per draft (graphs on, the L2
    /// not flushed: what a decode loop sees): enqueued at once with the tokens fed on the device
    /// (`Pass::draft_run`), and one `run_stats` per draft with a host wait each.
    pub draft_phase_ms_per_token: f64,
    pub draft_stepwise_ms_per_token: f64,
    pub regimes: Vec<RegimeStep>,
}

/// Times the target's step in every regime and the draft's (FP16) at cache length `position`,
/// and the target's batched decode steps.
pub fn device_steps(
    cuda: &CudaBackend,
    target: &Config,
    draft: &Config,
    o: &StepOptions,
) -> Result<DeviceSteps> {
    o.check()?;
    let (position, iters) = (o.position, o.iters);
    let capacity = position + (GAMMA_MAX + 1).max(DRAFT_CATCH_UP);
    let bw = cuda.copy_bandwidth(256 << 20, iters.max(3))?;
    let dw = DeviceWeights::synthetic(cuda, draft, Format::Fp16, capacity)?;
    let (draft_feed_ms, draft_eager_ms) = {
        let mut d = CudaForward::new(cuda, &dw, capacity)?;
        let mut feeds = Vec::with_capacity(DRAFT_CATCH_UP);
        for n in 1..=DRAFT_CATCH_UP {
            feeds.push(d.time_step(n, position, iters)?.as_secs_f64() * 1e3);
        }
        d.set_graphs(false);
        (feeds, d.time_step(1, position, iters)?.as_secs_f64() * 1e3)
    };
    let draft_ms = draft_feed_ms[0];
    let (phase_ms, stepwise_ms) = draft_phase_times(cuda, &dw, position, iters)?;
    drop(dw);
    let mut regimes = Vec::new();
    for format in Format::ALL {
        let tw = DeviceWeights::synthetic(cuda, target, format, capacity)?;
        let weight_bytes = tw.matrix_bytes();
        let mut t = CudaForward::new(cuda, &tw, capacity)?;
        let mut verify_ms = Vec::new();
        for g in 0..=GAMMA_MAX {
            verify_ms.push(t.time_step(g + 1, position, iters)?.as_secs_f64() * 1e3);
        }
        let mut time_fused = |fuse: Fuse| -> Result<f64> {
            t.set_fusion(fuse);
            Ok(t.time_step(1, position, iters)?.as_secs_f64() * 1e3)
        };
        let unfused_ms = time_fused(Fuse::NONE)?;
        let norm_fused_ms = time_fused(Fuse {
            silu: false,
            ..Fuse::ALL
        })?;
        t.set_fusion(Fuse::ALL);
        t.set_graphs(false);
        let mut eager_verify_ms = Vec::new();
        for g in 0..=GAMMA_MAX {
            eager_verify_ms.push(t.time_step(g + 1, position, iters)?.as_secs_f64() * 1e3);
        }
        let mut batched = Vec::new();
        for &seqs in &o.batches {
            let mut b = CudaForward::new_batch(cuda, &tw, capacity, seqs)?;
            let ms = b.time_step(1, position, iters)?.as_secs_f64() * 1e3;
            let decode = time_plain_decode_step(&mut b, position, iters)?;
            let decode_ms = decode.as_secs_f64() * 1e3;
            batched.push(BatchStep {
                seqs,
                ms,
                ms_per_token: ms / seqs as f64,
                speedup: verify_ms[0] / (ms / seqs as f64),
                decode_ms,
                decode_ms_per_token: decode_ms / seqs as f64,
            });
        }
        let stream_ms = weight_bytes as f64 / (bw / 2.0) * 1e3;
        regimes.push(RegimeStep {
            format,
            bandwidth_fraction: stream_ms / verify_ms[0],
            unfused_ms,
            norm_fused_ms,
            cost: CostModel {
                draft_ms_per_token: draft_ms,
                verify_ms,
                draft_feed_ms: draft_feed_ms.clone(),
                source: format!(
                    "measured by `speckv bench step --backend cuda` on {}: speckv's device forward \
                     pass, a {}-layer {}-wide {} target (M = γ + 1) and a {}-layer {}-wide fp16 \
                     draft (M = 1..={DRAFT_CATCH_UP}), weights made on the device, cache length \
                     {position}",
                    cuda.device_name(),
                    target.layers,
                    target.hidden,
                    format.name(),
                    draft.layers,
                    draft.hidden
                ),
            },
            weight_bytes,
            stream_ms,
            eager_verify_ms,
            batched,
        });
    }
    Ok(DeviceSteps {
        device: cuda.device_name().to_string(),
        target: target.clone(),
        draft: draft.clone(),
        position,
        copy_bandwidth_gb_s: bw / 1e9,
        draft_ms_per_token: draft_ms,
        draft_feed_ms,
        draft_eager_ms_per_token: draft_eager_ms,
        draft_phase_ms_per_token: phase_ms,
        draft_stepwise_ms_per_token: stepwise_ms,
        regimes,
    })
}

/// Host wall clock per draft of a greedy draft phase at cache length `position`: enqueued at once,
/// and one statistics readback per draft (the mean over `iters` phases after one untimed, which
/// captures the graphs).
fn draft_phase_times(
    cuda: &CudaBackend,
    dw: &DeviceWeights,
    position: usize,
    iters: u32,
) -> Result<(f64, f64)> {
    use crate::model::pass::draft_run_stepwise;
    use crate::model::{DraftRun, Pass};
    use crate::stats::{Accumulate, StatsOptions};
    let mut d = CudaForward::new(cuda, dw, position + PHASE_GAMMA + 1)?;
    d.forward(&vec![0; position], 1)?;
    let opts = StatsOptions {
        temperature: 0.0,
        sample: false,
        seed: 0,
        step: 0,
        accumulate: Accumulate::Reset,
    };
    let mut run = DraftRun::default();
    let mut per_draft = |stepwise: bool| -> Result<f64> {
        let mut once = |d: &mut CudaForward<'_>| -> Result<()> {
            d.truncate(position);
            if stepwise {
                draft_run_stepwise(d, &[0], PHASE_GAMMA, &opts, false, &mut run)
            } else {
                d.draft_run(&[0], PHASE_GAMMA, &opts, false, &mut run)
            }
        };
        once(&mut d)?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            once(&mut d)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / (iters as usize * PHASE_GAMMA) as f64)
    };
    Ok((per_draft(false)?, per_draft(true)?))
}

//! `softmax_stats` on the device: v1 (one block per row) and v2 (rows split across blocks, with
//! its scratch of partial states and arrival counters), launched, run on host logits, and timed.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::{
    FeatureAccum, MlpWeights, RowStats, SoftmaxStatsParams, SoftmaxStatsV2Params, StatsState,
    StopParams, StopState, STATS_STOP,
};
use speckv_kernels::softmax_stats::{self as kernel, PlanV2};

use super::{ByValue, CudaBackend, KernelFn, KernelVersion, STATS_BLOCK};
use crate::error::{Error, Result};
use crate::stats::{check_accum, stats_params, DraftStop, Dtype, Logits, StatsOptions};

/// The scratch of one `softmax_stats_v2` launch: partial states and arrival counters (zeroed).
pub(super) struct StatsScratch {
    partials: CudaSlice<u8>,
    counters: CudaSlice<u32>,
}

impl StatsScratch {
    pub(super) fn new(cuda: &CudaBackend, rows: usize, plan: &PlanV2) -> Result<StatsScratch> {
        Ok(StatsScratch {
            partials: cuda.stream.alloc_zeros::<u8>(
                rows * plan.splits as usize * std::mem::size_of::<StatsState>(),
            )?,
            counters: cuda.stream.alloc_zeros::<u32>(rows.max(1))?,
        })
    }

    /// v2 parameters from v1's, pointing at this scratch.
    pub(super) fn params(
        &mut self,
        stream: &Arc<CudaStream>,
        p: SoftmaxStatsParams,
        plan: &PlanV2,
    ) -> SoftmaxStatsV2Params {
        let (pp, _g1) = self.partials.device_ptr_mut(stream);
        let (cp, _g2) = self.counters.device_ptr_mut(stream);
        SoftmaxStatsV2Params {
            logits: p.logits,
            out: p.out,
            accum: p.accum,
            partials: pp as *mut StatsState,
            counters: cp as *mut u32,
            decision: std::ptr::null(),
            seed: p.seed,
            step: p.step,
            rows: p.rows,
            vocab: p.vocab,
            row_stride: p.row_stride,
            temperature: p.temperature,
            flags: p.flags,
            splits: plan.splits,
            chunk_vecs: plan.chunk_vecs,
            temperature_group: 1,
            temperatures: std::ptr::null(),
            stop: std::ptr::null(),
        }
    }

    /// Every launch must leave the counters zero (the next one relies on it).
    pub(super) fn check_counters(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let c = stream.clone_dtoh(&self.counters)?;
        if c.iter().any(|&x| x != 0) {
            return Err(Error::Other(format!(
                "softmax_stats_v2 left its arrival counters non-zero: {c:?}"
            )));
        }
        Ok(())
    }
}

/// `StopParams` as bytes (`#[repr(C)]`, 112 bytes of pointers and 4-byte scalars, no padding:
/// its size is asserted in the kernels crate).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct PodStop(pub StopParams);
// SAFETY: `StopParams` is `#[repr(C)]` of 8-byte pointers followed by f32/u32 fields whose sizes
// add up to the asserted 112 bytes: no padding, and any bit pattern is a valid value to copy.
unsafe impl bytemuck::Zeroable for PodStop {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for PodStop {}

/// The parameters of the statistics of row `row` of the f32 logits at device address `logits`
/// (rows of `vocab`), written to the `RowStats` at `out` and the accumulator at `accum`.
fn row_params(
    logits: u64,
    row: usize,
    vocab: usize,
    out: u64,
    accum: u64,
    opts: &StatsOptions,
) -> SoftmaxStatsParams {
    SoftmaxStatsParams {
        logits: (logits + (row * vocab * std::mem::size_of::<f32>()) as u64) as *const u8,
        out: out as *mut RowStats,
        accum: accum as *mut FeatureAccum,
        seed: opts.seed,
        step: opts.step,
        rows: 1,
        vocab: vocab as u32,
        row_stride: vocab as u32,
        temperature: opts.temperature,
        flags: opts.kernel_flags(),
        _pad: 0,
    }
}

/// Buffers for the statistics of one row that a forward pass left on the device (a decode loop's
/// draft step), kept across calls. The row's results are packed in one buffer, so a step crosses
/// the bus once each way: `[RowStats | FeatureAccum | StopState]` (32 + 24 + 16 bytes, every
/// field 4-byte aligned), the accumulator and stop state uploaded, all three read back.
pub struct ResidentStats {
    io: CudaSlice<u8>,
    scratch: StatsScratch,
    plan: PlanV2,
    vocab: usize,
    /// Per-token stopping (made on first use): the hazard model as last uploaded, γ_b, and the
    /// launch's `StopParams`.
    stop: Option<ResidentStop>,
    /// What `io` holds after the accumulator, as last read back: a draft that continues from
    /// there (the step's next draft) need not upload it again.
    device_in: Option<[u8; IO_BYTES - IO_ACCUM]>,
}

struct ResidentStop {
    weights: CudaSlice<u8>,
    uploaded: MlpWeights,
    gammas: CudaSlice<i32>,
    params: CudaSlice<u8>,
    /// The parameters as last uploaded: a step's drafts share their costs, so one upload a step.
    uploaded_params: Option<PodStop>,
}

const IO_ACCUM: usize = std::mem::size_of::<RowStats>();
const IO_STATE: usize = IO_ACCUM + std::mem::size_of::<FeatureAccum>();
const IO_BYTES: usize = IO_STATE + std::mem::size_of::<StopState>();

impl CudaBackend {
    /// [`ResidentStats`] for f32 rows of `vocab` logits.
    pub fn resident_stats(&self, vocab: usize) -> Result<ResidentStats> {
        let (_, plan) = crate::plan::softmax_stats_v2(1, vocab as u32, Dtype::F32, self.sm_count);
        Ok(ResidentStats {
            io: self.stream.alloc_zeros::<u8>(IO_BYTES)?,
            scratch: StatsScratch::new(self, 1, &plan)?,
            plan,
            vocab,
            stop: None,
            device_in: None,
        })
    }

    /// Statistics of row `row` of `logits` (f32 rows of the buffers' vocabulary) by the v2
    /// kernel, `accum` updated as `opts` says: 72 bytes come back instead of the row, and the 40
    /// of the accumulator and stop state go up only when they differ from what the device holds
    /// (not for a step's next draft). With `stop` the stopping rule runs in the kernel's epilogue
    /// (`STATS_STOP`) and `stop.state` comes back too.
    pub fn stats_resident(
        &self,
        r: &mut ResidentStats,
        logits: &CudaSlice<f32>,
        row: usize,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum; 1],
        stop: Option<&mut DraftStop<'_>>,
    ) -> Result<RowStats> {
        opts.validate()?;
        if let Some(s) = stop.as_deref() {
            s.check(opts)?;
        }
        let v = r.vocab;
        if (row + 1) * v > logits.len() {
            return Err(Error::Other(format!(
                "row {row} of {} logits of vocabulary {v}",
                logits.len()
            )));
        }
        let st = &self.stream;
        let state = stop.as_deref().map(|s| s.state).unwrap_or(StopState::START);
        let mut up = [0u8; IO_BYTES - IO_ACCUM];
        up[..IO_STATE - IO_ACCUM].copy_from_slice(bytemuck::bytes_of(&accum[0]));
        up[IO_STATE - IO_ACCUM..].copy_from_slice(bytemuck::bytes_of(&state));
        if r.device_in.take() != Some(up) {
            st.memcpy_htod(&up, &mut r.io.slice_mut(IO_ACCUM..))?;
        }
        let stop_ptr = match stop.as_deref() {
            Some(s) => self.stop_params(r, s)?,
            None => 0,
        };
        {
            let (lp, _g1) = logits.device_ptr(st);
            let (iop, _g2) = r.io.device_ptr_mut(st);
            let params = row_params(lp, row, v, iop, iop + IO_ACCUM as u64, opts);
            let mut p2 = r.scratch.params(st, params, &r.plan);
            if stop_ptr != 0 {
                p2.flags |= STATS_STOP;
                p2.stop = stop_ptr as *const StopParams;
            }
            // SAFETY: the row lies inside `logits` (checked above), which outlives the launch
            // (the download below synchronises); `io` holds one result, accumulator and stop state
            // at the offsets given, the scratch was allocated for this plan and every launch
            // leaves its counters zero; a stop's parameters point at `io`'s state and at the
            // pass's own weights and γ_b buffers, which live as long as `r`.
            unsafe { self.launch_stats_v2(Dtype::F32, p2, &r.plan) }?;
        }
        let mut out = [0u8; IO_BYTES];
        st.memcpy_dtoh(&r.io, &mut out)?;
        let mut held = [0u8; IO_BYTES - IO_ACCUM];
        held.copy_from_slice(&out[IO_ACCUM..]);
        r.device_in = Some(held);
        accum[0] = bytemuck::pod_read_unaligned(&out[IO_ACCUM..IO_STATE]);
        if let Some(s) = stop {
            s.state = bytemuck::pod_read_unaligned(&out[IO_STATE..]);
        }
        Ok(bytemuck::pod_read_unaligned(&out[..IO_ACCUM]))
    }

    /// Enqueues the statistics of row `row` of `logits` into `RowStats` slot `slot` of `out` (8
    /// u32 words a slot) with the accumulator in slot `accum_slot` of `accum` (6 words a slot)
    /// updated as `opts` says: nothing crosses the bus and the host does not wait (a draft phase
    /// reads every slot back at its end).
    #[allow(clippy::too_many_arguments)]
    pub fn stats_enqueue(
        &self,
        r: &mut ResidentStats,
        logits: &CudaSlice<f32>,
        row: usize,
        opts: &StatsOptions,
        out: &mut CudaSlice<u32>,
        slot: usize,
        accum: &mut CudaSlice<u32>,
        accum_slot: usize,
    ) -> Result<()> {
        opts.validate()?;
        const SLOT: usize = std::mem::size_of::<RowStats>() / 4;
        const ACCUM: usize = std::mem::size_of::<FeatureAccum>() / 4;
        let v = r.vocab;
        if (row + 1) * v > logits.len()
            || (slot + 1) * SLOT > out.len()
            || (accum_slot + 1) * ACCUM > accum.len()
        {
            return Err(Error::Other(format!(
                "statistics of row {row} ({} logits, vocabulary {v}) into slot {slot} of {} words \
                 with accumulator {accum_slot} of {} words",
                logits.len(),
                out.len(),
                accum.len()
            )));
        }
        let st = &self.stream;
        let (lp, _g1) = logits.device_ptr(st);
        let (op, _g2) = out.device_ptr_mut(st);
        let (ap, _g3) = accum.device_ptr_mut(st);
        let (o, a) = ((slot * SLOT * 4) as u64, (accum_slot * ACCUM * 4) as u64);
        let params = row_params(lp, row, v, op + o, ap + a, opts);
        let p2 = r.scratch.params(st, params, &r.plan);
        // SAFETY: the row lies inside `logits`, the slot inside `out` and the accumulator slot
        // inside `accum` (checked above; u32 words, so 4-byte aligned as `RowStats` and `FeatureAccum`
        // need); the scratch was allocated for this plan and every launch leaves its counters zero;
        // the caller keeps the buffers alive until the stream has passed the launch.
        unsafe { self.launch_stats_v2(Dtype::F32, p2, &r.plan) }
    }

    /// The device address of this step's `StopParams` for `s` (the hazard model and the
    /// parameters uploaded only when they changed: the costs change per step, not per draft).
    fn stop_params(&self, r: &mut ResidentStats, s: &DraftStop<'_>) -> Result<u64> {
        let st = &self.stream;
        let rs = match r.stop.take() {
            Some(x) => x,
            None => ResidentStop {
                weights: st.clone_htod(bytemuck::bytes_of(s.weights))?,
                uploaded: *s.weights,
                gammas: st.alloc_zeros::<i32>(1)?,
                params: st.alloc_zeros::<u8>(std::mem::size_of::<StopParams>())?,
                uploaded_params: None,
            },
        };
        let mut rs = rs;
        if rs.uploaded != *s.weights {
            st.memcpy_htod(bytemuck::bytes_of(s.weights), &mut rs.weights)?;
            rs.uploaded = *s.weights;
        }
        let addr = {
            let (wp, _g1) = rs.weights.device_ptr(st);
            let (gp, _g2) = rs.gammas.device_ptr_mut(st);
            let (iop, _g3) = r.io.device_ptr_mut(st);
            let params = StopParams {
                weights: wp as *const MlpWeights,
                state: (iop + IO_STATE as u64) as *mut StopState,
                gammas_out: gp as *mut i32,
                stopped_count: std::ptr::null_mut(),
                hazards_out: std::ptr::null_mut(),
                costs: s.costs,
                gamma_max: s.gamma_max,
                compression_code: s.compression_code,
                odds_scale: s.odds_scale,
                lockstep: std::ptr::null_mut(), // one sequence
                odds_scales: std::ptr::null(),  // its own scale is `odds_scale`
            };
            let pod = PodStop(params);
            let same = rs
                .uploaded_params
                .is_some_and(|u| bytemuck::bytes_of(&u) == bytemuck::bytes_of(&pod));
            if !same {
                st.memcpy_htod(bytemuck::bytes_of(&pod), &mut rs.params)?;
                rs.uploaded_params = Some(pod);
            }
            let (pp, _g4) = rs.params.device_ptr(st);
            pp
        };
        r.stop = Some(rs);
        Ok(addr)
    }

    /// Launches `softmax_stats` on device buffers.
    ///
    /// # Safety
    /// `params` must describe live device buffers of the sizes the kernel reads and writes.
    unsafe fn launch_stats(&self, dtype: Dtype, params: SoftmaxStatsParams) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (params.rows, 1, 1),
            block_dim: (STATS_BLOCK, 1, 1),
            shared_mem_bytes: kernel::shared_bytes(STATS_BLOCK) as u32,
        };
        let arg = ByValue(params);
        let func = self.function(KernelFn::SoftmaxStats(dtype));
        let mut b = self.stream.launch_builder(func);
        b.arg(&arg);
        // SAFETY: forwarded from this function's contract; the launch shape is the kernel's.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Launches `softmax_stats_v2` on device buffers with the plan for this device.
    ///
    /// # Safety
    /// `params` must describe live device buffers of the sizes the kernel reads and writes, its
    /// scratch sized for `plan` (counters zero).
    pub(super) unsafe fn launch_stats_v2(
        &self,
        dtype: Dtype,
        params: SoftmaxStatsV2Params,
        plan: &PlanV2,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.launch_planned(KernelFn::SoftmaxStatsV2(dtype), params, plan) }
    }

    /// Launches statistics kernel `f` (v2 or v3) with `params` by value, shaped as `plan` says.
    ///
    /// # Safety
    /// `params` must satisfy `f`'s contract for `plan`.
    pub(super) unsafe fn launch_planned<T>(
        &self,
        f: KernelFn,
        params: T,
        plan: &PlanV2,
    ) -> Result<()>
    where
        ByValue<T>: cudarc::driver::DeviceRepr,
    {
        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (plan.block, 1, 1),
            shared_mem_bytes: plan.shared_bytes as u32,
        };
        let arg = ByValue(params);
        let mut b = self.stream.launch_builder(self.function(f));
        b.arg(&arg);
        // SAFETY: forwarded from this function's contract; the launch shape is the plan's.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Statistics of host logits by the v2 kernel (uploads, launches, downloads).
    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        self.softmax_stats_version(logits, opts, accum, KernelVersion::V2)
    }

    /// Statistics of host logits by the v1 kernel (one block per row), kept for comparison.
    pub fn softmax_stats_v1(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        self.softmax_stats_version(logits, opts, accum, KernelVersion::V1)
    }

    fn softmax_stats_version(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
        version: KernelVersion,
    ) -> Result<Vec<RowStats>> {
        opts.validate()?;
        check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
        let rows = logits.rows();
        let d_logits = self.stream.clone_htod(logits.data().bytes())?;
        let mut d_out = self
            .stream
            .alloc_zeros::<u8>(rows * std::mem::size_of::<RowStats>())?;
        let mut d_accum = match &accum {
            Some(a) => Some(
                self.stream
                    .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(a))?,
            ),
            None => None,
        };
        let (_, plan) = crate::plan::softmax_stats_v2(
            rows as u32,
            logits.vocab() as u32,
            logits.dtype(),
            self.sm_count,
        );
        let mut scratch = StatsScratch::new(self, rows, &plan)?;
        {
            let (lp, _g1) = d_logits.device_ptr(&self.stream);
            let (op, _g2) = d_out.device_ptr_mut(&self.stream);
            let (ap, _g3) = match d_accum.as_mut() {
                Some(a) => {
                    let (p, g) = a.device_ptr_mut(&self.stream);
                    (p, Some(g))
                }
                None => (0, None),
            };
            let params = stats_params(
                logits,
                opts,
                lp as *const u8,
                op as *mut RowStats,
                ap as *mut FeatureAccum,
            );
            match version {
                // SAFETY: the buffers were sized from the validated shapes just above and live
                // until after the synchronising downloads below.
                KernelVersion::V1 => unsafe { self.launch_stats(logits.dtype(), params) }?,
                KernelVersion::V2 => {
                    let p2 = scratch.params(&self.stream, params, &plan);
                    // SAFETY: as above; the scratch was allocated for this plan, counters zeroed.
                    unsafe { self.launch_stats_v2(logits.dtype(), p2, &plan) }?
                }
            }
        }
        let out_bytes = self.stream.clone_dtoh(&d_out)?;
        if let (Some(a), Some(d)) = (accum, d_accum.as_ref()) {
            let bytes = self.stream.clone_dtoh(d)?;
            a.copy_from_slice(bytemuck::cast_slice(&bytes));
        }
        scratch.check_counters(&self.stream)?;
        Ok(bytemuck::pod_collect_to_vec(&out_bytes))
    }

    /// Mean time of one `softmax_stats` launch over device-resident logits (uploaded once, timed
    /// with CUDA events, transfers excluded, L2 flushed before every launch).
    pub fn time_softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        iters: u32,
        version: KernelVersion,
    ) -> Result<Duration> {
        opts.validate()?;
        let rows = logits.rows();
        let d_logits = self.stream.clone_htod(logits.data().bytes())?;
        let mut d_out = self
            .stream
            .alloc_zeros::<u8>(rows * std::mem::size_of::<RowStats>())?;
        let (lp, _g1) = d_logits.device_ptr(&self.stream);
        let (op, _g2) = d_out.device_ptr_mut(&self.stream);
        let mut o = *opts;
        o.accumulate = crate::stats::Accumulate::No;
        let params = stats_params(
            logits,
            &o,
            lp as *const u8,
            op as *mut RowStats,
            std::ptr::null_mut(),
        );
        let (_, plan) = crate::plan::softmax_stats_v2(
            rows as u32,
            logits.vocab() as u32,
            logits.dtype(),
            self.sm_count,
        );
        let mut scratch = StatsScratch::new(self, rows, &plan)?;
        let p2 = scratch.params(&self.stream, params, &plan);
        // SAFETY: as in `softmax_stats`; the buffers live to the end of this function.
        self.time_cold(iters, || unsafe {
            match version {
                KernelVersion::V1 => self.launch_stats(logits.dtype(), params),
                KernelVersion::V2 => self.launch_stats_v2(logits.dtype(), p2, &plan),
            }
        })
    }
}

//! The γ decision on the device: the controller's weights uploaded once, `gamma_mlp` launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::{
    FeatureAccum, GammaMlpParams, MlpWeights, RowStats, SoftmaxStatsV2Params, STATS_DECIDE,
};

use super::{ByValue, CudaBackend, KernelFn};
use crate::backend::emulate::StatsV2Output;
use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};
use crate::stats::{check_accum, Accumulate, Logits, StatsOptions};

/// Block size of `gamma_mlp` launches (one thread per sequence).
pub const GAMMA_BLOCK: u32 = 128;

/// The controller's weights and cost table on the device, uploaded once.
pub struct DeviceController {
    controller: Controller,
    weights: cudarc::driver::CudaSlice<u8>,
    cost: Option<cudarc::driver::CudaSlice<f32>>,
}

impl CudaBackend {
    /// Uploads the controller's weights (once).
    pub fn upload_controller(&self, controller: &Controller) -> Result<DeviceController> {
        let w = controller.mlp.to_f32();
        let weights = self.stream.clone_htod(bytemuck::bytes_of(&w))?;
        let cost = match controller.cost_table() {
            Some(c) => Some(self.stream.clone_htod(&c)?),
            None => None,
        };
        Ok(DeviceController {
            controller: controller.clone(),
            weights,
            cost,
        })
    }

    /// Launches `gamma_mlp` on device accumulators, writing device γ and, when given, predicted
    /// tokens per step and `GAMMA_*` flags (no synchronisation).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &cudarc::driver::CudaSlice<u8>,
        gammas: &mut cudarc::driver::CudaSlice<i32>,
        mut outputs: Option<(
            &mut cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<u32>,
        )>,
        batch: usize,
        compression_code: f32,
        fallback: i32,
    ) -> Result<()> {
        let outputs_short = outputs
            .as_ref()
            .is_some_and(|(e, f)| e.len() < batch || f.len() < batch);
        if accum.len() < batch * std::mem::size_of::<FeatureAccum>()
            || gammas.len() < batch
            || outputs_short
            || batch == 0
        {
            return Err(Error::Other(format!(
                "gamma_mlp: buffers smaller than the batch of {batch}"
            )));
        }
        let st = &self.stream;
        let (w, _g0) = dc.weights.device_ptr(st);
        let (a, _g1) = accum.device_ptr(st);
        let (c, _g2) = dc.cost_ptr(st);
        let (g, _g3) = gammas.device_ptr_mut(st);
        let (e, f, _g4) = match outputs.as_mut() {
            Some((e, f)) => {
                let (ep, ge) = e.device_ptr_mut(st);
                let (fp, gf) = f.device_ptr_mut(st);
                (ep, fp, Some((ge, gf)))
            }
            None => (0, 0, None),
        };
        let params = dc.controller.params(
            batch,
            compression_code,
            fallback,
            GammaPtrs {
                weights: w as *const MlpWeights,
                accum: a as *const FeatureAccum,
                compression: std::ptr::null(),
                cost: c as *const f32,
                gammas_out: g as *mut i32,
                expected_out: e as *mut f32,
                flags_out: f as *mut u32,
            },
        );
        let cfg = LaunchConfig {
            grid_dim: ((batch as u32).div_ceil(GAMMA_BLOCK), 1, 1),
            block_dim: (GAMMA_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let arg = ByValue(params);
        let mut b = st.launch_builder(self.function(KernelFn::GammaMlp));
        b.arg(&arg);
        // SAFETY: sizes checked above (null outputs are skipped by the kernel); the weights and
        // cost table were uploaded for this controller; the buffers outlive the launch.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// γ, predicted tokens per step and `GAMMA_*` flags per sequence from host accumulators
    /// (upload, launch, download), as [`crate::backend::emulate::Emulator::gamma_mlp`] returns them.
    pub fn gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
        let n = accum.len();
        let d_accum = self
            .stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let mut gammas = self.stream.alloc_zeros::<i32>(n.max(1))?;
        let mut expected = self.stream.alloc_zeros::<f32>(n.max(1))?;
        let mut flags = self.stream.alloc_zeros::<u32>(n.max(1))?;
        self.launch_gamma_mlp(
            dc,
            &d_accum,
            &mut gammas,
            Some((&mut expected, &mut flags)),
            n,
            compression_code,
            fallback,
        )?;
        Ok((
            self.stream.clone_dtoh(&gammas)?,
            self.stream.clone_dtoh(&expected)?,
            self.stream.clone_dtoh(&flags)?,
        ))
    }

    /// Mean time of one `gamma_mlp` launch for `batch` device-resident sequences (CUDA events).
    pub fn time_gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &[FeatureAccum],
        iters: u32,
    ) -> Result<Duration> {
        let d_accum = self
            .stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let mut gammas = self.stream.alloc_zeros::<i32>(accum.len())?;
        self.time_cold(iters, || {
            self.launch_gamma_mlp(dc, &d_accum, &mut gammas, None, accum.len(), 0.0, 4)
        })
    }
}

impl DeviceController {
    fn cost_ptr<'a>(
        &'a self,
        st: &'a std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
        super::ptr_or_null(self.cost.as_ref(), st)
    }
}

/// Device buffers of one `softmax_stats_v2` launch with the γ decision fused into its final merge.
struct StatsDecide {
    rows: usize,
    dtype: crate::stats::Dtype,
    logits: cudarc::driver::CudaSlice<u8>,
    out: cudarc::driver::CudaSlice<u8>,
    accum: cudarc::driver::CudaSlice<u8>,
    gammas: cudarc::driver::CudaSlice<i32>,
    expected: cudarc::driver::CudaSlice<f32>,
    flags: cudarc::driver::CudaSlice<u32>,
    decision: Option<cudarc::driver::CudaSlice<u8>>,
    scratch: super::stats::StatsScratch,
    plan: speckv_kernels::softmax_stats::PlanV2,
}

impl CudaBackend {
    /// Uploads logits and accumulators and sets up the fused decision's buffers.
    #[allow(clippy::too_many_arguments)]
    fn stats_decide_buffers(
        &self,
        dc: &DeviceController,
        logits: &Logits<'_>,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
        decide: bool,
    ) -> Result<StatsDecide> {
        let rows = logits.rows();
        let st = &self.stream;
        let (_, plan) = crate::plan::softmax_stats_v2(
            rows as u32,
            logits.vocab() as u32,
            logits.dtype(),
            self.sm_count,
        );
        let mut b = StatsDecide {
            rows,
            dtype: logits.dtype(),
            logits: st.clone_htod(logits.data().bytes())?,
            out: st.alloc_zeros::<u8>(rows * std::mem::size_of::<RowStats>())?,
            accum: st.clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?,
            gammas: st.alloc_zeros::<i32>(rows)?,
            expected: st.alloc_zeros::<f32>(rows)?,
            flags: st.alloc_zeros::<u32>(rows)?,
            decision: None,
            scratch: super::stats::StatsScratch::new(self, rows, &plan)?,
            plan,
        };
        if decide {
            let (w, _g0) = dc.weights.device_ptr(st);
            let (c, _g1) = dc.cost_ptr(st);
            let (ap, _g2) = b.accum.device_ptr(st);
            let (gp, _g3) = b.gammas.device_ptr_mut(st);
            let (ep, _g4) = b.expected.device_ptr_mut(st);
            let (fp, _g5) = b.flags.device_ptr_mut(st);
            let gparams: GammaMlpParams = dc.controller.params(
                rows,
                compression_code,
                fallback,
                GammaPtrs {
                    weights: w as *const MlpWeights,
                    accum: ap as *const FeatureAccum,
                    compression: std::ptr::null(),
                    cost: c as *const f32,
                    gammas_out: gp as *mut i32,
                    expected_out: ep as *mut f32,
                    flags_out: fp as *mut u32,
                },
            );
            b.decision = Some(st.clone_htod(bytemuck::bytes_of(&Pod(gparams)))?);
        }
        Ok(b)
    }

    /// The launch parameters pointing at `b`.
    fn stats_decide_params(
        &self,
        b: &mut StatsDecide,
        logits: &Logits<'_>,
        opts: &StatsOptions,
    ) -> SoftmaxStatsV2Params {
        let st = &self.stream;
        let (lp, _g0) = b.logits.device_ptr(st);
        let (op, _g1) = b.out.device_ptr_mut(st);
        let (ap, _g2) = b.accum.device_ptr_mut(st);
        let base = crate::stats::stats_params(
            logits,
            opts,
            lp as *const u8,
            op as *mut RowStats,
            ap as *mut FeatureAccum,
        );
        let mut p2 = b.scratch.params(st, base, &b.plan);
        if let Some(d) = b.decision.as_ref() {
            let (dp, _g3) = d.device_ptr(st);
            p2.flags |= STATS_DECIDE;
            p2.decision = dp as *const GammaMlpParams;
        }
        p2
    }

    /// `softmax_stats_v2` with the γ decision fused into its final merge: the rows' statistics,
    /// the accumulators after the launch (`accum` is updated), and γ, predicted tokens and flags
    /// per row — what [`crate::backend::emulate::Emulator::softmax_stats_v2`] returns with a
    /// decision.
    pub fn softmax_stats_decide(
        &self,
        dc: &DeviceController,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<StatsV2Output> {
        opts.validate()?;
        check_accum(Some(accum.len()), logits.rows(), opts)?;
        if opts.accumulate == Accumulate::No {
            return Err(Error::Other(
                "a fused γ decision needs accumulators (accumulate add or reset)".to_string(),
            ));
        }
        let mut b =
            self.stats_decide_buffers(dc, logits, accum, compression_code, fallback, true)?;
        let p2 = self.stats_decide_params(&mut b, logits, opts);
        // SAFETY: every buffer in `b` has `rows` entries or the plan's size and lives to the end of
        // this function; the decision parameters point at them.
        unsafe { self.launch_stats_v2(b.dtype, p2, &b.plan) }?;
        let st = &self.stream;
        let stats: Vec<RowStats> = bytemuck::pod_collect_to_vec(&st.clone_dtoh(&b.out)?);
        let acc: Vec<FeatureAccum> = bytemuck::pod_collect_to_vec(&st.clone_dtoh(&b.accum)?);
        accum.copy_from_slice(&acc);
        b.scratch.check_counters(st)?;
        debug_assert_eq!(stats.len(), b.rows);
        Ok(StatsV2Output {
            stats,
            accum: Some(acc),
            gammas: Some(st.clone_dtoh(&b.gammas)?),
            expected: Some(st.clone_dtoh(&b.expected)?),
            gamma_flags: Some(st.clone_dtoh(&b.flags)?),
            stop_state: None,
            stopped_count: None,
            hazards: None,
        })
    }

    /// Mean time (cold L2) of one `softmax_stats_v2` launch over `logits` accumulating into
    /// per-row features, with (`decide`) or without the γ decision fused into its final merge: the
    /// difference is what the fused decision adds to a drafted position.
    pub fn time_stats_decide(
        &self,
        dc: &DeviceController,
        logits: &Logits<'_>,
        iters: u32,
        decide: bool,
    ) -> Result<Duration> {
        let accum0 = vec![FeatureAccum::EMPTY; logits.rows()];
        let mut b = self.stats_decide_buffers(dc, logits, &accum0, 0.0, 4, decide)?;
        let opts = StatsOptions {
            accumulate: Accumulate::Add,
            ..Default::default()
        };
        let p2 = self.stats_decide_params(&mut b, logits, &opts);
        // SAFETY: as in `softmax_stats_decide`; `b` lives to the end of this function.
        self.time_cold(iters, || unsafe {
            self.launch_stats_v2(b.dtype, p2, &b.plan)
        })
    }
}

/// `GammaMlpParams` as bytes (a `#[repr(C)]` struct of pointers and scalars with no padding: its
/// size is asserted in the kernels crate).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Pod(speckv_kernels::params::GammaMlpParams);
// SAFETY: `GammaMlpParams` is `#[repr(C)]`, 104 bytes of 8-byte pointers, i32/u32/f32 fields and
// an i32 array with no padding (asserted in params.rs); any bit pattern is a valid value to copy.
unsafe impl bytemuck::Zeroable for Pod {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Pod {}

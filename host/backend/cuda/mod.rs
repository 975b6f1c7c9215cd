//! The CUDA backend: cudarc with dynamic loading (no CUDA needed to build), the embedded PTX
//! loaded once per context into a module cache keyed by [`KernelFn`], every driver error mapped to
//! [`Error::Driver`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use speckv_kernels::params::{
    FeatureAccum, GammaMlpParams, GemvParams, RowStats, SoftmaxStatsParams, SoftmaxStatsV2Params,
    StatsState, VerifyParams,
};
use speckv_kernels::softmax_stats::{self as kernel, PlanV2};

use crate::error::{Error, Result};
use crate::ptx::Arch;
use crate::stats::{check_accum, stats_params, Dtype, Logits, StatsOptions};
use crate::weights::quant::Format;

mod controller;
mod gemv;
mod verify;

pub use controller::{DeviceController, GAMMA_BLOCK};
pub use gemv::{DeviceMatrix, GEMV_BLOCK};

/// Every kernel entry point of the embedded PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFn {
    SoftmaxStats(Dtype),
    SoftmaxStatsV2(Dtype),
    VerifyV2Rows(Dtype),
    VerifyV2Sample(Dtype),
    Verify(Dtype),
    GammaMlp,
    /// Weight format and M tile (1, 2, 4, 8, 16).
    Gemv(Format, u32),
}

impl KernelFn {
    pub const ALL: [KernelFn; 31] = [
        KernelFn::VerifyV2Rows(Dtype::F32),
        KernelFn::VerifyV2Rows(Dtype::F16),
        KernelFn::VerifyV2Rows(Dtype::Bf16),
        KernelFn::VerifyV2Sample(Dtype::F32),
        KernelFn::VerifyV2Sample(Dtype::F16),
        KernelFn::VerifyV2Sample(Dtype::Bf16),
        KernelFn::SoftmaxStatsV2(Dtype::F32),
        KernelFn::SoftmaxStatsV2(Dtype::F16),
        KernelFn::SoftmaxStatsV2(Dtype::Bf16),
        KernelFn::GammaMlp,
        KernelFn::Gemv(Format::Fp16, 1),
        KernelFn::Gemv(Format::Fp16, 2),
        KernelFn::Gemv(Format::Fp16, 4),
        KernelFn::Gemv(Format::Fp16, 8),
        KernelFn::Gemv(Format::Fp16, 16),
        KernelFn::Gemv(Format::Int8, 1),
        KernelFn::Gemv(Format::Int8, 2),
        KernelFn::Gemv(Format::Int8, 4),
        KernelFn::Gemv(Format::Int8, 8),
        KernelFn::Gemv(Format::Int8, 16),
        KernelFn::Gemv(Format::Nf4, 1),
        KernelFn::Gemv(Format::Nf4, 2),
        KernelFn::Gemv(Format::Nf4, 4),
        KernelFn::Gemv(Format::Nf4, 8),
        KernelFn::Gemv(Format::Nf4, 16),
        KernelFn::SoftmaxStats(Dtype::F32),
        KernelFn::SoftmaxStats(Dtype::F16),
        KernelFn::SoftmaxStats(Dtype::Bf16),
        KernelFn::Verify(Dtype::F32),
        KernelFn::Verify(Dtype::F16),
        KernelFn::Verify(Dtype::Bf16),
    ];

    /// The PTX entry name.
    pub fn entry(self) -> &'static str {
        match self {
            KernelFn::SoftmaxStats(Dtype::F32) => "softmax_stats_f32",
            KernelFn::SoftmaxStats(Dtype::F16) => "softmax_stats_f16",
            KernelFn::SoftmaxStats(Dtype::Bf16) => "softmax_stats_bf16",
            KernelFn::SoftmaxStatsV2(Dtype::F32) => "softmax_stats_v2_f32",
            KernelFn::SoftmaxStatsV2(Dtype::F16) => "softmax_stats_v2_f16",
            KernelFn::SoftmaxStatsV2(Dtype::Bf16) => "softmax_stats_v2_bf16",
            KernelFn::VerifyV2Rows(Dtype::F32) => "verify_v2_rows_f32",
            KernelFn::VerifyV2Rows(Dtype::F16) => "verify_v2_rows_f16",
            KernelFn::VerifyV2Rows(Dtype::Bf16) => "verify_v2_rows_bf16",
            KernelFn::VerifyV2Sample(Dtype::F32) => "verify_v2_sample_f32",
            KernelFn::VerifyV2Sample(Dtype::F16) => "verify_v2_sample_f16",
            KernelFn::VerifyV2Sample(Dtype::Bf16) => "verify_v2_sample_bf16",
            KernelFn::Verify(Dtype::F32) => "verify_f32",
            KernelFn::Verify(Dtype::F16) => "verify_f16",
            KernelFn::Verify(Dtype::Bf16) => "verify_bf16",
            KernelFn::GammaMlp => "gamma_mlp_f32",
            KernelFn::Gemv(f, t) => match (f, t) {
                (Format::Fp16, 1) => "gemv_fp16_m1",
                (Format::Fp16, 2) => "gemv_fp16_m2",
                (Format::Fp16, 4) => "gemv_fp16_m4",
                (Format::Fp16, 8) => "gemv_fp16_m8",
                (Format::Fp16, _) => "gemv_fp16_m16",
                (Format::Int8, 1) => "gemv_int8_m1",
                (Format::Int8, 2) => "gemv_int8_m2",
                (Format::Int8, 4) => "gemv_int8_m4",
                (Format::Int8, 8) => "gemv_int8_m8",
                (Format::Int8, _) => "gemv_int8_m16",
                (Format::Nf4, 1) => "gemv_nf4_m1",
                (Format::Nf4, 2) => "gemv_nf4_m2",
                (Format::Nf4, 4) => "gemv_nf4_m4",
                (Format::Nf4, 8) => "gemv_nf4_m8",
                (Format::Nf4, _) => "gemv_nf4_m16",
            },
        }
    }
}

/// A kernel's `#[repr(C)]` parameter struct, passed by value as the kernel's only parameter.
#[repr(transparent)]
struct ByValue<T>(T);
// SAFETY: `T` is one of the kernels' `#[repr(C)]` parameter structs (plain addresses and
// integers, no padding-sensitive invariants) whose layout the PTX entry declares as one
// `.param .align 8 .b8 [size]` aggregate; the driver copies its bytes.
unsafe impl DeviceRepr for ByValue<SoftmaxStatsParams> {}
// SAFETY: as above, for the v2 statistics kernel's parameters.
unsafe impl DeviceRepr for ByValue<SoftmaxStatsV2Params> {}
// SAFETY: as above, for the v2 verification kernels' parameters.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::VerifyV2Params> {}
// SAFETY: as above, for the verification kernel's parameters.
unsafe impl DeviceRepr for ByValue<VerifyParams> {}
// SAFETY: as above, for the γ decision kernel's parameters.
unsafe impl DeviceRepr for ByValue<GammaMlpParams> {}
// SAFETY: as above, for the GEMV kernels' parameters.
unsafe impl DeviceRepr for ByValue<GemvParams> {}

/// True when a CUDA driver library can be loaded (cudarc panics on first use otherwise).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Which version of a kernel to launch (v1 stays callable for comparison).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelVersion {
    V1,
    V2,
}

/// The scratch of one `softmax_stats_v2` launch: partial states and arrival counters (zeroed).
struct StatsScratch {
    partials: cudarc::driver::CudaSlice<u8>,
    counters: cudarc::driver::CudaSlice<u32>,
}

impl StatsScratch {
    fn new(cuda: &CudaBackend, rows: usize, plan: &PlanV2) -> Result<StatsScratch> {
        Ok(StatsScratch {
            partials: cuda.stream.alloc_zeros::<u8>(
                rows * plan.splits as usize * std::mem::size_of::<StatsState>(),
            )?,
            counters: cuda.stream.alloc_zeros::<u32>(rows.max(1))?,
        })
    }

    /// v2 parameters from v1's, pointing at this scratch.
    fn params(
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
        }
    }

    /// Every launch must leave the counters zero (the next one relies on it).
    fn check_counters(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let c = stream.clone_dtoh(&self.counters)?;
        if c.iter().any(|&x| x != 0) {
            return Err(Error::Other(format!(
                "softmax_stats_v2 left its arrival counters non-zero: {c:?}"
            )));
        }
        Ok(())
    }
}

/// Block size used for `softmax_stats` launches.
pub const STATS_BLOCK: u32 = 1024;
/// Block size used for `verify` launches (its ~80 registers per thread allow at most 768).
pub const VERIFY_BLOCK: u32 = 256;

/// One GPU, its stream and the loaded kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: HashMap<KernelFn, CudaFunction>,
    arch: Arch,
    name: String,
    sm_count: u32,
}

impl CudaBackend {
    /// Opens device `ordinal` and loads the PTX for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoCuda(
                "no CUDA driver library (libcuda) was found".to_string(),
            ));
        }
        let count = match CudaContext::device_count() {
            Ok(c) => c,
            // A driver without a GPU (cuInit says so): the one other "no CUDA" case.
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err(Error::NoCuda(format!(
                    "the CUDA driver sees no device ({e})"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if count <= ordinal as i32 {
            return Err(Error::NoCuda(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = Arch::for_capability(major, minor)?;
        let ptx = arch.ptx()?;
        let module = ctx.load_module(Ptx::from_src(ptx))?;
        let mut functions = HashMap::new();
        for f in KernelFn::ALL {
            let func = module.load_function(f.entry()).map_err(|e| {
                Error::CudaCall(format!(
                    "entry point {} of the {} PTX: {e}",
                    f.entry(),
                    arch.name()
                ))
            })?;
            functions.insert(f, func);
        }
        let name = ctx.name()?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?
            .max(1) as u32;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            _module: module,
            functions,
            arch,
            name,
            sm_count,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Streaming multiprocessors of the device (what the v2 launch plans are made for).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn function(&self, f: KernelFn) -> &CudaFunction {
        // Every KernelFn is loaded in `new`.
        &self.functions[&f]
    }

    /// Mean time of `iters` calls of `launch` on the stream, by CUDA events (the first call is
    /// a warm-up outside the timed region).
    fn time_events(&self, iters: u32, mut launch: impl FnMut() -> Result<()>) -> Result<Duration> {
        launch()?;
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = self.ctx.new_event(Some(flags))?;
        let end = self.ctx.new_event(Some(flags))?;
        start.record(&self.stream)?;
        for _ in 0..iters.max(1) {
            launch()?;
        }
        end.record(&self.stream)?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)?;
        Ok(Duration::from_secs_f64(
            ms as f64 / 1e3 / iters.max(1) as f64,
        ))
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
    unsafe fn launch_stats_v2(
        &self,
        dtype: Dtype,
        params: SoftmaxStatsV2Params,
        plan: &PlanV2,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (plan.block, 1, 1),
            shared_mem_bytes: plan.shared_bytes as u32,
        };
        let arg = ByValue(params);
        let func = self.function(KernelFn::SoftmaxStatsV2(dtype));
        let mut b = self.stream.launch_builder(func);
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
    /// with CUDA events, transfers excluded).
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
        self.time_events(iters, || unsafe {
            match version {
                KernelVersion::V1 => self.launch_stats(logits.dtype(), params),
                KernelVersion::V2 => self.launch_stats_v2(logits.dtype(), p2, &plan),
            }
        })
    }

    /// Device-to-device copy bandwidth (read + write bytes per second) of `bytes` bytes, the
    /// ceiling the memory-bound kernels are compared with.
    pub fn copy_bandwidth(&self, bytes: usize, iters: u32) -> Result<f64> {
        let src = self.stream.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes)?;
        let t = self.time_events(iters, || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        let s = t.as_secs_f64();
        Ok(2.0 * bytes as f64 / s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend resolves every entry point `build.rs` checked in the PTX, and nothing else.
    #[test]
    fn kernel_fns_are_the_entry_points() {
        let mut ours: Vec<&str> = KernelFn::ALL.iter().map(|f| f.entry()).collect();
        let mut listed: Vec<&str> = crate::ptx::ENTRY_POINTS.to_vec();
        ours.sort_unstable();
        listed.sort_unstable();
        assert_eq!(ours, listed);
    }
}

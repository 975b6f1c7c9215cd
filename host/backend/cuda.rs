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
    FeatureAccum, GammaMlpParams, GemvParams, MlpWeights, RowStats, SoftmaxStatsParams,
    VerifyParams,
};
use speckv_kernels::softmax_stats as kernel;
use speckv_kernels::verify as verify_kernel;

use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};
use crate::ptx::Arch;
use crate::stats::{check_accum, stats_params, Dtype, Logits, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};
use crate::weights::quant::{Format, QMatrix};

/// Every kernel entry point of the embedded PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFn {
    SoftmaxStats(Dtype),
    Verify(Dtype),
    GammaMlp,
    /// Weight format and M tile (1, 2, 4, 8, 16).
    Gemv(Format, u32),
}

impl KernelFn {
    pub const ALL: [KernelFn; 22] = [
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
}

impl CudaBackend {
    /// Opens device `ordinal` and loads the PTX for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoCuda(
                "no CUDA driver library (libcuda) was found".to_string(),
            ));
        }
        let count = CudaContext::device_count()?;
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
            functions.insert(f, module.load_function(f.entry())?);
        }
        let name = ctx.name()?;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            _module: module,
            functions,
            arch,
            name,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> Arch {
        self.arch
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

    /// Statistics of host logits (uploads, launches, downloads).
    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
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
            // SAFETY: the buffers were sized from the validated shapes just above and live
            // until after the synchronising downloads below.
            unsafe { self.launch_stats(logits.dtype(), params) }?;
        }
        let out_bytes = self.stream.clone_dtoh(&d_out)?;
        if let (Some(a), Some(d)) = (accum, d_accum.as_ref()) {
            let bytes = self.stream.clone_dtoh(d)?;
            a.copy_from_slice(bytemuck::cast_slice(&bytes));
        }
        Ok(bytemuck::pod_collect_to_vec(&out_bytes))
    }

    /// Mean time of one `softmax_stats` launch over device-resident logits (uploaded once, timed
    /// with CUDA events, transfers excluded).
    pub fn time_softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        iters: u32,
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
        // SAFETY: as in `softmax_stats`; the buffers live to the end of this function.
        self.time_events(iters, || unsafe {
            self.launch_stats(logits.dtype(), params)
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

/// Device copies of one verification batch's inputs and outputs.
struct VerifyBuffers {
    target: cudarc::driver::CudaSlice<u8>,
    draft: cudarc::driver::CudaSlice<u8>,
    tokens: cudarc::driver::CudaSlice<i32>,
    gammas: cudarc::driver::CudaSlice<i32>,
    t_temp: cudarc::driver::CudaSlice<f32>,
    d_temp: Option<cudarc::driver::CudaSlice<f32>>,
    accepted: cudarc::driver::CudaSlice<i32>,
    emitted: cudarc::driver::CudaSlice<i32>,
    count: cudarc::driver::CudaSlice<i32>,
    ratios: cudarc::driver::CudaSlice<f32>,
    counterfactual: cudarc::driver::CudaSlice<i32>,
    flags: cudarc::driver::CudaSlice<u32>,
}

impl CudaBackend {
    fn upload_verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyBuffers> {
        let st = &self.stream;
        let (draft_bytes, d_temp): (&[u8], Option<&[f32]>) = match v.draft {
            DraftDist::Logits { data, temperature } => (data.bytes(), Some(temperature)),
            DraftDist::Probs(p) => (bytemuck::cast_slice(p), None),
        };
        let w = v.gamma_max + 1;
        Ok(VerifyBuffers {
            target: st.clone_htod(v.target.bytes())?,
            draft: st.clone_htod(draft_bytes)?,
            tokens: st.clone_htod(v.draft_tokens)?,
            gammas: st.clone_htod(v.gammas)?,
            t_temp: st.clone_htod(v.target_temperature)?,
            d_temp: match d_temp {
                Some(t) => Some(st.clone_htod(t)?),
                None => None,
            },
            accepted: st.alloc_zeros::<i32>(v.batch)?,
            emitted: st.alloc_zeros::<i32>(v.batch * w)?,
            count: st.alloc_zeros::<i32>(v.batch)?,
            ratios: st.alloc_zeros::<f32>(v.batch * v.gamma_max.max(1))?,
            counterfactual: st.alloc_zeros::<i32>(v.batch * w)?,
            flags: st.alloc_zeros::<u32>(v.batch)?,
        })
    }

    /// Launches `verify` on uploaded buffers.
    fn launch_verify(&self, v: &VerifyBatch<'_>, d: &mut VerifyBuffers) -> Result<()> {
        let st = &self.stream;
        let (t, _g0) = d.target.device_ptr(st);
        let (dr, _g1) = d.draft.device_ptr(st);
        let (tok, _g2) = d.tokens.device_ptr(st);
        let (gam, _g3) = d.gammas.device_ptr(st);
        let (tt, _g4) = d.t_temp.device_ptr(st);
        let (dt, _g5) = match d.d_temp.as_ref() {
            Some(x) => {
                let (p, g) = x.device_ptr(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (acc, _g6) = d.accepted.device_ptr_mut(st);
        let (emi, _g7) = d.emitted.device_ptr_mut(st);
        let (cnt, _g8) = d.count.device_ptr_mut(st);
        let (rat, _g9) = d.ratios.device_ptr_mut(st);
        let (cf, _g10) = d.counterfactual.device_ptr_mut(st);
        let (fl, _g11) = d.flags.device_ptr_mut(st);
        let params = v.params(VerifyPtrs {
            target: t as *const u8,
            draft: dr as *const u8,
            draft_tokens: tok as *const i32,
            gammas: gam as *const i32,
            target_temperature: tt as *const f32,
            draft_temperature: dt as *const f32,
            accepted: acc as *mut i32,
            emitted: emi as *mut i32,
            emitted_count: cnt as *mut i32,
            ratios: if v.gamma_max == 0 {
                std::ptr::null_mut()
            } else {
                rat as *mut f32
            },
            counterfactual: cf as *mut i32,
            seq_flags: fl as *mut u32,
        });
        let cfg = LaunchConfig {
            grid_dim: (v.batch as u32, 1, 1),
            block_dim: (VERIFY_BLOCK, 1, 1),
            shared_mem_bytes: verify_kernel::shared_bytes(VERIFY_BLOCK) as u32,
        };
        let arg = ByValue(params);
        let mut b = self
            .stream
            .launch_builder(self.function(KernelFn::Verify(v.target.dtype())));
        b.arg(&arg);
        // SAFETY: every buffer was uploaded or allocated by `upload_verify` from a batch whose
        // shapes `validate` checked; they outlive the launch (the guards above hold them).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Batched verification of host inputs (uploads, one launch, downloads).
    pub fn verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate()?;
        let mut d = self.upload_verify(v)?;
        self.launch_verify(v, &mut d)?;
        let st = &self.stream;
        let mut out = VerifyOutput::new(v.batch, v.gamma_max);
        out.accepted = st.clone_dtoh(&d.accepted)?;
        out.emitted = st.clone_dtoh(&d.emitted)?;
        out.emitted_count = st.clone_dtoh(&d.count)?;
        if v.gamma_max > 0 {
            out.ratios = st.clone_dtoh(&d.ratios)?;
        }
        out.counterfactual = st.clone_dtoh(&d.counterfactual)?;
        out.flags = st.clone_dtoh(&d.flags)?;
        Ok(out)
    }

    /// Mean time of one `verify` launch on device-resident inputs (CUDA events).
    pub fn time_verify(&self, v: &VerifyBatch<'_>, iters: u32) -> Result<Duration> {
        v.validate()?;
        let mut d = self.upload_verify(v)?;
        self.time_events(iters, || self.launch_verify(v, &mut d))
    }
}

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

    /// Launches `gamma_mlp` on device accumulators, writing device γ (no synchronisation).
    pub fn launch_gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &cudarc::driver::CudaSlice<u8>,
        gammas: &mut cudarc::driver::CudaSlice<i32>,
        batch: usize,
        compression_code: f32,
        fallback: i32,
    ) -> Result<()> {
        if accum.len() < batch * std::mem::size_of::<FeatureAccum>()
            || gammas.len() < batch
            || batch == 0
        {
            return Err(Error::Other(format!(
                "gamma_mlp: buffers smaller than the batch of {batch}"
            )));
        }
        let st = &self.stream;
        let (w, _g0) = dc.weights.device_ptr(st);
        let (a, _g1) = accum.device_ptr(st);
        let (c, _g2) = match dc.cost.as_ref() {
            Some(x) => {
                let (p, g) = x.device_ptr(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (g, _g3) = gammas.device_ptr_mut(st);
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
                expected_out: std::ptr::null_mut(),
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
        // SAFETY: sizes checked above; the weights and cost table were uploaded for this
        // controller; the buffers outlive the launch.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// γ per sequence from host accumulators (upload, launch, download).
    pub fn gamma_mlp(
        &self,
        dc: &DeviceController,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<Vec<i32>> {
        let d_accum = self
            .stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let mut gammas = self.stream.alloc_zeros::<i32>(accum.len())?;
        self.launch_gamma_mlp(
            dc,
            &d_accum,
            &mut gammas,
            accum.len(),
            compression_code,
            fallback,
        )?;
        Ok(self.stream.clone_dtoh(&gammas)?)
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
        self.time_events(iters, || {
            self.launch_gamma_mlp(dc, &d_accum, &mut gammas, accum.len(), 0.0, 4)
        })
    }
}

/// Block size of GEMV launches (four output rows per block, one warp each).
pub const GEMV_BLOCK: u32 = 128;

/// A quantised matrix resident on the device.
pub struct DeviceMatrix {
    format: Format,
    out: usize,
    inp: usize,
    weight: cudarc::driver::CudaSlice<u8>,
    scales: Option<cudarc::driver::CudaSlice<f32>>,
    bytes: usize,
}

impl DeviceMatrix {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl CudaBackend {
    pub fn upload_matrix(&self, w: &QMatrix) -> Result<DeviceMatrix> {
        let (wb, scales) = crate::weights::gemv::raw(w);
        let (out, inp) = w.shape();
        Ok(DeviceMatrix {
            format: w.format(),
            out,
            inp,
            weight: self.stream.clone_htod(wb)?,
            scales: match scales {
                Some(s) => Some(self.stream.clone_htod(s)?),
                None => None,
            },
            bytes: w.bytes(),
        })
    }

    fn launch_gemv(
        &self,
        d: &DeviceMatrix,
        x: &cudarc::driver::CudaSlice<f32>,
        y: &mut cudarc::driver::CudaSlice<f32>,
        m: usize,
    ) -> Result<()> {
        if m == 0 || m > crate::weights::gemv::MAX_M || x.len() < m * d.inp || y.len() < m * d.out {
            return Err(Error::Other(format!(
                "gemv: M = {m} or buffer sizes do not fit the {}×{} matrix",
                d.out, d.inp
            )));
        }
        let st = &self.stream;
        let (w, _g0) = d.weight.device_ptr(st);
        let (sc, _g1) = match d.scales.as_ref() {
            Some(s) => {
                let (p, g) = s.device_ptr(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (xp, _g2) = x.device_ptr(st);
        let (yp, _g3) = y.device_ptr_mut(st);
        let params = GemvParams {
            weight: w as *const u8,
            scales: sc as *const f32,
            x: xp as *const f32,
            y: yp as *mut f32,
            out_features: d.out as u32,
            in_features: d.inp as u32,
            m: m as u32,
            _pad: 0,
        };
        let tile = speckv_kernels::gemv::tile_for(m as u32).unwrap_or(16);
        let cfg = LaunchConfig {
            grid_dim: ((d.out as u32).div_ceil(GEMV_BLOCK / 32), 1, 1),
            block_dim: (GEMV_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let arg = ByValue(params);
        let mut b = st.launch_builder(self.function(KernelFn::Gemv(d.format, tile)));
        b.arg(&arg);
        // SAFETY: sizes checked above against the uploaded matrix; the buffers outlive the launch.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// y `[m, out]` = x · Wᵀ for host x (upload, launch, download).
    pub fn gemv(&self, d: &DeviceMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * d.inp {
            return Err(Error::Length {
                what: "x",
                got: x.len(),
                expected: m * d.inp,
            });
        }
        let dx = self.stream.clone_htod(x)?;
        let mut dy = self.stream.alloc_zeros::<f32>(m * d.out)?;
        self.launch_gemv(d, &dx, &mut dy, m)?;
        Ok(self.stream.clone_dtoh(&dy)?)
    }

    /// Mean time of one GEMV launch with device-resident weights and activations (CUDA events).
    pub fn time_gemv(&self, d: &DeviceMatrix, m: usize, iters: u32) -> Result<Duration> {
        let dx = self.stream.alloc_zeros::<f32>(m * d.inp)?;
        let mut dy = self.stream.alloc_zeros::<f32>(m * d.out)?;
        self.time_events(iters, || self.launch_gemv(d, &dx, &mut dy, m))
    }
}

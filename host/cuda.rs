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
use speckv_kernels::params::{FeatureAccum, RowStats, SoftmaxStatsParams};
use speckv_kernels::softmax_stats as kernel;

use crate::error::{Error, Result};
use crate::logits::{check_accum, stats_params, Dtype, Logits, StatsOptions};
use crate::ptx::Arch;

/// Every kernel entry point of the embedded PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFn {
    SoftmaxStats(Dtype),
}

impl KernelFn {
    pub const ALL: [KernelFn; 3] = [
        KernelFn::SoftmaxStats(Dtype::F32),
        KernelFn::SoftmaxStats(Dtype::F16),
        KernelFn::SoftmaxStats(Dtype::Bf16),
    ];

    /// The PTX entry name.
    pub fn entry(self) -> &'static str {
        match self {
            KernelFn::SoftmaxStats(Dtype::F32) => "softmax_stats_f32",
            KernelFn::SoftmaxStats(Dtype::F16) => "softmax_stats_f16",
            KernelFn::SoftmaxStats(Dtype::Bf16) => "softmax_stats_bf16",
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

/// True when a CUDA driver library can be loaded (cudarc panics on first use otherwise).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Block size used for `softmax_stats` launches.
pub const STATS_BLOCK: u32 = 1024;

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
        o.accumulate = crate::logits::Accumulate::No;
        let params = stats_params(
            logits,
            &o,
            lp as *const u8,
            op as *mut RowStats,
            std::ptr::null_mut(),
        );
        // SAFETY: as in `softmax_stats`; buffers live to the end of this function.
        unsafe { self.launch_stats(logits.dtype(), params) }?; // warm-up
        let start = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&self.stream)?;
        for _ in 0..iters.max(1) {
            // SAFETY: as above.
            unsafe { self.launch_stats(logits.dtype(), params) }?;
        }
        end.record(&self.stream)?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)?;
        Ok(Duration::from_secs_f64(
            ms as f64 / 1e3 / iters.max(1) as f64,
        ))
    }

    /// Device-to-device copy bandwidth (read + write bytes per second) of `bytes` bytes, the
    /// ceiling the memory-bound kernels are compared with.
    pub fn copy_bandwidth(&self, bytes: usize, iters: u32) -> Result<f64> {
        let src = self.stream.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes)?;
        self.stream.memcpy_dtod(&src, &mut dst)?;
        let start = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&self.stream)?;
        for _ in 0..iters.max(1) {
            self.stream.memcpy_dtod(&src, &mut dst)?;
        }
        end.record(&self.stream)?;
        end.synchronize()?;
        let s = start.elapsed_ms(&end)? as f64 / 1e3;
        Ok(2.0 * bytes as f64 * iters.max(1) as f64 / s)
    }
}

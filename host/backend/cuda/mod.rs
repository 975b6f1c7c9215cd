//! The CUDA backend: cudarc with dynamic loading (no CUDA needed to build), the embedded PTX
//! loaded once per context into a module cache keyed by [`KernelFn`], every driver error mapped to
//! [`Error::Driver`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr};
use cudarc::nvrtc::Ptx;
use speckv_kernels::params::{
    GammaMlpParams, GemvParams, SoftmaxStatsParams, SoftmaxStatsV2Params, VerifyParams,
};

use crate::error::{Error, Result};
use crate::plan::XRead;
use crate::ptx::Arch;
use crate::stats::Dtype;
use crate::weights::quant::Format;

mod controller;
mod forward;
mod gemv;
mod stats;
mod stats_v3;
mod stop;
mod verify;

pub use controller::{DeviceController, GAMMA_BLOCK};
pub use forward::CacheRefs;
pub use gemv::{DeviceMatrix, GemvVersion, GEMV_BLOCK};
pub(crate) use stats::PodStop;
pub use stats::ResidentStats;
pub use stats_v3::ResidentRows;
pub use verify::ResidentVerify;

/// Every kernel entry point of the embedded PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFn {
    SoftmaxStats(Dtype),
    SoftmaxStatsV2(Dtype),
    /// v3: every launch row described in device memory.
    SoftmaxStatsV3(Dtype),
    VerifyV2Rows(Dtype),
    VerifyV2Sample(Dtype),
    Verify(Dtype),
    GammaMlp,
    /// Weight format and M tile (1, 2, 4, 8, 16).
    Gemv(Format, u32),
    /// v2 on CUDA cores: weight format and M tile.
    GemvV2(Format, u32),
    /// v2 on tensor cores: weight format and n-tiles (1: M ≤ 8, 2: M ≤ 16).
    GemvTc(Format, u32),
    /// v3, the streaming kernel at M = 1: weight format and how it reads x.
    GemvV3(Format, XRead),
    /// v4, INT8 at M = 1 by integer dot products: how it reads x.
    GemvV4Int8(XRead),
    /// v4, NF4 at M = 1 by integer dot products: how it reads x.
    GemvV4Nf4(XRead),
    Embed,
    RmsNorm,
    QkvRope,
    /// Elements of a head per lane (1, 2, 4, 8).
    Attention(u32),
    /// v2 (cache positions split across blocks), elements of a head per lane.
    AttentionV2(u32),
    SiluMul,
}

impl KernelFn {
    pub const ALL: [KernelFn; 82] = [
        KernelFn::GemvV2(Format::Fp16, 1),
        KernelFn::GemvV2(Format::Fp16, 2),
        KernelFn::GemvV2(Format::Fp16, 4),
        KernelFn::GemvV2(Format::Fp16, 8),
        KernelFn::GemvV2(Format::Fp16, 16),
        KernelFn::GemvTc(Format::Fp16, 1),
        KernelFn::GemvTc(Format::Fp16, 2),
        KernelFn::GemvV2(Format::Int8, 1),
        KernelFn::GemvV2(Format::Int8, 2),
        KernelFn::GemvV2(Format::Int8, 4),
        KernelFn::GemvV2(Format::Int8, 8),
        KernelFn::GemvV2(Format::Int8, 16),
        KernelFn::GemvTc(Format::Int8, 1),
        KernelFn::GemvTc(Format::Int8, 2),
        KernelFn::GemvV2(Format::Nf4, 1),
        KernelFn::GemvV2(Format::Nf4, 2),
        KernelFn::GemvV2(Format::Nf4, 4),
        KernelFn::GemvV2(Format::Nf4, 8),
        KernelFn::GemvV2(Format::Nf4, 16),
        KernelFn::GemvTc(Format::Nf4, 1),
        KernelFn::GemvTc(Format::Nf4, 2),
        KernelFn::GemvV3(Format::Fp16, XRead::Plain),
        KernelFn::GemvV3(Format::Int8, XRead::Plain),
        KernelFn::GemvV3(Format::Nf4, XRead::Plain),
        KernelFn::GemvV3(Format::Fp16, XRead::Norm),
        KernelFn::GemvV3(Format::Int8, XRead::Norm),
        KernelFn::GemvV3(Format::Nf4, XRead::Norm),
        KernelFn::GemvV3(Format::Fp16, XRead::Silu),
        KernelFn::GemvV3(Format::Int8, XRead::Silu),
        KernelFn::GemvV3(Format::Nf4, XRead::Silu),
        KernelFn::GemvV4Int8(XRead::Plain),
        KernelFn::GemvV4Nf4(XRead::Plain),
        KernelFn::GemvV4Int8(XRead::Norm),
        KernelFn::GemvV4Nf4(XRead::Norm),
        KernelFn::GemvV4Int8(XRead::Silu),
        KernelFn::GemvV4Nf4(XRead::Silu),
        KernelFn::VerifyV2Rows(Dtype::F32),
        KernelFn::VerifyV2Rows(Dtype::F16),
        KernelFn::VerifyV2Rows(Dtype::Bf16),
        KernelFn::VerifyV2Sample(Dtype::F32),
        KernelFn::VerifyV2Sample(Dtype::F16),
        KernelFn::VerifyV2Sample(Dtype::Bf16),
        KernelFn::SoftmaxStatsV2(Dtype::F32),
        KernelFn::SoftmaxStatsV2(Dtype::F16),
        KernelFn::SoftmaxStatsV2(Dtype::Bf16),
        KernelFn::SoftmaxStatsV3(Dtype::F32),
        KernelFn::SoftmaxStatsV3(Dtype::F16),
        KernelFn::SoftmaxStatsV3(Dtype::Bf16),
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
        KernelFn::Embed,
        KernelFn::RmsNorm,
        KernelFn::QkvRope,
        KernelFn::Attention(1),
        KernelFn::Attention(2),
        KernelFn::Attention(4),
        KernelFn::Attention(8),
        KernelFn::AttentionV2(1),
        KernelFn::AttentionV2(2),
        KernelFn::AttentionV2(4),
        KernelFn::AttentionV2(8),
        KernelFn::SiluMul,
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
            KernelFn::SoftmaxStatsV3(Dtype::F32) => "softmax_stats_v3_f32",
            KernelFn::SoftmaxStatsV3(Dtype::F16) => "softmax_stats_v3_f16",
            KernelFn::SoftmaxStatsV3(Dtype::Bf16) => "softmax_stats_v3_bf16",
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
            KernelFn::Embed => "embed_f16",
            KernelFn::RmsNorm => "rms_norm_f32",
            KernelFn::QkvRope => "qkv_rope_f32",
            KernelFn::Attention(1) => "attention_f32_e1",
            KernelFn::Attention(2) => "attention_f32_e2",
            KernelFn::Attention(4) => "attention_f32_e4",
            KernelFn::Attention(_) => "attention_f32_e8",
            KernelFn::AttentionV2(1) => "attention_v2_f32_e1",
            KernelFn::AttentionV2(2) => "attention_v2_f32_e2",
            KernelFn::AttentionV2(4) => "attention_v2_f32_e4",
            KernelFn::AttentionV2(_) => "attention_v2_f32_e8",
            KernelFn::SiluMul => "silu_mul_f32",
            KernelFn::GemvV2(f, t) => match (f, t) {
                (Format::Fp16, 1) => "gemv_v2_fp16_m1",
                (Format::Fp16, 2) => "gemv_v2_fp16_m2",
                (Format::Fp16, 4) => "gemv_v2_fp16_m4",
                (Format::Fp16, 8) => "gemv_v2_fp16_m8",
                (Format::Fp16, _) => "gemv_v2_fp16_m16",
                (Format::Int8, 1) => "gemv_v2_int8_m1",
                (Format::Int8, 2) => "gemv_v2_int8_m2",
                (Format::Int8, 4) => "gemv_v2_int8_m4",
                (Format::Int8, 8) => "gemv_v2_int8_m8",
                (Format::Int8, _) => "gemv_v2_int8_m16",
                (Format::Nf4, 1) => "gemv_v2_nf4_m1",
                (Format::Nf4, 2) => "gemv_v2_nf4_m2",
                (Format::Nf4, 4) => "gemv_v2_nf4_m4",
                (Format::Nf4, 8) => "gemv_v2_nf4_m8",
                (Format::Nf4, _) => "gemv_v2_nf4_m16",
            },
            KernelFn::GemvV3(f, r) => match (f, r) {
                (Format::Fp16, XRead::Plain) => "gemv_v3_fp16",
                (Format::Int8, XRead::Plain) => "gemv_v3_int8",
                (Format::Nf4, XRead::Plain) => "gemv_v3_nf4",
                (Format::Fp16, XRead::Norm) => "gemv_v3_fp16_norm",
                (Format::Int8, XRead::Norm) => "gemv_v3_int8_norm",
                (Format::Nf4, XRead::Norm) => "gemv_v3_nf4_norm",
                (Format::Fp16, XRead::Silu) => "gemv_v3_fp16_silu",
                (Format::Int8, XRead::Silu) => "gemv_v3_int8_silu",
                (Format::Nf4, XRead::Silu) => "gemv_v3_nf4_silu",
            },
            KernelFn::GemvV4Int8(XRead::Plain) => "gemv_v4_int8",
            KernelFn::GemvV4Nf4(XRead::Plain) => "gemv_v4_nf4",
            KernelFn::GemvV4Int8(XRead::Norm) => "gemv_v4_int8_norm",
            KernelFn::GemvV4Nf4(XRead::Norm) => "gemv_v4_nf4_norm",
            KernelFn::GemvV4Int8(XRead::Silu) => "gemv_v4_int8_silu",
            KernelFn::GemvV4Nf4(XRead::Silu) => "gemv_v4_nf4_silu",
            KernelFn::GemvTc(f, nt) => match (f, nt) {
                (Format::Fp16, 1) => "gemv_tc_fp16_n8",
                (Format::Fp16, _) => "gemv_tc_fp16_n16",
                (Format::Int8, 1) => "gemv_tc_int8_n8",
                (Format::Int8, _) => "gemv_tc_int8_n16",
                (Format::Nf4, 1) => "gemv_tc_nf4_n8",
                (Format::Nf4, _) => "gemv_tc_nf4_n16",
            },
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
// SAFETY: as above, for the v3 statistics kernel's parameters.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::SoftmaxStatsV3Params> {}
// SAFETY: as above, for the v2 verification kernels' parameters.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::VerifyV2Params> {}
// SAFETY: as above, for the verification kernel's parameters.
unsafe impl DeviceRepr for ByValue<VerifyParams> {}
// SAFETY: as above, for the γ decision kernel's parameters.
unsafe impl DeviceRepr for ByValue<GammaMlpParams> {}
// SAFETY: as above, for the v2 GEMV kernels' parameters.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::GemvV2Params> {}
// SAFETY: as above, for the GEMV kernels' parameters.
unsafe impl DeviceRepr for ByValue<GemvParams> {}
// SAFETY: as above, for the forward-pass kernels' parameters.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::EmbedParams> {}
// SAFETY: as above.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::RmsNormParams> {}
// SAFETY: as above.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::QkvRopeParams> {}
// SAFETY: as above.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::AttentionParams> {}
// SAFETY: as above.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::AttentionV2Params> {}
// SAFETY: as above.
unsafe impl DeviceRepr for ByValue<speckv_kernels::params::SiluMulParams> {}

/// The device address of an optional buffer on `st` (0, a null pointer, for none) and the guard
/// that orders the launch after the buffer's earlier uses; keep the guard until the launch is made.
pub(crate) fn ptr_or_null<'a, T>(
    s: Option<&'a cudarc::driver::CudaSlice<T>>,
    st: &'a Arc<CudaStream>,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    use cudarc::driver::DevicePtr;
    match s {
        Some(x) => {
            let (p, g) = x.device_ptr(st);
            (p, Some(g))
        }
        None => (0, None),
    }
}

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

/// Block size of `softmax_stats` v1 launches.
pub const STATS_BLOCK: u32 = crate::plan::STATS_V1_BLOCK;
/// Block size of `verify` v1 launches.
pub const VERIFY_BLOCK: u32 = crate::plan::VERIFY_V1_BLOCK;

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
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        // Every allocation, copy and launch of this backend is ordered on this one stream, so
        // cudarc's per-buffer events are not needed — and inside a capture they would record into
        // the graph and wait on events from outside it.
        // SAFETY: no other stream touches this context's buffers (the backend owns the context
        // and hands out only `stream`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
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

    /// L2 cache size of the device in bytes.
    pub fn l2_bytes(&self) -> Result<usize> {
        Ok(self
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
            .max(0) as usize)
    }

    /// Mean time of one call of `launch` with a cold L2: before every timed call a buffer of twice
    /// the L2 is zeroed (not timed), so nothing the call reads is still cached; CUDA events bracket
    /// only the call. One untimed warm-up call first (module load, first-touch).
    pub fn time_cold(
        &self,
        iters: u32,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<Duration> {
        let flush_bytes = (2 * self.l2_bytes()?).max(64 << 20);
        let mut flush = self.stream.alloc_zeros::<u8>(flush_bytes)?;
        launch()?;
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let n = iters.max(1) as usize;
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            self.stream.memset_zeros(&mut flush)?;
            let start = self.ctx.new_event(Some(flags))?;
            let end = self.ctx.new_event(Some(flags))?;
            start.record(&self.stream)?;
            launch()?;
            end.record(&self.stream)?;
            events.push((start, end));
        }
        self.stream.synchronize()?;
        let mut ms = 0f64;
        for (s, e) in &events {
            ms += s.elapsed_ms(e)? as f64;
        }
        Ok(Duration::from_secs_f64(ms / 1e3 / n as f64))
    }

    /// Device-to-device copy bandwidth (read + write bytes per second) of `bytes` bytes with a
    /// cold L2, the ceiling the memory-bound kernels are compared with.
    pub fn copy_bandwidth(&self, bytes: usize, iters: u32) -> Result<f64> {
        let src = self.stream.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes)?;
        let t = self.time_cold(iters, || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
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

//! Quantised matrices resident on the device and the fused dequantise + GEMV launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::gemv::PathV2;
use speckv_kernels::params::{GemvParams, GemvV2Params};

use super::{ByValue, CudaBackend, KernelFn};
use crate::error::{Error, Result};
use crate::plan::plan_fused;
use crate::weights::gemv::Fusion;
use crate::weights::quant::{Format, QMatrix};

/// Block size of GEMV launches (four output rows per block, one warp each).
pub const GEMV_BLOCK: u32 = 128;

pub use crate::plan::GemvVersion;

/// The plan of `version`'s launch for `d` at `m` rows.
fn plan_for(
    version: GemvVersion,
    d: &DeviceMatrix,
    m: usize,
    sm_count: u32,
) -> (crate::plan::LaunchPlan, speckv_kernels::gemv::GemvPlanV2) {
    version.plan(d.format, d.out as u32, d.inp as u32, m as u32, sm_count)
}

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
    /// (out, in).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }
    pub fn format(&self) -> Format {
        self.format
    }
}

/// The byte every synthetic weight and scale is filled with: finite in every regime (f16 0.046,
/// int8 42, NF4 code 2, f32 scales ~1.5e-13), and not zero, so nothing could take a shortcut.
const SYNTHETIC_BYTE: u8 = 0x2a;

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

    /// A matrix of `format` at `out × inp` made on the device (every byte [`SYNTHETIC_BYTE`]): for
    /// timing a model's shapes without its weights, which cannot travel to the GPU machine.
    pub fn synthetic_matrix(&self, format: Format, out: usize, inp: usize) -> Result<DeviceMatrix> {
        let n = out * inp;
        let (wbytes, scales) = match format {
            Format::Fp16 => (2 * n, 0),
            Format::Int8 => (n, out),
            Format::Nf4 => {
                if !n.is_multiple_of(speckv_kernels::params::NF4_BLOCK) {
                    return Err(Error::Unsupported(format!(
                        "an NF4 matrix of {out}×{inp}: whole 64-element blocks are needed"
                    )));
                }
                (n / 2, n / speckv_kernels::params::NF4_BLOCK)
            }
        };
        let st = &self.stream;
        let mut weight = st.alloc_zeros::<u8>(wbytes)?;
        let mut sc = if scales > 0 {
            Some(st.alloc_zeros::<f32>(scales)?)
        } else {
            None
        };
        {
            let (wp, _g) = weight.device_ptr_mut(st);
            // SAFETY: `wp` is a live allocation of `wbytes` bytes, filled on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(wp, SYNTHETIC_BYTE, wbytes, st.cu_stream())
            }?;
        }
        if let Some(s) = sc.as_mut() {
            let (sp, _g) = s.device_ptr_mut(st);
            // SAFETY: `sp` is a live allocation of `scales` f32, filled on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    sp,
                    SYNTHETIC_BYTE,
                    4 * scales,
                    st.cu_stream(),
                )
            }?;
        }
        Ok(DeviceMatrix {
            format,
            out,
            inp,
            weight,
            scales: sc,
            bytes: wbytes + 4 * scales,
        })
    }

    /// y `[m, out]` = x · Wᵀ on device buffers by the v4 plan's kernel (what the forward pass
    /// launches), with `ws` as its workspace ([`CudaBackend::gemv_workspace_bytes`], zeroed once:
    /// every launch leaves it zeroed), and `fusion`'s norm in front and add into y.
    pub fn launch_gemv_into(
        &self,
        d: &DeviceMatrix,
        x: &cudarc::driver::CudaSlice<f32>,
        y: &mut cudarc::driver::CudaSlice<f32>,
        m: usize,
        ws: &mut cudarc::driver::CudaSlice<u8>,
        fusion: Fusion<&cudarc::driver::CudaSlice<f32>>,
    ) -> Result<()> {
        self.launch_gemv_planned(d, x, y, m, ws, GemvVersion::V4, fusion)
    }

    /// Workspace bytes the v4 GEMV of `d` (what [`CudaBackend::launch_gemv_into`] launches) needs
    /// at `m` rows.
    pub fn gemv_workspace_bytes(&self, d: &DeviceMatrix, m: usize) -> usize {
        plan_for(GemvVersion::V4, d, m, self.sm_count)
            .1
            .workspace_bytes
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
        let (sc, _g1) = super::ptr_or_null(d.scales.as_ref(), st);
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
            flags: 0,
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

    /// The v2, v3 or v4 GEMV (the plan's kernel) with `ws` as its workspace (zeroed, the plan's
    /// size), and `fusion`'s norm and add.
    #[allow(clippy::too_many_arguments)]
    fn launch_gemv_planned(
        &self,
        d: &DeviceMatrix,
        x: &cudarc::driver::CudaSlice<f32>,
        y: &mut cudarc::driver::CudaSlice<f32>,
        m: usize,
        ws: &mut cudarc::driver::CudaSlice<u8>,
        version: GemvVersion,
        fusion: Fusion<&cudarc::driver::CudaSlice<f32>>,
    ) -> Result<()> {
        let width = fusion.x_width(d.inp);
        if m == 0 || m > crate::weights::gemv::MAX_M || x.len() < m * width || y.len() < m * d.out {
            return Err(Error::Other(format!(
                "gemv: M = {m} or buffer sizes do not fit the {}×{} matrix",
                d.out, d.inp
            )));
        }
        let read = fusion.read()?;
        let norm_len = fusion.norm.map(|(g, eps)| (g.len(), eps));
        let (f, sms) = (d.format, self.sm_count);
        let (_, plan) = plan_fused(version, f, d.out, d.inp, m, sms, read, norm_len)?;
        if ws.len() < plan.workspace_bytes {
            return Err(Error::Other(
                "gemv: workspace smaller than the plan's".to_string(),
            ));
        }
        let st = &self.stream;
        let (w, _g0) = d.weight.device_ptr(st);
        let (sc, _g1) = super::ptr_or_null(d.scales.as_ref(), st);
        let (xp, _g2) = x.device_ptr(st);
        let (yp, _g3) = y.device_ptr_mut(st);
        let (wsp, _g4) = ws.device_ptr_mut(st);
        let (np, _g5) = super::ptr_or_null(fusion.norm.map(|(g, _)| g), st);
        let params = GemvV2Params {
            base: GemvParams {
                weight: w as *const u8,
                scales: sc as *const f32,
                x: xp as *const f32,
                y: yp as *mut f32,
                out_features: d.out as u32,
                in_features: d.inp as u32,
                m: m as u32,
                flags: fusion.flags(),
            },
            workspace: wsp as *mut u8,
            ksplits: plan.ksplits,
            kt: plan.kt,
            norm: np as *const f32,
            eps: fusion.norm.map_or(0.0, |(_, e)| e),
            _pad: 0,
        };
        let f = match plan.path {
            PathV2::Cores { mt } => KernelFn::GemvV2(d.format, mt),
            PathV2::Tensor { nt } => KernelFn::GemvTc(d.format, nt),
            PathV2::Stream => KernelFn::GemvV3(d.format, read),
            PathV2::Integer => match d.format {
                Format::Int8 => KernelFn::GemvV4Int8(read),
                Format::Nf4 => KernelFn::GemvV4Nf4(read),
                Format::Fp16 => {
                    return Err(Error::Other(
                        "gemv v4: FP16 has no integer kernel".to_string(),
                    ))
                }
            },
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (plan.block, 1, 1),
            shared_mem_bytes: plan.shared_bytes as u32,
        };
        let arg = ByValue(params);
        let mut b = st.launch_builder(self.function(f));
        b.arg(&arg);
        // SAFETY: sizes checked above against the uploaded matrix (cudarc allocations are 256-byte
        // aligned, so the 16-byte weight loads and v3's 16-byte x loads are aligned); the
        // workspace is the plan's and zeroed; the buffers outlive the launch.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn gemv_workspace(
        &self,
        d: &DeviceMatrix,
        m: usize,
        version: GemvVersion,
    ) -> Result<cudarc::driver::CudaSlice<u8>> {
        let (_, plan) = plan_for(version, d, m, self.sm_count);
        Ok(self
            .stream
            .alloc_zeros::<u8>(plan.workspace_bytes.max(16))?)
    }

    /// y `[m, out]` = x · Wᵀ for host x by the v2 kernels (upload, launch, download).
    pub fn gemv(&self, d: &DeviceMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.gemv_version(d, x, m, GemvVersion::V2)
    }

    /// y `[m, out]` = x · Wᵀ for host x by the v3 plan.
    pub fn gemv_v3(&self, d: &DeviceMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.gemv_version(d, x, m, GemvVersion::V3)
    }

    /// y `[m, out]` = x · Wᵀ for host x by the v4 plan (the forward pass's kernels).
    pub fn gemv_v4(&self, d: &DeviceMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.gemv_version(d, x, m, GemvVersion::V4)
    }

    /// y `[m, out]` = x · Wᵀ by the v1 kernels (one warp per row), kept for comparison.
    pub fn gemv_v1(&self, d: &DeviceMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.gemv_version(d, x, m, GemvVersion::V1)
    }

    fn gemv_version(
        &self,
        d: &DeviceMatrix,
        x: &[f32],
        m: usize,
        version: GemvVersion,
    ) -> Result<Vec<f32>> {
        if x.len() != m * d.inp {
            return Err(Error::Length {
                what: "x",
                got: x.len(),
                expected: m * d.inp,
            });
        }
        let dx = self.stream.clone_htod(x)?;
        let mut dy = self.stream.alloc_zeros::<f32>(m * d.out)?;
        match version {
            GemvVersion::V1 => self.launch_gemv(d, &dx, &mut dy, m)?,
            GemvVersion::V2 | GemvVersion::V3 | GemvVersion::V4 => {
                let mut ws = self.gemv_workspace(d, m, version)?;
                self.launch_gemv_planned(d, &dx, &mut dy, m, &mut ws, version, Fusion::NONE)?;
            }
        }
        Ok(self.stream.clone_dtoh(&dy)?)
    }

    /// y0 `[m, out]` updated as `fusion` says (x normalised by its gains first, the product added
    /// to y0 or replacing it) by `version`'s plan, for host buffers: the forward pass's fused
    /// launches, checked against the emulator's.
    pub fn gemv_fused(
        &self,
        d: &DeviceMatrix,
        x: &[f32],
        y0: &[f32],
        m: usize,
        version: GemvVersion,
        fusion: Fusion<&[f32]>,
    ) -> Result<Vec<f32>> {
        if x.len() != m * fusion.x_width(d.inp) || y0.len() != m * d.out {
            return Err(Error::Other(format!(
                "gemv: x of {} and y of {} do not fit M = {m} and the {}×{} matrix",
                x.len(),
                y0.len(),
                d.out,
                d.inp
            )));
        }
        let dx = self.stream.clone_htod(x)?;
        let mut dy = self.stream.clone_htod(y0)?;
        let gains = match fusion.norm {
            Some((g, _)) => Some(self.stream.clone_htod(g)?),
            None => None,
        };
        let on_device = Fusion {
            norm: gains.as_ref().zip(fusion.norm.map(|(_, e)| e)),
            silu: fusion.silu,
            accumulate: fusion.accumulate,
        };
        let mut ws = self.gemv_workspace(d, m, version)?;
        self.launch_gemv_planned(d, &dx, &mut dy, m, &mut ws, version, on_device)?;
        Ok(self.stream.clone_dtoh(&dy)?)
    }

    /// Mean time of one GEMV launch with device-resident weights and activations (CUDA events).
    pub fn time_gemv(
        &self,
        d: &DeviceMatrix,
        m: usize,
        iters: u32,
        version: GemvVersion,
    ) -> Result<Duration> {
        let dx = self.stream.alloc_zeros::<f32>(m * d.inp)?;
        let mut dy = self.stream.alloc_zeros::<f32>(m * d.out)?;
        match version {
            GemvVersion::V1 => self.time_cold(iters, || self.launch_gemv(d, &dx, &mut dy, m)),
            GemvVersion::V2 | GemvVersion::V3 | GemvVersion::V4 => {
                let mut ws = self.gemv_workspace(d, m, version)?;
                self.time_cold(iters, || {
                    self.launch_gemv_planned(d, &dx, &mut dy, m, &mut ws, version, Fusion::NONE)
                })
            }
        }
    }
}

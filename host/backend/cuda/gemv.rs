//! Quantised matrices resident on the device and the fused dequantise + GEMV launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::GemvParams;

use super::{ByValue, CudaBackend, KernelFn};
use crate::error::{Error, Result};
use crate::weights::quant::{Format, QMatrix};

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

//! The γ decision on the device: the controller's weights uploaded once, `gamma_mlp` launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::{FeatureAccum, MlpWeights};

use super::{ByValue, CudaBackend, KernelFn};
use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};

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
                flags_out: std::ptr::null_mut(),
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

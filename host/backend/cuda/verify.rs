//! Batched verification on the device: upload, launch, download, and timed launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::verify as verify_kernel;

use super::{ByValue, CudaBackend, KernelFn, VERIFY_BLOCK};
use crate::error::Result;
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};

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

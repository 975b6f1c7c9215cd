//! Batched verification on the device: upload, launch, download, and timed launches.

use std::time::Duration;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::verify as verify_kernel;

use super::{ByValue, CudaBackend, KernelFn, KernelVersion, VERIFY_BLOCK};
use crate::backend::verify_v2::{launches, Step};
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
        let (dt, _g5) = super::ptr_or_null(d.d_temp.as_ref(), st);
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

    /// The v2 launch sequence on uploaded buffers (`ws` zeroed, sized by the plan).
    fn launch_verify_v2(
        &self,
        v: &VerifyBatch<'_>,
        d: &mut VerifyBuffers,
        plan: &speckv_kernels::verify::FullPlanV2,
        ws: &mut cudarc::driver::CudaSlice<u8>,
    ) -> Result<()> {
        let st = &self.stream;
        let (t, _g0) = d.target.device_ptr(st);
        let (dr, _g1) = d.draft.device_ptr(st);
        let (tok, _g2) = d.tokens.device_ptr(st);
        let (gam, _g3) = d.gammas.device_ptr(st);
        let (tt, _g4) = d.t_temp.device_ptr(st);
        let (dt, _g5) = super::ptr_or_null(d.d_temp.as_ref(), st);
        let (acc, _g6) = d.accepted.device_ptr_mut(st);
        let (emi, _g7) = d.emitted.device_ptr_mut(st);
        let (cnt, _g8) = d.count.device_ptr_mut(st);
        let (rat, _g9) = d.ratios.device_ptr_mut(st);
        let (cf, _g10) = d.counterfactual.device_ptr_mut(st);
        let (fl, _g11) = d.flags.device_ptr_mut(st);
        let (w, _g12) = ws.device_ptr_mut(st);
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
        for l in launches(&params, v.target.dtype(), plan, w) {
            let cfg = LaunchConfig {
                grid_dim: (l.grid, 1, 1),
                block_dim: (l.block, 1, 1),
                shared_mem_bytes: l.shared as u32,
            };
            let mut b = self.stream.launch_builder(self.function(l.f));
            // SAFETY (both arms): every buffer was uploaded or allocated for a batch whose shapes
            // `validate` checked, the workspace for this plan (zeroed); they outlive the launch.
            match l.step {
                Step::DraftStats(p) => {
                    let arg = ByValue(p);
                    b.arg(&arg);
                    unsafe { b.launch(cfg) }?;
                }
                Step::Verify(_, p) => {
                    let arg = ByValue(p);
                    b.arg(&arg);
                    unsafe { b.launch(cfg) }?;
                }
            }
        }
        Ok(())
    }

    fn verify_plan(&self, v: &VerifyBatch<'_>) -> speckv_kernels::verify::FullPlanV2 {
        speckv_kernels::verify::full_plan_v2(
            v.batch as u32,
            v.gamma_max as u32,
            v.vocab as u32,
            v.target.dtype().size(),
            self.sm_count,
        )
    }

    /// Batched verification of host inputs by the v2 kernels (uploads, launches, downloads).
    pub fn verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        self.verify_version(v, KernelVersion::V2)
    }

    /// Batched verification by the v1 kernel (one block per sequence), kept for comparison.
    pub fn verify_v1(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        self.verify_version(v, KernelVersion::V1)
    }

    fn verify_version(&self, v: &VerifyBatch<'_>, version: KernelVersion) -> Result<VerifyOutput> {
        v.validate()?;
        let mut d = self.upload_verify(v)?;
        match version {
            KernelVersion::V1 => self.launch_verify(v, &mut d)?,
            KernelVersion::V2 => {
                let plan = self.verify_plan(v);
                let mut ws = self.stream.alloc_zeros::<u8>(plan.bytes.max(16))?;
                self.launch_verify_v2(v, &mut d, &plan, &mut ws)?;
            }
        }
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

    /// Mean time of one verification (v1: one launch; v2: its launch sequence) on
    /// device-resident inputs (CUDA events).
    pub fn time_verify(
        &self,
        v: &VerifyBatch<'_>,
        iters: u32,
        version: KernelVersion,
    ) -> Result<Duration> {
        v.validate()?;
        let mut d = self.upload_verify(v)?;
        match version {
            KernelVersion::V1 => self.time_cold(iters, || self.launch_verify(v, &mut d)),
            KernelVersion::V2 => {
                let plan = self.verify_plan(v);
                let mut ws = self.stream.alloc_zeros::<u8>(plan.bytes.max(16))?;
                self.time_cold(iters, || self.launch_verify_v2(v, &mut d, &plan, &mut ws))
            }
        }
    }
}

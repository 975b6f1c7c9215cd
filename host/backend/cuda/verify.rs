//! Batched verification on the device: upload, launch, download, and timed launches.

use std::time::Duration;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::verify as verify_kernel;

use super::{ByValue, CudaBackend, KernelFn, KernelVersion, VERIFY_BLOCK};
use crate::backend::verify_v2::{launches, Step};
use crate::error::{Error, Result};
use crate::stats::LogitsData;
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs, VerifyStep};

/// Device copies of one verification batch's inputs and outputs (the target and draft rows
/// apart: uploaded, or resident where a forward pass left them).
struct VerifyBuffers {
    tokens: CudaSlice<i32>,
    gammas: CudaSlice<i32>,
    t_temp: CudaSlice<f32>,
    d_temp: Option<CudaSlice<f32>>,
    accepted: CudaSlice<i32>,
    emitted: CudaSlice<i32>,
    count: CudaSlice<i32>,
    ratios: CudaSlice<f32>,
    counterfactual: CudaSlice<i32>,
    flags: CudaSlice<u32>,
}

/// A sequence's verification buffers kept across steps, for rows a forward pass leaves on the
/// device.
pub struct ResidentVerify {
    bufs: VerifyBuffers,
    ws: CudaSlice<u8>,
    /// The draft's rows, uploaded when sampling (allocated on first use).
    draft: Option<CudaSlice<f32>>,
    batch: usize,
    gamma_max: usize,
    vocab: usize,
}

/// Uploaded target and draft rows.
struct Rows {
    target: CudaSlice<u8>,
    draft: CudaSlice<u8>,
}

impl CudaBackend {
    fn upload_verify(&self, v: &VerifyBatch<'_>) -> Result<(Rows, VerifyBuffers)> {
        let st = &self.stream;
        let draft_bytes: &[u8] = match v.draft {
            DraftDist::Logits { data, .. } => data.bytes(),
            DraftDist::Probs(p) => bytemuck::cast_slice(p),
        };
        let rows = Rows {
            target: st.clone_htod(v.target.bytes())?,
            draft: st.clone_htod(draft_bytes)?,
        };
        Ok((rows, self.verify_buffers(v)?))
    }

    /// Buffers for the non-row inputs of `v` (uploaded) and its outputs (zeroed).
    fn verify_buffers(&self, v: &VerifyBatch<'_>) -> Result<VerifyBuffers> {
        let st = &self.stream;
        let d_temp = match v.draft {
            DraftDist::Logits { temperature, .. } => Some(temperature),
            DraftDist::Probs(_) => None,
        };
        let w = v.gamma_max + 1;
        Ok(VerifyBuffers {
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
    fn launch_verify(&self, v: &VerifyBatch<'_>, r: &Rows, d: &mut VerifyBuffers) -> Result<()> {
        let st = &self.stream;
        let (t, _g0) = r.target.device_ptr(st);
        let (dr, _g1) = r.draft.device_ptr(st);
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
        r: &Rows,
        d: &mut VerifyBuffers,
        plan: &speckv_kernels::verify::FullPlanV2,
        ws: &mut CudaSlice<u8>,
    ) -> Result<()> {
        let st = &self.stream;
        let (t, _g0) = r.target.device_ptr(st);
        let (dr, _g1) = r.draft.device_ptr(st);
        // SAFETY: forwarded: the rows were uploaded for `v`, whose shapes `validate` checked.
        unsafe { self.launch_verify_v2_at(v, t, dr, d, plan, ws) }
    }

    /// The v2 launch sequence with the target and draft rows at device addresses `t` and `dr`.
    ///
    /// # Safety
    /// `t` must address `v`'s target rows and `dr` its draft rows (or, in greedy verification,
    /// which never reads them, any live buffer), alive until the launches complete; `d` must hold
    /// `v`'s other inputs and outputs and `ws` the plan's workspace, zeroed.
    unsafe fn launch_verify_v2_at(
        &self,
        v: &VerifyBatch<'_>,
        t: u64,
        dr: u64,
        d: &mut VerifyBuffers,
        plan: &speckv_kernels::verify::FullPlanV2,
        ws: &mut CudaSlice<u8>,
    ) -> Result<()> {
        let st = &self.stream;
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
        let (r, mut d) = self.upload_verify(v)?;
        match version {
            KernelVersion::V1 => self.launch_verify(v, &r, &mut d)?,
            KernelVersion::V2 => {
                let plan = self.verify_plan(v);
                let mut ws = self.stream.alloc_zeros::<u8>(plan.bytes.max(16))?;
                self.launch_verify_v2(v, &r, &mut d, &plan, &mut ws)?;
            }
        }
        let mut out = VerifyOutput::new(v.batch, v.gamma_max);
        self.read_verdict(&d, &mut out)?;
        Ok(out)
    }

    /// Downloads the outputs into `out` (sized for the batch).
    fn read_verdict(&self, d: &VerifyBuffers, out: &mut VerifyOutput) -> Result<()> {
        let st = &self.stream;
        let w = out.gamma_max + 1;
        st.memcpy_dtoh(&d.accepted.slice(..out.batch), &mut out.accepted)?;
        st.memcpy_dtoh(&d.emitted.slice(..out.batch * w), &mut out.emitted)?;
        st.memcpy_dtoh(&d.count.slice(..out.batch), &mut out.emitted_count)?;
        if out.gamma_max > 0 {
            let n = out.batch * out.gamma_max;
            st.memcpy_dtoh(&d.ratios.slice(..n), &mut out.ratios)?;
        }
        st.memcpy_dtoh(
            &d.counterfactual.slice(..out.batch * w),
            &mut out.counterfactual,
        )?;
        st.memcpy_dtoh(&d.flags.slice(..out.batch), &mut out.flags)?;
        Ok(())
    }

    /// Buffers for verifying steps of up to `batch` sequences and `gamma_max` drafts each over
    /// rows that stay on the device ([`CudaBackend::verify_resident`],
    /// [`CudaBackend::verify_resident_batch`]).
    pub fn resident_verify(
        &self,
        batch: usize,
        gamma_max: usize,
        vocab: usize,
    ) -> Result<ResidentVerify> {
        // A step of `batch` sequences at γmax (at least 1: no zero-sized buffers) sizes every
        // buffer and the workspace; `verify_resident_batch` checks each step against it.
        let (batch, g) = (batch.max(1), gamma_max.max(1));
        let tokens = vec![0i32; batch * g];
        let (gammas, temps) = (vec![0i32; batch], vec![0f32; batch]);
        let v = VerifyBatch::resident(vocab, g, &tokens, &gammas, &temps);
        let plan = self.verify_plan(&v);
        Ok(ResidentVerify {
            bufs: self.verify_buffers(&v)?,
            ws: self.stream.alloc_zeros::<u8>(plan.bytes.max(16))?,
            draft: None,
            batch,
            gamma_max,
            vocab,
        })
    }

    /// Verifies one sequence's γ drafts against rows `0..=γ` of `target` (f32 logits that a
    /// forward pass left on the device) by the v2 kernels. Uploads the drafted tokens, γ and the
    /// temperature (and the draft's rows when sampling), reads back only the verdict.
    pub fn verify_resident(
        &self,
        r: &mut ResidentVerify,
        target: &CudaSlice<f32>,
        step: &VerifyStep<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()> {
        let g = step.draft_tokens.len();
        step.check_positions(g + 1)?;
        let (temps, gammas) = ([step.temperature], [g as i32]);
        let mut v = step.device_batch(r.vocab, &temps, &gammas);
        if let Some(q) = step.draft_rows {
            v.draft = DraftDist::Logits {
                data: LogitsData::F32(q.get(..g * r.vocab).unwrap_or(q)),
                temperature: &temps,
            };
        }
        self.verify_resident_batch(r, target, &v, out)
    }

    /// Verifies a batch against `target`, `[batch, γmax + 1, vocab]` f32 logits a forward pass
    /// left on the device (`v.target` is not read: it may be empty), by the v2 kernels. Uploads
    /// the drafted tokens, the γ and temperatures per sequence (and the draft's rows, `v.draft`,
    /// when sampling), reads back only the verdict.
    pub fn verify_resident_batch(
        &self,
        r: &mut ResidentVerify,
        target: &CudaSlice<f32>,
        v: &VerifyBatch<'_>,
        out: &mut VerifyOutput,
    ) -> Result<()> {
        let (b, g, vocab) = (v.batch, v.gamma_max, r.vocab);
        if v.vocab != vocab || b > r.batch || g > r.gamma_max || target.len() < b * (g + 1) * vocab
        {
            return Err(Error::Other(format!(
                "verification of {b} sequences of up to {g} drafts (vocabulary {}) over {} logits: \
                 the buffers hold {} sequences of γ ≤ {}, vocabulary {vocab}",
                v.vocab,
                target.len(),
                r.batch,
                r.gamma_max
            )));
        }
        // Its target rows are on the device (their number checked just above).
        v.validate_device()?;
        let st = &self.stream;
        if b * g > 0 {
            st.memcpy_htod(v.draft_tokens, &mut r.bufs.tokens.slice_mut(..b * g))?;
        }
        st.memcpy_htod(v.gammas, &mut r.bufs.gammas.slice_mut(..b))?;
        st.memcpy_htod(v.target_temperature, &mut r.bufs.t_temp.slice_mut(..b))?;
        let (rows, d_temps) = match v.draft {
            DraftDist::Logits { data, temperature } => (data, temperature),
            DraftDist::Probs(_) => {
                return Err(Error::Other(
                    "device-resident verification takes the draft's logits, not probabilities"
                        .into(),
                ))
            }
        };
        if let Some(dt) = r.bufs.d_temp.as_mut() {
            st.memcpy_htod(d_temps, &mut dt.slice_mut(..b))?;
        }
        let n = b * g * vocab;
        let sampled = match rows {
            LogitsData::F32(q) if q.len() >= n && n > 0 => {
                if r.draft.is_none() {
                    let cap = r.batch * r.gamma_max.max(1) * vocab;
                    r.draft = Some(st.alloc_zeros::<f32>(cap)?);
                }
                if let Some(d) = r.draft.as_mut() {
                    st.memcpy_htod(&q[..n], &mut d.slice_mut(..n))?;
                }
                true
            }
            LogitsData::F32(_) => false,
            _ => {
                return Err(Error::Other(
                    "device-resident verification takes the draft's rows as f32".into(),
                ))
            }
        };
        // The plan of this step; its workspace fits in the one allocated for the largest.
        let plan = self.verify_plan(v);
        if plan.bytes > r.ws.len() {
            return Err(Error::Other(format!(
                "verify's workspace of {} bytes is below the plan's {}",
                r.ws.len(),
                plan.bytes
            )));
        }
        let (t, _g0) = target.device_ptr(st);
        let (dr, _g1) = match (sampled, r.draft.as_ref()) {
            (true, Some(d)) => d.device_ptr(st),
            // Greedy verification never reads the draft's rows: the target's stand in.
            _ => target.device_ptr(st),
        };
        // SAFETY: `target` holds b · (γ + 1) rows (checked above) and lives to the end of this
        // function, after the synchronising downloads; the draft rows, when read, were uploaded
        // just above; `r.bufs` was allocated for at least b sequences of γmax ≥ γ and `r.ws` for
        // a plan at least this large, its counters left zero by every launch sequence.
        unsafe { self.launch_verify_v2_at(v, t, dr, &mut r.bufs, &plan, &mut r.ws) }?;
        out.reset(b, g);
        self.read_verdict(&r.bufs, out)
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
        let (r, mut d) = self.upload_verify(v)?;
        match version {
            KernelVersion::V1 => self.time_cold(iters, || self.launch_verify(v, &r, &mut d)),
            KernelVersion::V2 => {
                let plan = self.verify_plan(v);
                let mut ws = self.stream.alloc_zeros::<u8>(plan.bytes.max(16))?;
                self.time_cold(iters, || {
                    self.launch_verify_v2(v, &r, &mut d, &plan, &mut ws)
                })
            }
        }
    }
}

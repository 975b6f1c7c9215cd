//! The statistics launches of [`ExternalCuda`] on a caller's buffers: `softmax_stats_v2` (with
//! the per-token stopping rule in its epilogue when asked) and `softmax_stats_v3`'s described rows.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUstream};
use speckv_kernels::params::{
    LockstepScratch, SoftmaxStatsParams, SoftmaxStatsV2Params, SoftmaxStatsV3Params, StopParams,
    LOCKSTEP_MAX_ROWS, STATS_STOP,
};

use super::{check, Current, ExternalCuda};
use crate::backend::cuda::{KernelFn, PodStop};
use crate::error::{Error, Result};
use crate::stats::Dtype;

impl ExternalCuda {
    /// `softmax_stats` v2 (rows split across blocks, planned for this device) on the caller's
    /// buffers described by v1's parameters; the scratch is this context's workspace.
    ///
    /// # Safety
    /// Every address in `p` must be a live device buffer of the size the kernel reads or writes
    /// (docs/kernels.md), in this context.
    pub unsafe fn softmax_stats(
        &self,
        dtype: Dtype,
        p: &SoftmaxStatsParams,
        stream: *mut c_void,
    ) -> Result<()> {
        // SAFETY: forwarded; no stopping rule.
        unsafe { self.softmax_stats_v2(dtype, p, std::ptr::null(), stream) }
    }

    /// [`ExternalCuda::softmax_stats`] with the per-token stopping rule in the kernel's epilogue
    /// (`STATS_STOP`): `stop` holds device addresses (the hazard model's weights, the caller's
    /// `rows` states and γ_b, a counter or null) and the rule's scalars. It is copied into this
    /// context's parameter slot on `stream` only when it differs from the last copy: the costs
    /// change per step, not per draft, so a step's later drafts copy nothing. With `lockstep` the
    /// sequences decide together (`StopParams::lockstep`, through this context's scratch; at most
    /// `LOCKSTEP_MAX_ROWS` rows); `stop.lockstep` is ignored.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats`], and `stop`'s addresses are live device buffers of this
    /// context: one `MlpWeights`, `rows` states and γ_b, one counter or null, `rows` odds scales
    /// or null. The slot and the
    /// scratch are shared by the context's launches, which are ordered on its stream.
    pub unsafe fn softmax_stats_stop(
        &self,
        dtype: Dtype,
        p: &SoftmaxStatsParams,
        stop: &StopParams,
        lockstep: bool,
        stream: *mut c_void,
    ) -> Result<()> {
        if lockstep && p.rows as usize > LOCKSTEP_MAX_ROWS {
            return Err(Error::Other(format!(
                "{} sequences in lockstep: one decision covers at most {LOCKSTEP_MAX_ROWS}",
                p.rows
            )));
        }
        let stop = StopParams {
            lockstep: if lockstep {
                self.lockstep_scratch()? as *mut LockstepScratch
            } else {
                std::ptr::null_mut()
            },
            ..*stop
        };
        let at = self.stop_params(&stop, stream)?;
        // SAFETY: forwarded; `at` holds `stop`, copied on this stream before the launch.
        unsafe { self.softmax_stats_v2(dtype, p, at as *const StopParams, stream) }
    }

    /// The device address of this context's lockstep scratch, allocated zeroed on first use.
    fn lockstep_scratch(&self) -> Result<u64> {
        let mut slot = self
            .lockstep
            .lock()
            .map_err(|_| Error::Other("lockstep scratch lock poisoned".to_string()))?;
        if let Some(buf) = slot.as_ref() {
            return Ok(buf.ptr);
        }
        let zero = [0u8; std::mem::size_of::<LockstepScratch>()];
        let buf = self.upload(&zero)?;
        let at = buf.ptr;
        *slot = Some(buf);
        Ok(at)
    }

    /// The device address of the parameter slot holding `stop` (copied asynchronously on
    /// `stream` when it differs from what the slot holds).
    fn stop_params(&self, stop: &StopParams, stream: *mut c_void) -> Result<u64> {
        let mut slot = self
            .stop_slot
            .lock()
            .map_err(|_| Error::Other("stop parameter lock poisoned".to_string()))?;
        let pod = PodStop(*stop);
        if let Some((buf, held)) = slot.as_ref() {
            if bytemuck::bytes_of(&**held) == bytemuck::bytes_of(&pod) {
                return Ok(buf.ptr);
            }
        }
        let Some((buf, _)) = slot.take() else {
            // The context's first stopping launch: allocated with the parameters in it (no launch
            // can have read the slot yet).
            let buf = self.upload(bytemuck::bytes_of(&pod))?;
            let at = buf.ptr;
            *slot = Some((buf, Box::new(pod)));
            return Ok(at);
        };
        let _cur = Current::push(self.ctx)?;
        // SAFETY: the slot holds `size_of::<StopParams>()` bytes; the copy from pageable host
        // memory is staged before this call returns, and ordered on `stream` after every earlier
        // launch that read the slot.
        check(
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    buf.ptr,
                    bytemuck::bytes_of(&pod).as_ptr() as *const c_void,
                    std::mem::size_of::<StopParams>(),
                    stream as CUstream,
                )
            },
            "cuMemcpyHtoDAsync",
        )?;
        let at = buf.ptr;
        *slot = Some((buf, Box::new(pod)));
        Ok(at)
    }

    /// `softmax_stats` v2 with `stop` (null: none) behind `STATS_STOP`.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats_stop`].
    unsafe fn softmax_stats_v2(
        &self,
        dtype: Dtype,
        p: &SoftmaxStatsParams,
        stop: *const StopParams,
        stream: *mut c_void,
    ) -> Result<()> {
        let (_, plan) = crate::plan::softmax_stats_v2(p.rows, p.vocab, dtype, self.sm_count);
        let counters = (p.rows as usize * 4).next_multiple_of(16);
        let partials = p.rows as usize
            * plan.splits as usize
            * std::mem::size_of::<speckv_kernels::params::StatsState>();
        let ws = self.workspace(counters + partials, stream)?;
        // The workspace is shared by every v2 launch of this context, with layouts that depend on
        // the shapes: zero this launch's counters on the stream first (asynchronous, tiny).
        self.zero_async(ws, counters, stream)?;
        let p2 = SoftmaxStatsV2Params {
            logits: p.logits,
            out: p.out,
            accum: p.accum,
            partials: (ws + counters as u64) as *mut speckv_kernels::params::StatsState,
            counters: ws as *mut u32,
            decision: std::ptr::null(),
            seed: p.seed,
            step: p.step,
            rows: p.rows,
            vocab: p.vocab,
            row_stride: p.row_stride,
            temperature: p.temperature,
            flags: if stop.is_null() {
                p.flags
            } else {
                p.flags | STATS_STOP
            },
            splits: plan.splits,
            chunk_vecs: plan.chunk_vecs,
            temperature_group: 1,
            temperatures: std::ptr::null(),
            stop,
        };
        // SAFETY: forwarded; the scratch is sized for this plan, its counters zero.
        unsafe {
            self.launch(
                KernelFn::SoftmaxStatsV2(dtype),
                plan.grid,
                plan.block,
                plan.shared_bytes,
                stream,
                &p2,
            )
        }
    }

    /// `softmax_stats_v3` on the caller's buffers: `p`'s logits, outputs, accumulators and row
    /// descriptions are the caller's; its scratch fields are ignored — the scratch is this
    /// context's workspace, the plan this device's.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats`]; `p.row_params` holds `p.rows` descriptions in device
    /// memory, and no two accumulating ones name one slot.
    pub unsafe fn softmax_stats_rows(
        &self,
        dtype: Dtype,
        p: &SoftmaxStatsV3Params,
        stream: *mut c_void,
    ) -> Result<()> {
        let (_, plan) = crate::plan::softmax_stats_v3(p.rows, p.vocab, dtype, self.sm_count);
        let counters = (p.rows as usize * 4).next_multiple_of(16);
        let partials = p.rows as usize
            * plan.splits as usize
            * std::mem::size_of::<speckv_kernels::params::StatsState>();
        let ws = self.workspace(counters + partials, stream)?;
        // Shared with every launch of this context: this launch's counters zeroed first.
        self.zero_async(ws, counters, stream)?;
        let p3 = SoftmaxStatsV3Params {
            partials: (ws + counters as u64) as *mut speckv_kernels::params::StatsState,
            counters: ws as *mut u32,
            splits: plan.splits,
            chunk_vecs: plan.chunk_vecs,
            ..*p
        };
        // SAFETY: forwarded; the scratch is sized for this plan, its counters zero.
        unsafe {
            self.launch(
                KernelFn::SoftmaxStatsV3(dtype),
                plan.grid,
                plan.block,
                plan.shared_bytes,
                stream,
                &p3,
            )
        }
    }
}

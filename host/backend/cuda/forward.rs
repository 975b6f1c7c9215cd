//! The forward-pass kernels on a CUDA device: each launch checks its buffers against the shape as
//! the emulated launch does ([`crate::backend::forward`]) and launches what [`crate::plan`] says.
//! Buffers stay on the device; nothing here synchronises with the host.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use speckv_kernels::params::{
    AttentionParams, AttentionV2Params, EmbedParams, QkvRopeParams, RmsNormParams, SiluMulParams,
};

use super::{ByValue, CudaBackend, KernelFn, KernelVersion};
use crate::backend::forward::{check_multiple, Heads, MAX_STEP};
use crate::error::{Error, Result};
use crate::plan::LaunchPlan;

fn config(p: &LaunchPlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (p.grid[0], 1, 1),
        block_dim: (p.block[0], 1, 1),
        shared_mem_bytes: p.shared_bytes as u32,
    }
}

/// At least `need` elements in a device buffer.
fn room<T>(what: &'static str, s: &CudaSlice<T>, need: usize) -> Result<()> {
    if s.len() < need {
        return Err(Error::Length {
            what,
            got: s.len(),
            expected: need,
        });
    }
    Ok(())
}

fn step(m: usize) -> Result<()> {
    if m == 0 || m > MAX_STEP {
        return Err(Error::Other(format!(
            "{m} positions in one step: 1 to {MAX_STEP} are supported"
        )));
    }
    Ok(())
}

/// The caches of `heads`' layout hold every sequence's capacity, the length words are there, and
/// `m` positions per sequence fit one step. Returns the rows of the step.
fn check_cache(cache: &CacheRefs<'_>, heads: Heads, m: usize) -> Result<usize> {
    let seqs = cache.seqs;
    if seqs == 0 {
        return Err(Error::Empty { what: "sequences" });
    }
    room("k cache", cache.k, seqs * cache.capacity * heads.kv_width())?;
    room("v cache", cache.v, seqs * cache.capacity * heads.kv_width())?;
    room("cache lengths", cache.len, seqs)?;
    step(m)?;
    step(seqs * m)?;
    Ok(seqs * m)
}

/// The device-side KV cache of one layer and where a step writes in it: `seqs` sequences of
/// `capacity` rows each, one after another.
pub struct CacheRefs<'a> {
    pub k: &'a mut CudaSlice<u16>,
    pub v: &'a mut CudaSlice<u16>,
    /// `seqs` u32: each sequence's length before the step.
    pub len: &'a CudaSlice<u32>,
    pub capacity: usize,
    pub seqs: usize,
}

impl CudaBackend {
    /// Launches `f` with its parameter struct by value on the backend's stream, as `plan` says.
    ///
    /// # Safety
    /// `params` must satisfy `f`'s contract for that launch: buffers of the sizes and alignment it
    /// documents, alive until the stream has passed the launch.
    unsafe fn launch_by_value<P>(&self, f: KernelFn, params: P, plan: &LaunchPlan) -> Result<()>
    where
        ByValue<P>: cudarc::driver::DeviceRepr,
    {
        let arg = ByValue(params);
        let mut b = self.stream.launch_builder(self.function(f));
        b.arg(&arg);
        b.launch(config(plan))?;
        Ok(())
    }

    /// x `[m, hidden]` = rows `tokens[..m]` of the f16 table (`vocab × hidden`).
    pub fn launch_embed(
        &self,
        table: &CudaSlice<u16>,
        tokens: &CudaSlice<u32>,
        x: &mut CudaSlice<f32>,
        hidden: usize,
        m: usize,
    ) -> Result<()> {
        check_multiple("hidden", hidden, 8)?;
        step(m)?;
        room("tokens", tokens, m)?;
        room("x", x, m * hidden)?;
        let vocab = table.len() / hidden;
        let st = &self.stream;
        let (tp, _g0) = table.device_ptr(st);
        let (kp, _g1) = tokens.device_ptr(st);
        let (xp, _g2) = x.device_ptr_mut(st);
        let p = EmbedParams {
            table: tp as *const u16,
            tokens: kp as *const u32,
            x: xp as *mut f32,
            hidden: hidden as u32,
            vocab: vocab as u32,
            m: m as u32,
            _pad: 0,
        };
        let plan = crate::plan::embed(m as u32, self.sm_count);
        // SAFETY: the table holds vocab × hidden f16 (vocab from its length), tokens m, x m ·
        // hidden f32; cudarc allocations are 256-byte aligned; the buffers outlive the launch.
        unsafe { self.launch_by_value(KernelFn::Embed, p, &plan) }
    }

    /// RMSNorm of `rows` rows of x after adding `residual` (when given): x is updated in place.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        hidden: usize,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        check_multiple("hidden", hidden, 4)?;
        step(rows)?;
        room("x", x, rows * hidden)?;
        room("out", out, rows * hidden)?;
        room("weight", weight, hidden)?;
        if let Some(r) = residual {
            room("residual", r, rows * hidden)?;
        }
        let st = &self.stream;
        let (xp, _g0) = x.device_ptr_mut(st);
        let (rp, _g1) = super::ptr_or_null(residual, st);
        let (wp, _g2) = weight.device_ptr(st);
        let (op, _g3) = out.device_ptr_mut(st);
        let p = RmsNormParams {
            x: xp as *mut f32,
            residual: rp as *const f32,
            weight: wp as *const f32,
            out: op as *mut f32,
            hidden: hidden as u32,
            rows: rows as u32,
            eps,
            _pad: 0,
        };
        let plan = crate::plan::rms_norm(rows as u32, crate::plan::RMS_NORM_BLOCK, self.sm_count);
        // SAFETY: sizes checked above; separate allocations, 256-byte aligned; hidden a multiple
        // of 4; the buffers outlive the launch.
        unsafe { self.launch_by_value(KernelFn::RmsNorm, p, &plan) }
    }

    /// Bias + rotary embedding of `m` rows per sequence of the fused projection (`seqs · m` rows,
    /// sequence by sequence); q out, k / v into each sequence's cache at its device-resident
    /// length. `rope` is `[positions, head_dim / 2]` (cos, sin) flattened.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_qkv_rope(
        &self,
        qkv: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        rope: &CudaSlice<f32>,
        q: &mut CudaSlice<f32>,
        cache: CacheRefs<'_>,
        heads: Heads,
        neox: bool,
        m: usize,
    ) -> Result<()> {
        heads.check()?;
        let rows = check_cache(&cache, heads, m)?;
        room("qkv", qkv, rows * heads.qkv_width())?;
        room("q", q, rows * heads.q_width())?;
        if let Some(b) = bias {
            room("qkv bias", b, heads.qkv_width())?;
        }
        let st = &self.stream;
        let (ap, _g0) = qkv.device_ptr(st);
        let (bp, _g1) = super::ptr_or_null(bias, st);
        let (rp, _g2) = rope.device_ptr(st);
        let (qp, _g3) = q.device_ptr_mut(st);
        let (kp, _g4) = cache.k.device_ptr_mut(st);
        let (vp, _g5) = cache.v.device_ptr_mut(st);
        let (lp, _g6) = cache.len.device_ptr(st);
        let p = QkvRopeParams {
            qkv: ap as *const f32,
            bias: bp as *const f32,
            rope: rp as *const [f32; 2],
            q: qp as *mut f32,
            k_cache: kp as *mut u16,
            v_cache: vp as *mut u16,
            cache_len: lp as *const u32,
            heads: heads.heads as u32,
            kv_heads: heads.kv_heads as u32,
            head_dim: heads.head_dim as u32,
            m: m as u32,
            capacity: cache.capacity as u32,
            rope_positions: (rope.len() / heads.head_dim) as u32,
            neox: neox as u32,
            seqs: cache.seqs as u32,
        };
        let plan = crate::plan::qkv_rope(
            rows as u32,
            heads.heads as u32,
            heads.kv_heads as u32,
            heads.head_dim as u32,
            crate::plan::QKV_ROPE_BLOCK,
            self.sm_count,
        );
        // SAFETY: sizes checked above; the kernel skips positions past the cache or the table
        // (the device-resident length is the caller's to keep within them); the buffers outlive
        // the launch.
        unsafe { self.launch_by_value(KernelFn::QkvRope, p, &plan) }
    }

    /// Causal attention of `m` query rows per sequence over each sequence's cache: v2 (cache
    /// positions split across blocks, `ws` its workspace of
    /// [`CudaBackend::attention_workspace_bytes`] for the step's rows, zeroed once) or the v1
    /// oracle (one sequence; `ws` unused).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_attention(
        &self,
        q: &CudaSlice<f32>,
        cache: CacheRefs<'_>,
        out: &mut CudaSlice<f32>,
        heads: Heads,
        m: usize,
        version: KernelVersion,
        ws: &mut CudaSlice<u8>,
    ) -> Result<()> {
        heads.check()?;
        let rows = check_cache(&cache, heads, m)?;
        room("q", q, rows * heads.q_width())?;
        room("out", out, rows * heads.q_width())?;
        if version == KernelVersion::V1 && cache.seqs != 1 {
            return Err(Error::Unsupported(
                "attention v1 (the oracle) runs one sequence; v2 takes batches".to_string(),
            ));
        }
        let unsupported = || Error::Unsupported(format!("head size {}", heads.head_dim));
        let (plan, splits, ws_bytes) = crate::plan::attention_v2(
            rows as u32,
            heads.heads as u32,
            heads.head_dim as u32,
            crate::plan::ATTENTION_BLOCK,
            self.sm_count,
        )
        .ok_or_else(unsupported)?;
        let plan = match version {
            KernelVersion::V2 => {
                room("attention workspace", ws, ws_bytes)?;
                plan
            }
            KernelVersion::V1 => crate::plan::attention(
                m as u32,
                heads.heads as u32,
                heads.head_dim as u32,
                crate::plan::ATTENTION_BLOCK,
                self.sm_count,
            )
            .ok_or_else(unsupported)?,
        };
        let epl = speckv_kernels::attention::per_lane(heads.head_dim as u32).unwrap_or(1);
        let st = &self.stream;
        let (qp, _g0) = q.device_ptr(st);
        let (kp, _g1) = cache.k.device_ptr(st);
        let (vp, _g2) = cache.v.device_ptr(st);
        let (op, _g3) = out.device_ptr_mut(st);
        let (lp, _g4) = cache.len.device_ptr(st);
        let p = AttentionParams {
            q: qp as *const f32,
            k_cache: kp as *const u16,
            v_cache: vp as *const u16,
            out: op as *mut f32,
            cache_len: lp as *const u32,
            heads: heads.heads as u32,
            kv_heads: heads.kv_heads as u32,
            head_dim: heads.head_dim as u32,
            m: m as u32,
            capacity: cache.capacity as u32,
            scale: 1.0 / (heads.head_dim as f32).sqrt(),
        };
        let (wp, _g5) = ws.device_ptr_mut(st);
        let p2 = AttentionV2Params {
            base: p,
            workspace: wp as *mut u8,
            splits,
            seqs: cache.seqs as u32,
        };
        // SAFETY: sizes checked above (the v2 workspace is the plan's, its counters zero); the
        // entry's elements per lane match the head size; the kernel returns early for a length
        // past the cache; the buffers outlive the launch.
        unsafe {
            match version {
                KernelVersion::V1 => self.launch_by_value(KernelFn::Attention(epl), p, &plan),
                KernelVersion::V2 => self.launch_by_value(KernelFn::AttentionV2(epl), p2, &plan),
            }
        }
    }

    /// Workspace bytes of attention v2 at `m` rows (every sequence's positions: the most a step of
    /// `m` rows needs).
    pub fn attention_workspace_bytes(&self, heads: Heads, m: usize) -> usize {
        crate::plan::attention_v2(
            m as u32,
            heads.heads as u32,
            heads.head_dim as u32,
            crate::plan::ATTENTION_BLOCK,
            self.sm_count,
        )
        .map(|(_, _, b)| b)
        .unwrap_or(0)
    }

    /// out `[m, ffn]` = silu(gate) · up.
    pub fn launch_silu_mul(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        ffn: usize,
        m: usize,
    ) -> Result<()> {
        check_multiple("ffn", ffn, 4)?;
        step(m)?;
        room("gate/up", gu, m * 2 * ffn)?;
        room("out", out, m * ffn)?;
        let st = &self.stream;
        let (gp, _g0) = gu.device_ptr(st);
        let (op, _g1) = out.device_ptr_mut(st);
        let p = SiluMulParams {
            gu: gp as *const f32,
            out: op as *mut f32,
            ffn: ffn as u32,
            m: m as u32,
        };
        let plan = crate::plan::silu_mul(
            m as u32,
            ffn as u32,
            crate::plan::SILU_MUL_BLOCK,
            self.sm_count,
        );
        // SAFETY: sizes checked above, 256-byte-aligned allocations, ffn a multiple of 4; the
        // buffers outlive the launch.
        unsafe { self.launch_by_value(KernelFn::SiluMul, p, &plan) }
    }
}

//! The forward-pass kernels on the emulator: each call checks its inputs as the CUDA launch does,
//! runs the kernel's own source under several schedules with the sanitizer on, and returns what
//! the kernel wrote (a buffer the kernel updates in place is copied first, so every schedule
//! starts from the same state).

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::params::{
    AttentionParams, AttentionV2Params, EmbedParams, QkvRopeParams, RmsNormParams, SiluMulParams,
};

use super::Emulator;
use crate::backend::forward::{
    check_aligned, check_batch, check_len, check_multiple, AlignedF32, Heads,
};
use crate::error::{Error, Result};
use crate::stats::check_block;

/// f32 bytes, for the schedules' comparison.
fn bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice::<f32, u8>(v).to_vec()
}

/// A 16-byte-aligned copy (the vectorised kernels need it).
fn aligned(v: &[f32]) -> AlignedF32 {
    AlignedF32::from_slice(v)
}

impl Emulator {
    /// x `[m, hidden]` = rows `tokens` of the f16 table `[vocab, hidden]`.
    pub fn embed(&self, table: &[u16], hidden: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        check_multiple("hidden", hidden, 8)?;
        if table.is_empty() || !table.len().is_multiple_of(hidden) {
            return Err(Error::Length {
                what: "embedding table",
                got: table.len(),
                expected: table.len().div_ceil(hidden).max(1) * hidden,
            });
        }
        check_aligned("the embedding table", table)?;
        let vocab = table.len() / hidden;
        if tokens.is_empty() {
            return Err(Error::Empty { what: "tokens" });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Other(format!(
                "token {t} is outside the vocabulary of {vocab}"
            )));
        }
        let m = tokens.len();
        let plan = crate::plan::embed(m as u32, 1);
        emu::launch_schedules(
            &plan.entry,
            |seed| {
                let mut x = AlignedF32::zeros(m * hidden);
                let p = EmbedParams {
                    table: table.as_ptr(),
                    tokens: tokens.as_ptr(),
                    x: x.as_mut_slice().as_mut_ptr(),
                    hidden: hidden as u32,
                    vocab: vocab as u32,
                    m: m as u32,
                    _pad: 0,
                };
                let l = Launch::new(plan.entry.as_str(), plan.grid[0], self.block, 0)
                    .input("table", table)
                    .input("tokens", tokens)
                    .output("x", x.as_mut_slice())
                    .schedule(seed)
                    .math(self.math);
                // SAFETY: the table is `vocab × hidden` f16 (checked), 16-byte aligned, hidden a
                // multiple of 8; x has m · hidden slots; the sanitizer checks every access.
                unsafe { emu::launch_checked(&l, || speckv_kernels::embed::embed(&p)) }?;
                Ok(x.as_slice().to_vec())
            },
            |x| bytes(x),
        )
        .map_err(Error::from)
    }

    /// RMSNorm of the rows of x `[rows, hidden]` after adding `residual`: (x + residual, out).
    pub fn rms_norm(
        &self,
        x: &[f32],
        residual: Option<&[f32]>,
        weight: &[f32],
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_block(self.block)?;
        let hidden = weight.len();
        check_multiple("hidden", hidden, 4)?;
        let rows = x.len() / hidden;
        if rows == 0 {
            return Err(Error::Empty { what: "rows" });
        }
        check_len("x", x.len(), rows, hidden)?;
        if let Some(r) = residual {
            check_len("residual", r.len(), rows, hidden)?;
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::Other(format!(
                "RMSNorm epsilon {eps} must be finite and ≥ 0"
            )));
        }
        let weight = aligned(weight);
        let residual = residual.map(aligned);
        let plan = crate::plan::rms_norm(rows as u32, self.block, 1);
        emu::launch_schedules(
            &plan.entry,
            |seed| {
                let mut xs = aligned(x);
                let mut out = AlignedF32::zeros(rows * hidden);
                let p = RmsNormParams {
                    x: xs.as_mut_slice().as_mut_ptr(),
                    residual: residual
                        .as_ref()
                        .map(|r| r.as_slice().as_ptr())
                        .unwrap_or(std::ptr::null()),
                    weight: weight.as_slice().as_ptr(),
                    out: out.as_mut_slice().as_mut_ptr(),
                    hidden: hidden as u32,
                    rows: rows as u32,
                    eps,
                    _pad: 0,
                };
                let mut l = Launch::new(
                    plan.entry.as_str(),
                    plan.grid[0],
                    self.block,
                    plan.shared_bytes,
                )
                .output("x", xs.as_mut_slice())
                .input("weight", weight.as_slice())
                .output("out", out.as_mut_slice())
                .schedule(seed)
                .math(self.math);
                if let Some(r) = &residual {
                    l = l.input("residual", r.as_slice());
                }
                // SAFETY: x, residual and out hold rows · hidden f32, weight hidden (checked),
                // separate allocations, 16-byte aligned; the sanitizer checks every access.
                unsafe { emu::launch_checked(&l, || speckv_kernels::rms_norm::rms_norm(&p)) }?;
                Ok((xs.as_slice().to_vec(), out.as_slice().to_vec()))
            },
            |(a, b)| [bytes(a), bytes(b)].concat(),
        )
        .map_err(Error::from)
    }

    /// Bias, rotary embedding and the cache append for `m` positions after `len`: returns q
    /// `[m, heads · head_dim]` and writes rows `len..len + m` of the caches.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope(
        &self,
        qkv: &[f32],
        bias: Option<&[f32]>,
        rope: &[[f32; 2]],
        heads: Heads,
        neox: bool,
        len: usize,
        k_cache: &mut [u16],
        v_cache: &mut [u16],
    ) -> Result<Vec<f32>> {
        self.qkv_rope_batch(qkv, bias, rope, heads, neox, &[len], k_cache, v_cache)
    }

    /// [`Emulator::qkv_rope`] for a batch of `lens.len()` sequences of m positions each: `qkv`
    /// holds their rows sequence by sequence, the caches their `capacity` rows each, sequence b
    /// at length `lens[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_batch(
        &self,
        qkv: &[f32],
        bias: Option<&[f32]>,
        rope: &[[f32; 2]],
        heads: Heads,
        neox: bool,
        lens: &[usize],
        k_cache: &mut [u16],
        v_cache: &mut [u16],
    ) -> Result<Vec<f32>> {
        heads.check()?;
        let (qkvw, kvw) = (heads.qkv_width(), heads.kv_width());
        let rows = qkv.len() / qkvw;
        check_len("qkv", qkv.len(), rows, qkvw)?;
        if let Some(b) = bias {
            check_len("qkv bias", b.len(), 1, qkvw)?;
        }
        let seqs = lens.len().max(1);
        let capacity = k_cache.len() / kvw / seqs;
        check_len("k cache", k_cache.len(), seqs * capacity, kvw)?;
        check_len("v cache", v_cache.len(), seqs * capacity, kvw)?;
        let half = heads.head_dim / 2;
        let rope_positions = rope.len() / half;
        check_len("rotary table", rope.len(), rope_positions, half)?;
        let m = check_batch(rows, lens, capacity.min(rope_positions))?;
        let plan = crate::plan::qkv_rope(
            rows as u32,
            heads.heads as u32,
            heads.kv_heads as u32,
            heads.head_dim as u32,
            self.block,
            1,
        );
        let lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let (q, k, v) = emu::launch_schedules(
            &plan.entry,
            |seed| {
                let mut q = vec![0f32; rows * heads.q_width()];
                let (mut k, mut v) = (k_cache.to_vec(), v_cache.to_vec());
                let p = QkvRopeParams {
                    qkv: qkv.as_ptr(),
                    bias: bias.map(|b| b.as_ptr()).unwrap_or(std::ptr::null()),
                    rope: rope.as_ptr(),
                    q: q.as_mut_ptr(),
                    k_cache: k.as_mut_ptr(),
                    v_cache: v.as_mut_ptr(),
                    cache_len: lens.as_ptr(),
                    heads: heads.heads as u32,
                    kv_heads: heads.kv_heads as u32,
                    head_dim: heads.head_dim as u32,
                    m: m as u32,
                    capacity: capacity as u32,
                    rope_positions: rope_positions as u32,
                    neox: neox as u32,
                    seqs: seqs as u32,
                };
                let mut l = Launch::new(plan.entry.as_str(), plan.grid[0], self.block, 0)
                    .input("qkv", qkv)
                    .input("rope", rope)
                    .input("cache_len", &lens)
                    .output("q", &mut q)
                    .output("k_cache", &mut k)
                    .output("v_cache", &mut v)
                    .schedule(seed)
                    .math(self.math);
                if let Some(b) = bias {
                    l = l.input("bias", b);
                }
                // SAFETY: every buffer's length was checked against the shape, len + m fits the
                // cache and the table; the sanitizer checks every access.
                unsafe { emu::launch_checked(&l, || speckv_kernels::qkv_rope::qkv_rope(&p)) }?;
                Ok((q, k, v))
            },
            |(q, k, v)| {
                [
                    bytes(q),
                    bytemuck::cast_slice(k).to_vec(),
                    bytemuck::cast_slice(v).to_vec(),
                ]
                .concat()
            },
        )?;
        k_cache.copy_from_slice(&k);
        v_cache.copy_from_slice(&v);
        Ok(q)
    }

    /// Causal attention of q `[m, heads · head_dim]` (positions `len..len + m`) over the cache
    /// rows `0..len + m`: out `[m, heads · head_dim]`, by v1 (one block per position and head).
    pub fn attention(
        &self,
        q: &[f32],
        k_cache: &[u16],
        v_cache: &[u16],
        heads: Heads,
        len: usize,
    ) -> Result<Vec<f32>> {
        self.attention_version(q, k_cache, v_cache, heads, &[len], None)
    }

    /// [`Emulator::attention`] by v2, each pair's cache positions split across blocks as planned
    /// for `sm_count` SMs (the workspace's counters must come back zero).
    pub fn attention_v2(
        &self,
        q: &[f32],
        k_cache: &[u16],
        v_cache: &[u16],
        heads: Heads,
        len: usize,
        sm_count: u32,
    ) -> Result<Vec<f32>> {
        self.attention_version(q, k_cache, v_cache, heads, &[len], Some(sm_count))
    }

    /// [`Emulator::attention_v2`] for a batch of `lens.len()` sequences of m positions each, laid
    /// out as for [`Emulator::qkv_rope_batch`].
    pub fn attention_v2_batch(
        &self,
        q: &[f32],
        k_cache: &[u16],
        v_cache: &[u16],
        heads: Heads,
        lens: &[usize],
        sm_count: u32,
    ) -> Result<Vec<f32>> {
        self.attention_version(q, k_cache, v_cache, heads, lens, Some(sm_count))
    }

    /// v1 (`v2_sms` None, one sequence) or v2 planned for `v2_sms` SMs.
    fn attention_version(
        &self,
        q: &[f32],
        k_cache: &[u16],
        v_cache: &[u16],
        heads: Heads,
        lens: &[usize],
        v2_sms: Option<u32>,
    ) -> Result<Vec<f32>> {
        check_block(self.block)?;
        heads.check()?;
        if v2_sms.is_none() && lens.len() != 1 {
            return Err(Error::Unsupported(
                "attention v1 (the oracle) runs one sequence; v2 takes batches".to_string(),
            ));
        }
        let (qw, kvw) = (heads.q_width(), heads.kv_width());
        let rows = q.len() / qw;
        check_len("q", q.len(), rows, qw)?;
        let seqs = lens.len().max(1);
        let capacity = k_cache.len() / kvw / seqs;
        check_len("k cache", k_cache.len(), seqs * capacity, kvw)?;
        check_len("v cache", v_cache.len(), seqs * capacity, kvw)?;
        let m = check_batch(rows, lens, capacity)?;
        let (rows32, h32, hd32) = (rows as u32, heads.heads as u32, heads.head_dim as u32);
        let unsupported = || Error::Unsupported(format!("head size {}", heads.head_dim));
        // (plan, splits, workspace bytes) over every sequence's rows; v1 has neither splits nor
        // a workspace.
        let (plan, splits, ws_bytes) = match v2_sms {
            Some(sms) => crate::plan::attention_v2(rows32, h32, hd32, self.block, sms),
            None => crate::plan::attention(rows32, h32, hd32, self.block, 1).map(|p| (p, 0, 0)),
        }
        .ok_or_else(unsupported)?;
        let lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let counters = (rows * heads.heads).div_ceil(4) * 4;
        emu::launch_schedules(
            &plan.entry,
            |seed| {
                let mut out = vec![0f32; rows * qw];
                let mut ws = vec![0u32; ws_bytes.div_ceil(4).max(1)];
                let base = AttentionParams {
                    q: q.as_ptr(),
                    k_cache: k_cache.as_ptr(),
                    v_cache: v_cache.as_ptr(),
                    out: out.as_mut_ptr(),
                    cache_len: lens.as_ptr(),
                    heads: h32,
                    kv_heads: heads.kv_heads as u32,
                    head_dim: hd32,
                    m: m as u32,
                    capacity: capacity as u32,
                    scale: 1.0 / (heads.head_dim as f32).sqrt(),
                };
                let p2 = AttentionV2Params {
                    base,
                    workspace: ws.as_mut_ptr() as *mut u8,
                    splits,
                    seqs: seqs as u32,
                };
                let mut l = Launch::new(
                    plan.entry.as_str(),
                    plan.grid[0],
                    self.block,
                    plan.shared_bytes,
                )
                .input("q", q)
                .input("k_cache", k_cache)
                .input("v_cache", v_cache)
                .input("cache_len", &lens)
                .output("out", &mut out)
                .schedule(seed)
                .math(self.math);
                if v2_sms.is_some() {
                    l = l.output("workspace", &mut ws);
                }
                use speckv_kernels::attention::{attention as v1, attention_v2 as v2};
                macro_rules! go {
                    ($epl:literal) => {
                        if v2_sms.is_some() {
                            emu::launch_checked(&l, || v2::<$epl>(&p2))
                        } else {
                            emu::launch_checked(&l, || v1::<$epl>(&base))
                        }
                    };
                }
                // SAFETY: q and the caches match the head layout (checked), len + m fits the
                // cache, the entry's elements per lane match the head size, v2's workspace is
                // the plan's size and zeroed; the sanitizer checks every access.
                unsafe {
                    match speckv_kernels::attention::per_lane(hd32) {
                        Some(1) => go!(1),
                        Some(2) => go!(2),
                        Some(4) => go!(4),
                        _ => go!(8),
                    }
                }?;
                if v2_sms.is_some() && ws[..counters].iter().any(|&c| c != 0) {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: "attention v2 left its counters non-zero".to_string(),
                    });
                }
                Ok(out)
            },
            |o| bytes(o),
        )
        .map_err(Error::from)
    }

    /// out `[m, ffn]` = silu(gate) · up of the fused projection gu `[m, 2 · ffn]`.
    pub fn silu_mul(&self, gu: &[f32], ffn: usize) -> Result<Vec<f32>> {
        check_multiple("ffn", ffn, 4)?;
        let m = gu.len() / (2 * ffn);
        if m == 0 {
            return Err(Error::Empty { what: "rows" });
        }
        check_len("gate/up", gu.len(), m, 2 * ffn)?;
        let gu = aligned(gu);
        let plan = crate::plan::silu_mul(m as u32, ffn as u32, self.block, 1);
        emu::launch_schedules(
            &plan.entry,
            |seed| {
                let mut out = AlignedF32::zeros(m * ffn);
                let p = SiluMulParams {
                    gu: gu.as_slice().as_ptr(),
                    out: out.as_mut_slice().as_mut_ptr(),
                    ffn: ffn as u32,
                    m: m as u32,
                };
                let l = Launch::new(plan.entry.as_str(), plan.grid[0], self.block, 0)
                    .input("gu", gu.as_slice())
                    .output("out", out.as_mut_slice())
                    .schedule(seed)
                    .math(self.math);
                // SAFETY: gu holds m · 2ffn f32 and out m · ffn, 16-byte aligned, ffn a multiple
                // of 4; the sanitizer checks every access.
                unsafe { emu::launch_checked(&l, || speckv_kernels::silu_mul::silu_mul(&p)) }?;
                Ok(out.as_slice().to_vec())
            },
            |o| bytes(o),
        )
        .map_err(Error::from)
    }
}

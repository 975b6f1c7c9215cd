//! The forward pass over chunks of up to `MAX_M` positions, writing only the buffers the cache
//! owns ([`KvCache`]'s work space): nothing is allocated unless the cache grows past what was
//! reserved, and [`Model::forward_into`] returns the logits without copying them. A chunk may hold
//! several sequences, m positions each (a batched CPU state): their rows share every product, and
//! each attends over its own cache from its own position.

use half::slice::HalfFloatSliceExt;

use super::cache::{Kv, Work};
use super::ops::{attention, rms_norm, Heads};
use super::{Embed, KvCache, Model, Proj};
use crate::error::{Error, Result};
use crate::weights::cpu::{self, Acts, Linear, MAX_M};

/// y `[m, out]` = x · Wᵀ (x quantised in `acts` already when the product is an integer one).
fn product(
    l: &Linear,
    x: &[f32],
    acts: &Acts,
    m: usize,
    y: &mut [f32],
    yt: &mut [f32],
) -> Result<()> {
    let (out, _) = l.shape();
    cpu::matmul(l, x, acts, m, &mut y[..m * out], yt)
}

/// Every projection of `p` on x `[m, inp]`, written side by side into y `[m, Σ out]`.
#[allow(clippy::too_many_arguments)]
fn project(
    p: &Proj,
    x: &[f32],
    acts: &mut Acts,
    m: usize,
    inp: usize,
    y: &mut [f32],
    yt: &mut [f32],
    part: &mut [f32],
) -> Result<()> {
    if p.integer() {
        acts.quantize_for(&x[..m * inp], m, inp, p.needs())?;
    }
    match p {
        Proj::Fused(l) => product(l, x, acts, m, y, yt),
        Proj::Split(v) => {
            let total: usize = v.iter().map(|l| l.shape().0).sum();
            let mut c0 = 0;
            for l in v {
                let o = l.shape().0;
                product(l, x, acts, m, part, yt)?;
                for i in 0..m {
                    y[i * total + c0..i * total + c0 + o]
                        .copy_from_slice(&part[i * o..(i + 1) * o]);
                }
                c0 += o;
            }
            Ok(())
        }
    }
}

/// One product with its own activation quantisation.
fn single(
    l: &Linear,
    x: &[f32],
    acts: &mut Acts,
    m: usize,
    y: &mut [f32],
    yt: &mut [f32],
) -> Result<()> {
    let (_, inp) = l.shape();
    if l.integer() {
        acts.quantize_for(&x[..m * inp], m, inp, l.needs())?;
    }
    product(l, x, acts, m, y, yt)
}

impl Model {
    /// Logits `[keep, vocab]` of the last `keep` positions after `tokens`, appended to `cache`
    /// (1 for decoding, γ + 1 for verification, any number for scoring a text).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, keep: usize) -> Result<Vec<f32>> {
        self.forward_layers(tokens, cache, keep, None)
    }

    /// [`Model::forward`] running only the layers marked true in `active` (a self-speculative
    /// draft shares the target's weights and skips layers); `None` uses the model's own mask.
    pub fn forward_layers(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        keep: usize,
        active: Option<&[bool]>,
    ) -> Result<Vec<f32>> {
        let KvCache { kv, len, work } = cache;
        self.forward_wide(tokens, kv, len, work, keep, active)
    }

    /// [`Model::forward_layers`] on one sequence's parts.
    pub(super) fn forward_wide(
        &self,
        tokens: &[u32],
        kv: &mut Kv,
        len: &mut usize,
        work: &mut Work,
        keep: usize,
        active: Option<&[bool]>,
    ) -> Result<Vec<f32>> {
        let (kvs, lens) = (std::slice::from_mut(kv), std::slice::from_mut(len));
        let active = self.check(tokens, kvs, lens, active)?;
        let v = self.cfg.vocab;
        let keep = keep.clamp(1, tokens.len());
        let first_kept = tokens.len() - keep;
        let mut out = Vec::with_capacity(keep * v);
        let mut done = 0;
        for ch in tokens.chunks(MAX_M) {
            let want = done + ch.len() > first_kept;
            let rows = if want { ch.len() } else { 0 };
            self.chunk(ch, kvs, lens, work, rows, active)?;
            if want {
                let from = first_kept.saturating_sub(done);
                out.extend_from_slice(&work.logits[from * v..ch.len() * v]);
            }
            done += ch.len();
        }
        Ok(out)
    }

    /// The decode loop's forward pass: logits `[keep, vocab]` (keep ≤ `MAX_M`) of the last
    /// positions, borrowed from the cache's buffers. Allocates nothing once the cache has room.
    pub fn forward_into<'c>(
        &self,
        tokens: &[u32],
        cache: &'c mut KvCache,
        keep: usize,
        active: Option<&[bool]>,
    ) -> Result<&'c [f32]> {
        let KvCache { kv, len, work } = cache;
        self.forward_parts(tokens, kv, len, work, keep, active)
    }

    /// [`Model::forward_into`] on one sequence's parts.
    pub(super) fn forward_parts<'w>(
        &self,
        tokens: &[u32],
        kv: &mut Kv,
        len: &mut usize,
        work: &'w mut Work,
        keep: usize,
        active: Option<&[bool]>,
    ) -> Result<&'w [f32]> {
        let (kvs, lens) = (std::slice::from_mut(kv), std::slice::from_mut(len));
        let active = self.check(tokens, kvs, lens, active)?;
        if keep == 0 || keep > MAX_M.min(tokens.len()) {
            return Err(Error::Other(format!(
                "keep = {keep} rows of {} positions: 1 to {} are returned at once",
                tokens.len(),
                MAX_M.min(tokens.len())
            )));
        }
        // The last (at most MAX_M) positions run as one chunk, logits for the kept rows only: a
        // draft fed its pending token and a draft it has not seen is one pass of M = 2, not two
        // of M = 1 (measured: 93 ms against 49 for one token on the Qwen 0.5B draft, README).
        let lead = tokens.len().saturating_sub(MAX_M);
        for ch in tokens[..lead].chunks(MAX_M) {
            self.chunk(ch, kvs, lens, work, 0, active)?;
        }
        self.chunk(&tokens[lead..], kvs, lens, work, keep, active)?;
        Ok(&work.logits[..keep * self.cfg.vocab])
    }

    /// One step of several sequences: `tokens` holds m tokens per sequence of `kvs`, sequence
    /// by sequence (at most `MAX_M` in all; the caller checked the shape); with `logits` the
    /// step's logits `[B · m, vocab]` are left in `work.logits`.
    pub(super) fn forward_batch(
        &self,
        tokens: &[u32],
        kvs: &mut [Kv],
        lens: &mut [usize],
        work: &mut Work,
        logits: bool,
        active: Option<&[bool]>,
    ) -> Result<()> {
        let active = self.check(tokens, kvs, lens, active)?;
        let rows = if logits { tokens.len() } else { 0 };
        self.chunk(tokens, kvs, lens, work, rows, active)
    }

    /// The call's tokens fit the vocabulary, the caches this model and the context `tokens`
    /// split evenly over the sequences.
    fn check<'a>(
        &'a self,
        tokens: &[u32],
        kvs: &[Kv],
        lens: &[usize],
        active: Option<&'a [bool]>,
    ) -> Result<&'a [bool]> {
        let active = active.unwrap_or(&self.active);
        if active.len() != self.cfg.layers {
            return Err(Error::Length {
                what: "active layers",
                got: active.len(),
                expected: self.cfg.layers,
            });
        }
        if tokens.is_empty() {
            return Err(Error::Empty { what: "tokens" });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(Error::Other(format!(
                "token {t} is outside the vocabulary of {}",
                self.cfg.vocab
            )));
        }
        let width = self.cfg.kv_heads * self.cfg.head_dim;
        if kvs
            .iter()
            .any(|kv| kv.width != width || kv.k.len() != self.cfg.layers)
        {
            return Err(Error::Other(
                "the KV cache was made for another model".to_string(),
            ));
        }
        let m = tokens.len() / kvs.len().max(1);
        if let Some(&len) = lens.iter().find(|&&l| l + m > self.cfg.context) {
            return Err(Error::Other(format!(
                "{} positions exceed the context of {}",
                len + m,
                self.cfg.context
            )));
        }
        Ok(active)
    }

    fn embed_row(&self, t: u32, out: &mut [f32]) {
        let h = self.cfg.hidden;
        match &self.embed {
            Embed::F16(e) => e[t as usize * h..(t as usize + 1) * h].convert_to_f32_slice(out),
            Embed::Blocks(b) => b.dequantize_row(t as usize, out),
        }
    }

    /// Up to `MAX_M` rows through the active layers (and the LM head on the last `logit_rows`
    /// of them, their logits left in `w.logits`): m positions
    /// of each sequence of `kvs`, sequence by sequence, sequence s from position `lens[s]` on.
    fn chunk(
        &self,
        tokens: &[u32],
        kvs: &mut [Kv],
        lens: &mut [usize],
        w: &mut Work,
        logit_rows: usize,
        active: &[bool],
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (rows, h, hd, ffn) = (tokens.len(), cfg.hidden, cfg.head_dim, cfg.ffn);
        let m = rows / kvs.len();
        let kvw = cfg.kv_heads * hd;
        let qw = h + 2 * kvw;
        for (kv, &len) in kvs.iter_mut().zip(lens.iter()) {
            kv.reserve(len + m);
        }
        w.fit_scores(kvs.iter().map(|kv| kv.capacity).max().unwrap_or(0));
        for (i, &t) in tokens.iter().enumerate() {
            self.embed_row(t, &mut w.x[i * h..(i + 1) * h]);
        }
        let heads = Heads {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            hd,
        };
        let neox = cfg.arch == "qwen2";
        for (li, l) in self.layers.iter().enumerate() {
            if !active[li] {
                // Skipped layers' cache rows are never read by this model's mask.
                continue;
            }
            rms_norm(
                &w.x[..rows * h],
                &l.attn_norm,
                cfg.rms_eps,
                &mut w.xn[..rows * h],
                h,
            );
            project(
                &l.qkv,
                &w.xn,
                &mut w.acts,
                rows,
                h,
                &mut w.qkv,
                &mut w.yt,
                &mut w.att_h,
            )?;
            for i in 0..rows {
                let row = &mut w.qkv[i * qw..(i + 1) * qw];
                if let Some(b) = &l.qkv_bias {
                    for (a, c) in row.iter_mut().zip(b) {
                        *a += c;
                    }
                }
                w.q[i * h..(i + 1) * h].copy_from_slice(&row[..h]);
                w.k[i * kvw..(i + 1) * kvw].copy_from_slice(&row[h..h + kvw]);
                w.v[i * kvw..(i + 1) * kvw].copy_from_slice(&row[h + kvw..]);
            }
            // Each sequence from its own position, over its own cache.
            for (s, (kv, &pos0)) in kvs.iter_mut().zip(lens.iter()).enumerate() {
                let (qs, ks) = (s * m * h..(s + 1) * m * h, s * m * kvw..(s + 1) * m * kvw);
                self.rope.apply(&mut w.q[qs.clone()], cfg.heads, pos0, neox);
                self.rope
                    .apply(&mut w.k[ks.clone()], cfg.kv_heads, pos0, neox);
                let at = pos0 * kvw..(pos0 + m) * kvw;
                kv.k[li][at.clone()].convert_from_f32_slice(&w.k[ks.clone()]);
                kv.v[li][at].convert_from_f32_slice(&w.v[ks]);
                let n = (pos0 + m) * kvw;
                attention(
                    &w.q[qs.clone()],
                    &kv.k[li][..n],
                    &kv.v[li][..n],
                    m,
                    pos0,
                    &heads,
                    &mut w.att_h,
                    &mut w.scores,
                    &mut w.att[qs],
                );
            }
            single(&l.o, &w.att, &mut w.acts, rows, &mut w.o, &mut w.yt)?;
            for (a, b) in w.x[..rows * h].iter_mut().zip(&w.o[..rows * h]) {
                *a += b;
            }
            rms_norm(
                &w.x[..rows * h],
                &l.ffn_norm,
                cfg.rms_eps,
                &mut w.xn[..rows * h],
                h,
            );
            project(
                &l.gate_up,
                &w.xn,
                &mut w.acts,
                rows,
                h,
                &mut w.gu,
                &mut w.yt,
                &mut w.act,
            )?;
            for i in 0..rows {
                let (g, u) = w.gu[i * 2 * ffn..(i + 1) * 2 * ffn].split_at(ffn);
                for ((a, g), u) in w.act[i * ffn..(i + 1) * ffn].iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            single(&l.down, &w.act, &mut w.acts, rows, &mut w.o, &mut w.yt)?;
            for (a, b) in w.x[..rows * h].iter_mut().zip(&w.o[..rows * h]) {
                *a += b;
            }
        }
        for l in lens.iter_mut() {
            *l += m;
        }
        if logit_rows > 0 {
            let from = rows - logit_rows.min(rows);
            let n = rows - from;
            rms_norm(
                &w.x[from * h..rows * h],
                &self.out_norm,
                cfg.rms_eps,
                &mut w.xn[..n * h],
                h,
            );
            single(
                &self.lm_head,
                &w.xn,
                &mut w.acts,
                n,
                &mut w.logits,
                &mut w.yt,
            )?;
        }
        Ok(())
    }
}

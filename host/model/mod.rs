//! A decoder-only transformer (llama and qwen2 architectures) read from GGUF and run on the CPU
//! backend's fast paths: GGUF weights dequantised by candle-core's quantized module, linear layers
//! re-stored in one of speckv's weight regimes (FP16 / INT8 / NF4) and multiplied by the fused
//! dequantise-GEMV, RMSNorm, RoPE (llama: adjacent pairs; qwen2: halves), grouped-query attention
//! over a KV cache that rolls back rejected positions, SwiGLU, q/k/v biases where the architecture
//! has them, tied or separate LM head.
//!
//! GGUF files are untrusted input: reading goes through candle-core's bounds-checked parser, and any
//! panic inside it is caught and turned into an error.

mod gguf;
mod ops;
pub mod tokenizer;

use gguf::load_f32;
pub use gguf::{guarded, read_gguf, Config};
use ops::{add_bias, attention, rms_norm, rope};

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};
use crate::weights::quant::{Format, QMatrix};

struct Layer {
    attn_norm: Vec<f32>,
    q: QMatrix,
    k: QMatrix,
    v: QMatrix,
    o: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// A model in one weight regime.
pub struct Model {
    pub cfg: Config,
    pub format: Format,
    embed: Vec<f16>,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: QMatrix,
    /// Which layers run (all by default; a self-speculative draft skips some).
    active: Vec<bool>,
}

/// Per-sequence attention state: keys and values of every position so far, per layer.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    width: usize,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &Config) -> KvCache {
        KvCache {
            k: vec![Vec::new(); cfg.layers],
            v: vec![Vec::new(); cfg.layers],
            width: cfg.kv_heads * cfg.head_dim,
            len: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets every position from `len` on (rejected draft tokens).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for l in 0..self.k.len() {
            self.k[l].truncate(len * self.width);
            self.v[l].truncate(len * self.width);
        }
        self.len = len;
    }
}

impl Model {
    /// Loads `path` with its linear layers in `format`.
    pub fn load(path: &Path, format: Format) -> Result<Model> {
        let (c, mut r) = read_gguf(path)?;
        let cfg = Config::from_gguf(&c)?;
        let lin =
            |r: &mut BufReader<File>, name: &str, out: usize, inp: usize| -> Result<QMatrix> {
                let (w, dims) = load_f32(&c, r, name)?;
                if dims != [out, inp] {
                    return Err(Error::BadModel(format!(
                        "tensor {name} has shape {dims:?}, expected [{out}, {inp}]"
                    )));
                }
                QMatrix::quantize(&w, out, inp, format, false)
            };
        let (h, kvw, ffn) = (cfg.hidden, cfg.kv_heads * cfg.head_dim, cfg.ffn);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let q = lin(&mut r, &format!("{p}.attn_q.weight"), h, h)?;
            let k = lin(&mut r, &format!("{p}.attn_k.weight"), kvw, h)?;
            let v = lin(&mut r, &format!("{p}.attn_v.weight"), kvw, h)?;
            let o = lin(&mut r, &format!("{p}.attn_output.weight"), h, h)?;
            let gate = lin(&mut r, &format!("{p}.ffn_gate.weight"), ffn, h)?;
            let up = lin(&mut r, &format!("{p}.ffn_up.weight"), ffn, h)?;
            let down = lin(&mut r, &format!("{p}.ffn_down.weight"), h, ffn)?;
            let mut vec1 = |name: String, n: usize| -> Result<Option<Vec<f32>>> {
                if !c.tensor_infos.contains_key(&name) {
                    return Ok(None);
                }
                let (v, _) = load_f32(&c, &mut r, &name)?;
                if v.len() != n {
                    return Err(Error::BadModel(format!(
                        "tensor {name} has {} values, expected {n}",
                        v.len()
                    )));
                }
                Ok(Some(v))
            };
            let attn_norm = vec1(format!("{p}.attn_norm.weight"), h)?
                .ok_or_else(|| Error::BadModel(format!("{p}.attn_norm.weight missing")))?;
            let ffn_norm = vec1(format!("{p}.ffn_norm.weight"), h)?
                .ok_or_else(|| Error::BadModel(format!("{p}.ffn_norm.weight missing")))?;
            let bq = vec1(format!("{p}.attn_q.bias"), h)?;
            let bk = vec1(format!("{p}.attn_k.bias"), kvw)?;
            let bv = vec1(format!("{p}.attn_v.bias"), kvw)?;
            layers.push(Layer {
                attn_norm,
                q,
                k,
                v,
                o,
                bq,
                bk,
                bv,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        let (out_norm, dims) = load_f32(&c, &mut r, "output_norm.weight")?;
        if out_norm.len() != h {
            return Err(Error::BadModel(format!(
                "output_norm.weight has shape {dims:?} ({} values), expected [{h}]",
                out_norm.len()
            )));
        }
        let (emb, dims) = load_f32(&c, &mut r, "token_embd.weight")?;
        if dims != [cfg.vocab, h] {
            return Err(Error::BadModel(format!(
                "token_embd.weight has shape {dims:?}, expected [{}, {h}]",
                cfg.vocab
            )));
        }
        let lm_head = if c.tensor_infos.contains_key("output.weight") {
            lin(&mut r, "output.weight", cfg.vocab, h)?
        } else {
            QMatrix::quantize(&emb, cfg.vocab, h, format, false)?
        };
        let embed = emb.iter().map(|&x| f16::from_f32(x)).collect();
        let active = vec![true; cfg.layers];
        Ok(Model {
            cfg,
            format,
            embed,
            layers,
            out_norm,
            lm_head,
            active,
        })
    }

    /// Restricts the forward pass to the layers marked true (a self-speculative draft).
    pub fn set_active_layers(&mut self, active: Vec<bool>) -> Result<()> {
        if active.len() != self.cfg.layers {
            return Err(Error::Length {
                what: "active layers",
                got: active.len(),
                expected: self.cfg.layers,
            });
        }
        self.active = active;
        Ok(())
    }

    pub fn active_layers(&self) -> &[bool] {
        &self.active
    }

    /// Logits `[tokens.len(), vocab]` of the positions after each of `tokens`, appended to `cache`
    /// (only the last `keep` rows are returned: 1 for decoding, γ + 1 for verification).
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
        if cache.len + tokens.len() > self.cfg.context {
            return Err(Error::Other(format!(
                "{} positions exceed the context of {}",
                cache.len + tokens.len(),
                self.cfg.context
            )));
        }
        let keep = keep.clamp(1, tokens.len());
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(crate::weights::gemv::MAX_M).collect();
        let n = chunks.len();
        let first_kept = tokens.len() - keep;
        let mut done = 0;
        for (ci, ch) in chunks.into_iter().enumerate() {
            let want_logits = done + ch.len() > first_kept || ci + 1 == n;
            let logits = self.forward_chunk(ch, cache, want_logits, active)?;
            if want_logits {
                let v = self.cfg.vocab;
                for (r, row) in logits.chunks(v).enumerate() {
                    if done + r >= first_kept {
                        out.extend_from_slice(row);
                    }
                }
            }
            done += ch.len();
        }
        Ok(out)
    }

    fn forward_chunk(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: bool,
        active: &[bool],
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (m, h, hd) = (tokens.len(), cfg.hidden, cfg.head_dim);
        let kvw = cfg.kv_heads * hd;
        let pos0 = cache.len;
        let mut x = vec![0f32; m * h];
        for (i, &t) in tokens.iter().enumerate() {
            for (d, s) in x[i * h..(i + 1) * h]
                .iter_mut()
                .zip(&self.embed[t as usize * h..(t as usize + 1) * h])
            {
                *d = s.to_f32();
            }
        }
        let mut xn = vec![0f32; m * h];
        for (li, l) in self.layers.iter().enumerate() {
            if !active[li] {
                // A skipped layer still needs its cache rows, so positions stay aligned.
                cache.k[li].resize((pos0 + m) * kvw, 0.0);
                cache.v[li].resize((pos0 + m) * kvw, 0.0);
                continue;
            }
            rms_norm(&x, &l.attn_norm, cfg.rms_eps, &mut xn, h);
            let mut q = crate::weights::gemv::cpu(&l.q, &xn, m)?;
            let mut k = crate::weights::gemv::cpu(&l.k, &xn, m)?;
            let mut v = crate::weights::gemv::cpu(&l.v, &xn, m)?;
            add_bias(&mut q, l.bq.as_deref());
            add_bias(&mut k, l.bk.as_deref());
            add_bias(&mut v, l.bv.as_deref());
            let neox = cfg.arch == "qwen2";
            rope(&mut q, cfg.heads, hd, pos0, cfg.rope_base, neox);
            rope(&mut k, cfg.kv_heads, hd, pos0, cfg.rope_base, neox);
            cache.k[li].extend_from_slice(&k);
            cache.v[li].extend_from_slice(&v);
            let att = attention(
                &q,
                &cache.k[li],
                &cache.v[li],
                m,
                pos0,
                cfg.heads,
                cfg.kv_heads,
                hd,
            );
            let o = crate::weights::gemv::cpu(&l.o, &att, m)?;
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            rms_norm(&x, &l.ffn_norm, cfg.rms_eps, &mut xn, h);
            let g = crate::weights::gemv::cpu(&l.gate, &xn, m)?;
            let u = crate::weights::gemv::cpu(&l.up, &xn, m)?;
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = crate::weights::gemv::cpu(&l.down, &act, m)?;
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
        cache.len = pos0 + m;
        if !logits {
            return Ok(Vec::new());
        }
        rms_norm(&x, &self.out_norm, cfg.rms_eps, &mut xn, h);
        crate::weights::gemv::cpu(&self.lm_head, &xn, m)
    }
}

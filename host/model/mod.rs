//! A decoder-only transformer (llama and qwen2 architectures) read from GGUF and run on the CPU
//! decoding path: linear layers kept in their GGUF blocks (the `gguf` regime) or re-stored in one
//! of speckv's weight regimes (FP16 / INT8 / NF4), multiplied by [`crate::weights::cpu`]'s integer
//! or float products with q/k/v and gate/up fused into one product each; RMSNorm, RoPE from a
//! table (llama: adjacent pairs; qwen2: halves), grouped-query attention over an f16 KV cache that
//! rolls back rejected positions, SwiGLU, q/k/v biases where the architecture has them, tied or
//! separate LM head.
//!
//! GGUF files are untrusted input: reading goes through candle-core's bounds-checked parser, and any
//! panic inside it is caught and turned into an error.

mod cache;
mod cpu_pass;
pub mod device;
mod forward;
mod gguf;
mod ops;
pub mod pass;
pub mod tokenizer;

pub use cache::KvCache;
pub use cpu_pass::CpuPass;
pub use gguf::{guarded, read_gguf, Config};
use gguf::{load_f32, load_raw};
use ops::RopeTable;
pub use pass::{BatchPass, DraftRun, DraftStop, Pass};

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};
use crate::weights::cpu::Linear;
use crate::weights::ggml::{self, BlockMatrix};
use crate::weights::quant::QMatrix;
use crate::weights::Regime;

/// Several projections of the same input: one fused matrix (rows stacked), or separate ones when
/// their GGUF block types differ.
pub(crate) enum Proj {
    Fused(Linear),
    Split(Vec<Linear>),
}

impl Proj {
    pub(crate) fn integer(&self) -> bool {
        match self {
            Proj::Fused(l) => l.integer(),
            Proj::Split(v) => v.iter().any(|l| l.integer()),
        }
    }
    /// The activation forms any of the products reads.
    pub(crate) fn needs(&self) -> (bool, bool) {
        match self {
            Proj::Fused(l) => l.needs(),
            Proj::Split(v) => v
                .iter()
                .map(|l| l.needs())
                .fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1)),
        }
    }
}

pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    /// q, k, v rows stacked.
    qkv: Proj,
    /// q, k, v biases stacked (qwen2).
    qkv_bias: Option<Vec<f32>>,
    o: Linear,
    ffn_norm: Vec<f32>,
    /// gate, up rows stacked.
    gate_up: Proj,
    down: Linear,
}

/// A model in one weight regime.
pub struct Model {
    pub cfg: Config,
    pub regime: Regime,
    embed: Embed,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: Linear,
    rope: RopeTable,
    /// Which layers run (all by default; a self-speculative draft skips some).
    active: Vec<bool>,
    /// Tensors whose GGUF type the integer path does not read, re-stored as Q8_0.
    pub requantised: Vec<String>,
}

/// Token embeddings: f16 rows (speckv regimes), or the GGUF blocks decoded row by row.
enum Embed {
    F16(Vec<f16>),
    Blocks(BlockMatrix),
}

/// A tensor as read: GGUF blocks, or f32 when a speckv regime will re-store it.
enum Raw {
    Blocks(BlockMatrix),
    F32(Vec<f32>, usize, usize),
}

struct Loader<'a> {
    c: &'a candle_core::quantized::gguf_file::Content,
    r: BufReader<File>,
    regime: Regime,
    requantised: Vec<String>,
}

impl Loader<'_> {
    fn raw(&mut self, name: &str, out: usize, inp: usize) -> Result<Raw> {
        let shape_err = |dims: &[usize]| {
            Error::BadModel(format!(
                "tensor {name} has shape {dims:?}, expected [{out}, {inp}]"
            ))
        };
        if self.regime == Regime::Gguf {
            let (ty, bytes, dims) = load_raw(self.c, &mut self.r, name)?;
            if dims != [out, inp] {
                return Err(shape_err(&dims));
            }
            if let Some(ty) = ty.and_then(ggml::from_ggml) {
                return Ok(Raw::Blocks(BlockMatrix::new(ty, out, inp, bytes)?));
            }
            self.requantised.push(name.to_string());
            let (w, _) = load_f32(self.c, &mut self.r, name)?;
            return Ok(Raw::Blocks(BlockMatrix::quantize_q8_0(&w, out, inp)?));
        }
        let (w, dims) = load_f32(self.c, &mut self.r, name)?;
        if dims != [out, inp] {
            return Err(shape_err(&dims));
        }
        Ok(Raw::F32(w, out, inp))
    }

    fn finish(&self, raw: Raw) -> Result<Linear> {
        let l = match raw {
            Raw::Blocks(b) => Linear::Blocks(b),
            Raw::F32(w, out, inp) => {
                let f = self
                    .regime
                    .format()
                    .unwrap_or(crate::weights::quant::Format::Fp16);
                Linear::Regime(QMatrix::quantize(&w, out, inp, f, false)?)
            }
        };
        l.check()?;
        Ok(l)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let raw = self.raw(name, out, inp)?;
        self.finish(raw)
    }

    /// The projections `names` (each `[outs[i], inp]`) stacked into one when they can be.
    fn fused(&mut self, names: &[String], outs: &[usize], inp: usize) -> Result<Proj> {
        let mut raws = Vec::new();
        for (n, &o) in names.iter().zip(outs) {
            raws.push(self.raw(n, o, inp)?);
        }
        let blocks: Vec<&BlockMatrix> = raws
            .iter()
            .filter_map(|r| match r {
                Raw::Blocks(b) => Some(b),
                Raw::F32(..) => None,
            })
            .collect();
        if blocks.len() == raws.len() {
            if let Some(b) = BlockMatrix::stack(&blocks) {
                return Ok(Proj::Fused(self.finish(Raw::Blocks(b))?));
            }
            let mut v = Vec::new();
            for r in raws {
                v.push(self.finish(r)?);
            }
            return Ok(Proj::Split(v));
        }
        let mut all = Vec::new();
        for r in raws {
            if let Raw::F32(w, ..) = r {
                all.extend_from_slice(&w);
            }
        }
        let out = outs.iter().sum();
        Ok(Proj::Fused(self.finish(Raw::F32(all, out, inp))?))
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        if !self.c.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let (v, dims) = load_f32(self.c, &mut self.r, name)?;
        if v.len() != n {
            return Err(Error::BadModel(format!(
                "tensor {name} has shape {dims:?} ({} values), expected [{n}]",
                v.len()
            )));
        }
        Ok(Some(v))
    }
}

impl Model {
    /// Loads `path` with its linear layers in `regime` (a speckv `Format` converts into one).
    pub fn load(path: &Path, regime: impl Into<Regime>) -> Result<Model> {
        let regime = regime.into();
        let (c, r) = read_gguf(path)?;
        let cfg = Config::from_gguf(&c)?;
        let mut ld = Loader {
            c: &c,
            r,
            regime,
            requantised: Vec::new(),
        };
        let (h, kvw, ffn) = (cfg.hidden, cfg.kv_heads * cfg.head_dim, cfg.ffn);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let names = |s: &[&str]| -> Vec<String> {
                s.iter().map(|n| format!("{p}.{n}.weight")).collect()
            };
            let qkv = ld.fused(&names(&["attn_q", "attn_k", "attn_v"]), &[h, kvw, kvw], h)?;
            let o = ld.linear(&format!("{p}.attn_output.weight"), h, h)?;
            let gate_up = ld.fused(&names(&["ffn_gate", "ffn_up"]), &[ffn, ffn], h)?;
            let down = ld.linear(&format!("{p}.ffn_down.weight"), h, ffn)?;
            let attn_norm = ld
                .vector(&format!("{p}.attn_norm.weight"), h)?
                .ok_or_else(|| Error::BadModel(format!("{p}.attn_norm.weight missing")))?;
            let ffn_norm = ld
                .vector(&format!("{p}.ffn_norm.weight"), h)?
                .ok_or_else(|| Error::BadModel(format!("{p}.ffn_norm.weight missing")))?;
            let bq = ld.vector(&format!("{p}.attn_q.bias"), h)?;
            let bk = ld.vector(&format!("{p}.attn_k.bias"), kvw)?;
            let bv = ld.vector(&format!("{p}.attn_v.bias"), kvw)?;
            let qkv_bias = if bq.is_some() || bk.is_some() || bv.is_some() {
                let mut b = bq.unwrap_or_else(|| vec![0.0; h]);
                b.extend(bk.unwrap_or_else(|| vec![0.0; kvw]));
                b.extend(bv.unwrap_or_else(|| vec![0.0; kvw]));
                Some(b)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm,
                qkv,
                qkv_bias,
                o,
                ffn_norm,
                gate_up,
                down,
            });
        }
        let out_norm = ld
            .vector("output_norm.weight", h)?
            .ok_or_else(|| Error::BadModel("output_norm.weight missing".to_string()))?;
        let emb = ld.raw("token_embd.weight", cfg.vocab, h)?;
        let lm_head = if c.tensor_infos.contains_key("output.weight") {
            ld.linear("output.weight", cfg.vocab, h)?
        } else {
            match &emb {
                Raw::Blocks(b) => ld.finish(Raw::Blocks(b.clone()))?,
                Raw::F32(w, ..) => ld.finish(Raw::F32(w.clone(), cfg.vocab, h))?,
            }
        };
        let embed = match emb {
            Raw::Blocks(b) => Embed::Blocks(b),
            Raw::F32(w, ..) => Embed::F16(w.iter().map(|&x| f16::from_f32(x)).collect()),
        };
        let active = vec![true; cfg.layers];
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_base, cfg.context);
        let requantised = ld.requantised;
        Ok(Model {
            cfg,
            regime,
            embed,
            layers,
            out_norm,
            lm_head,
            rope,
            active,
            requantised,
        })
    }

    /// Bytes of weights one decoded token reads (every linear layer and the LM head).
    pub fn weight_bytes(&self) -> usize {
        let proj = |p: &Proj| match p {
            Proj::Fused(l) => l.bytes(),
            Proj::Split(v) => v.iter().map(|l| l.bytes()).sum(),
        };
        self.layers
            .iter()
            .map(|l| proj(&l.qkv) + l.o.bytes() + proj(&l.gate_up) + l.down.bytes())
            .sum::<usize>()
            + self.lm_head.bytes()
    }

    /// Mean storage bits per weight of the linear layers and LM head.
    pub fn bits_per_weight(&self) -> f64 {
        let c = &self.cfg;
        let kvw = c.kv_heads * c.head_dim;
        let per_layer =
            c.hidden * (c.hidden + 2 * kvw) + c.hidden * c.hidden + 3 * c.hidden * c.ffn;
        let n = c.layers * per_layer + c.vocab * c.hidden;
        8.0 * self.weight_bytes() as f64 / n as f64
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
}

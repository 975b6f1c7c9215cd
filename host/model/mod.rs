//! A decoder-only transformer (llama and qwen2 architectures) read from GGUF and run on the CPU
//! backend's fast paths: GGUF weights dequantised by candle-core's quantized module, linear layers
//! re-stored in one of speckv's weight regimes (FP16 / INT8 / NF4) and multiplied by the fused
//! dequantise-GEMV, RMSNorm, RoPE (llama: adjacent pairs; qwen2: halves), grouped-query attention
//! over a KV cache that rolls back rejected positions, SwiGLU, q/k/v biases where the architecture
//! has them, tied or separate LM head.
//!
//! GGUF files are untrusted input: reading goes through candle-core's bounds-checked parser, and any
//! panic inside it is caught and turned into an error.

pub mod tokenizer;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use half::f16;

use crate::error::{Error, Result};
use crate::weights::quant::{Format, QMatrix};

/// Architecture hyper-parameters from GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Config {
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub vocab: usize,
    pub context: usize,
}

/// Reads the GGUF header (metadata and tensor table) of `path`, rejecting malformed input with an
/// error — never a panic.
pub fn read_gguf(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|source| Error::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    let mut r = BufReader::new(file);
    let c = guarded(|| Content::read(&mut r))
        .map_err(|e| Error::Other(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    Ok((c, r))
}

/// Runs a candle call, turning both its errors and any panic into speckv errors.
pub fn guarded<T>(f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Other(e.to_string())),
        Err(_) => Err(Error::Other(
            "the GGUF reader panicked on malformed input".to_string(),
        )),
    }
}

impl Config {
    pub fn from_gguf(c: &Content) -> Result<Config> {
        let arch = c
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| Error::Other("GGUF metadata lacks general.architecture".to_string()))?;
        if arch != "llama" && arch != "qwen2" {
            return Err(Error::Other(format!(
                "architecture {arch:?} is not supported (llama, qwen2)"
            )));
        }
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            c.metadata
                .get(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| Error::Other(format!("GGUF metadata lacks {key}")))
        };
        let f = |k: &str, d: f32| {
            c.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(d)
        };
        let (hidden, heads) = (u("embedding_length")?, u("attention.head_count")?);
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let vocab = match c.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims()[0],
            None => return Err(Error::Other("GGUF lacks token_embd.weight".to_string())),
        };
        let cfg = Config {
            layers: u("block_count")?,
            hidden,
            ffn: u("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            rope_base: f("rope.freq_base", 10_000.0),
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
            vocab,
            context: u("context_length").unwrap_or(4096),
            arch,
        };
        if cfg.heads == 0
            || cfg.kv_heads == 0
            || cfg.heads % cfg.kv_heads != 0
            || cfg.hidden % cfg.heads != 0
            || cfg.head_dim % 2 != 0
            || cfg.layers == 0
        {
            return Err(Error::Other(format!(
                "inconsistent model configuration {cfg:?}"
            )));
        }
        Ok(cfg)
    }
}

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

fn load_f32(c: &Content, r: &mut BufReader<File>, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let q = guarded(|| c.tensor(r, name, &Device::Cpu))
        .map_err(|e| Error::Other(format!("tensor {name}: {e}")))?;
    let dims = q.shape().dims().to_vec();
    let t = guarded(|| q.dequantize(&Device::Cpu))
        .map_err(|e| Error::Other(format!("tensor {name}: {e}")))?;
    let v = guarded(|| t.flatten_all()?.to_vec1::<f32>())?;
    Ok((v, dims))
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
                    return Err(Error::Other(format!(
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
                    return Err(Error::Other(format!(
                        "tensor {name} has {} values, expected {n}",
                        v.len()
                    )));
                }
                Ok(Some(v))
            };
            let attn_norm = vec1(format!("{p}.attn_norm.weight"), h)?
                .ok_or_else(|| Error::Other(format!("{p}.attn_norm.weight missing")))?;
            let ffn_norm = vec1(format!("{p}.ffn_norm.weight"), h)?
                .ok_or_else(|| Error::Other(format!("{p}.ffn_norm.weight missing")))?;
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
        let (out_norm, _) = load_f32(&c, &mut r, "output_norm.weight")?;
        let (emb, dims) = load_f32(&c, &mut r, "token_embd.weight")?;
        if dims != [cfg.vocab, h] {
            return Err(Error::Other(format!(
                "token_embd.weight has shape {dims:?}"
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

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], h: usize) {
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = (*v as f64 * s) as f32 * g;
        }
    }
}

fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in y.chunks_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
}

/// Rotary embedding in place on `[m, heads, hd]` at positions pos0.., llama's adjacent pairs
/// (GGUF stores llama's q/k permuted for them) or qwen2's halves (`neox`).
fn rope(x: &mut [f32], heads: usize, hd: usize, pos0: usize, base: f32, neox: bool) {
    let half = hd / 2;
    for (i, row) in x.chunks_mut(heads * hd).enumerate() {
        let pos = (pos0 + i) as f64;
        for head in row.chunks_mut(hd) {
            for j in 0..half {
                let theta = pos * (base as f64).powf(-2.0 * j as f64 / hd as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = if neox {
                    (j, j + half)
                } else {
                    (2 * j, 2 * j + 1)
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * c - x1 * s) as f32;
                head[b] = (x0 * s + x1 * c) as f32;
            }
        }
    }
}

/// Causal grouped-query attention of m new positions over the cache.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    m: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let kvw = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; m * heads * hd];
    let mut scores = Vec::new();
    for i in 0..m {
        let n = pos0 + i + 1; // positions visible to query i
        for h in 0..heads {
            let kvh = h / group;
            let qv = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            scores.clear();
            let mut mx = f32::NEG_INFINITY;
            for p in 0..n {
                let kv = &kc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                let s = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(s);
                scores.push(s);
            }
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - mx).exp();
                z += *s;
            }
            let o = &mut out[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            for (p, s) in scores.iter().enumerate() {
                let w = s / z;
                let vv = &vc[p * kvw + kvh * hd..p * kvw + (kvh + 1) * hd];
                for (a, b) in o.iter_mut().zip(vv) {
                    *a += w * b;
                }
            }
        }
    }
    out
}

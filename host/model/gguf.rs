//! GGUF input: the header and tensor table through candle-core's bounds-checked parser (any panic
//! inside it caught and turned into an error), the architecture's hyper-parameters, tensors
//! dequantised to f32.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;

use crate::error::{Error, Result};

/// Architecture hyper-parameters from GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
            .ok_or_else(|| {
                Error::BadModel("GGUF metadata lacks general.architecture".to_string())
            })?;
        if arch != "llama" && arch != "qwen2" {
            return Err(Error::BadModel(format!(
                "architecture {arch:?} is not supported (llama, qwen2)"
            )));
        }
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            c.metadata
                .get(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| Error::BadModel(format!("GGUF metadata lacks {key}")))
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
            Some(t) => match t.shape.dims() {
                [v, h] if *v > 0 && *h == hidden => *v,
                d => {
                    return Err(Error::BadModel(format!(
                        "token_embd.weight has shape {d:?}, expected [vocab ≥ 1, {hidden}] \
                         ({arch}.embedding_length = {hidden})"
                    )))
                }
            },
            None => return Err(Error::BadModel("GGUF lacks token_embd.weight".to_string())),
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
        let why = if cfg.layers == 0 || cfg.hidden == 0 || cfg.ffn == 0 {
            Some("block_count, embedding_length and feed_forward_length must be at least 1")
        } else if cfg.heads == 0 || cfg.kv_heads == 0 || !cfg.heads.is_multiple_of(cfg.kv_heads) {
            Some("head_count must be a positive multiple of head_count_kv")
        } else if !cfg.hidden.is_multiple_of(cfg.heads) || !cfg.head_dim.is_multiple_of(2) {
            Some("embedding_length / head_count must be an even whole number (RoPE pairs)")
        } else if cfg.layers > 4096
            || cfg.hidden > 1 << 16
            || cfg.ffn > 1 << 18
            || cfg.vocab > 1 << 22
        {
            Some("a dimension is beyond any model this reader supports")
        } else if !(cfg.rope_base.is_finite()
            && cfg.rope_base > 0.0
            && cfg.rms_eps.is_finite()
            && cfg.rms_eps >= 0.0)
        {
            Some("rope.freq_base must be positive and the RMS epsilon non-negative, both finite")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::BadModel(format!("{why}: {cfg:?}")));
        }
        Ok(cfg)
    }
}

pub(super) fn load_f32(
    c: &Content,
    r: &mut BufReader<File>,
    name: &str,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let q = guarded(|| c.tensor(r, name, &Device::Cpu))
        .map_err(|e| Error::BadModel(format!("tensor {name}: {e}")))?;
    let dims = q.shape().dims().to_vec();
    let t = guarded(|| q.dequantize(&Device::Cpu))
        .map_err(|e| Error::BadModel(format!("tensor {name}: {e}")))?;
    let v = guarded(|| t.flatten_all()?.to_vec1::<f32>())?;
    Ok((v, dims))
}

/// A tensor's GGUF type, its bytes as stored (blocks), and its shape `[out, in]`.
pub(super) fn load_raw(
    c: &Content,
    r: &mut BufReader<File>,
    name: &str,
) -> Result<(
    Option<candle_core::quantized::GgmlDType>,
    Vec<u8>,
    Vec<usize>,
)> {
    let q = guarded(|| c.tensor(r, name, &Device::Cpu))
        .map_err(|e| Error::BadModel(format!("tensor {name}: {e}")))?;
    let dims = q.shape().dims().to_vec();
    let bytes = guarded(|| q.data().map(|d| d.into_owned()))
        .map_err(|e| Error::BadModel(format!("tensor {name}: {e}")))?;
    Ok((Some(q.dtype()), bytes, dims))
}

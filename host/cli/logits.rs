//! `speckv logits`: next-token logits of a model on given token ids, written as raw little-endian
//! f32 `[rows, vocab]` — what scripts/llamacpp_peer.py compares with llama.cpp's, teacher-forced.

use std::io::Write;
use std::path::PathBuf;

use speckv::model::{KvCache, Model};
use speckv::weights::Regime;
use speckv::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Weight regime.
    #[arg(long, value_enum, default_value_t = Regime::Gguf)]
    target: Regime,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Keep the logits of positions from this index on (after token `from`, predicting `from + 1`).
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// Output file: raw f32 `[rows, vocab]`.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if a.from >= a.tokens.len() {
        return Err(Error::Other(format!(
            "--from {} is beyond the {} tokens",
            a.from,
            a.tokens.len()
        )));
    }
    let m = Model::load(&a.model, a.target)?;
    let mut cache = KvCache::new(&m.cfg);
    cache.reserve(a.tokens.len());
    let keep = a.tokens.len() - a.from;
    let logits = m.forward(&a.tokens, &mut cache, keep)?;
    let mut f = std::fs::File::create(&a.out).map_err(|source| Error::Io {
        context: format!("creating {}", a.out.display()),
        source,
    })?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    f.write_all(&bytes).map_err(|source| Error::Io {
        context: format!("writing {}", a.out.display()),
        source,
    })?;
    println!(
        "{}",
        serde_json::json!({"rows": keep, "vocab": m.cfg.vocab, "regime": a.target.name()})
    );
    Ok(())
}

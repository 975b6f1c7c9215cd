//! The GPT-2-style byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.*`), built with the
//! `tokenizers` crate, plus the ChatML prompt format of the instruct models speckv runs
//! (SmolLM2 and Qwen2.5 both use `<|im_start|>role\n…<|im_end|>`).

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};

/// Qwen2's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Tokens that end a turn (eos and `<|im_end|>` / `<|endoftext|>` when present).
    pub stop: Vec<u32>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::Other(format!("GGUF metadata lacks {key}")))
}

fn bad(key: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("GGUF metadata {key}: {e}"))
}

impl Tokenizer {
    pub fn from_gguf(c: &Content) -> Result<Tokenizer> {
        let model = meta(c, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        if model != "gpt2" {
            return Err(Error::Other(format!(
                "tokenizer model {model:?} is not supported (only GPT-2-style BPE)"
            )));
        }
        let tokens: Vec<String> = meta(c, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.tokens", e))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("tokenizer.ggml.tokens", e))?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad("token_type", e))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let merges: Vec<(String, String)> = meta(c, "tokenizer.ggml.merges")?
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.merges", e))?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(|e| bad("merges", e))?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| bad("merges", format!("{s:?} is not two tokens")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad("BPE", e))?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = c
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if pre == "qwen2" {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| bad("pre-tokenizer", e))?;
            inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]))));
        } else {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |k: &str| c.metadata.get(k).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| Error::Other("GGUF metadata lacks an eos token".to_string()))?;
        let mut stop = vec![eos];
        for s in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(t) = inner.token_to_id(s) {
                if !stop.contains(&t) {
                    stop.push(t);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            stop,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// An instruct prompt in ChatML: the user's message, then the assistant's turn opened.
    pub fn chat_prompt(user: &str) -> String {
        format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    }
}

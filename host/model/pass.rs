//! A model's forward pass together with its decode state, wherever it runs: the CPU pass over a
//! [`KvCache`], or the device program ([`device`](super::device)) on CUDA or on the emulator. The
//! decode loops drive a [`Pass`], so `generate`, `profile` and `bench decode` run on any of them.

use super::{Config, KvCache, Model};
use crate::error::{Error, Result};
use crate::weights::cpu::MAX_M;

/// A forward pass with its KV cache.
pub trait Pass {
    /// Appends `tokens` and returns the logits `[keep, vocab]` of the last `keep` positions,
    /// borrowed until the next call.
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]>;
    /// Positions in the cache.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets every position from `len` on (rejected drafts).
    fn truncate(&mut self, len: usize);
    /// Makes room for `positions` in total (an error where the cache cannot grow that far).
    fn reserve(&mut self, positions: usize) -> Result<()>;
    /// The model's hyper-parameters.
    fn cfg(&self) -> &Config;
    /// Where the pass runs ("cpu", "cuda", "emulator").
    fn backend(&self) -> &'static str;
}

/// The CPU forward pass ([`Model::forward_into`]) over its own cache, optionally through a subset
/// of the layers (a self-speculative draft).
pub struct CpuPass<'m> {
    model: &'m Model,
    cache: KvCache,
    active: Option<&'m [bool]>,
    /// Logits of a call keeping more than `MAX_M` rows (scoring a text), owned.
    wide: Vec<f32>,
}

impl<'m> CpuPass<'m> {
    pub fn new(model: &'m Model, active: Option<&'m [bool]>) -> CpuPass<'m> {
        CpuPass {
            model,
            cache: KvCache::new(&model.cfg),
            active,
            wide: Vec::new(),
        }
    }
}

impl Pass for CpuPass<'_> {
    fn run(&mut self, tokens: &[u32], keep: usize) -> Result<&[f32]> {
        if keep <= MAX_M {
            return self
                .model
                .forward_into(tokens, &mut self.cache, keep, self.active);
        }
        self.wide = self
            .model
            .forward_layers(tokens, &mut self.cache, keep, self.active)?;
        Ok(&self.wide)
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len)
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        self.cache.reserve(positions);
        Ok(())
    }
    fn cfg(&self) -> &Config {
        &self.model.cfg
    }
    fn backend(&self) -> &'static str {
        "cpu"
    }
}

/// `positions` fit a device cache allocated for `capacity` (device caches do not grow: the graph
/// and the kernels' parameters hold their addresses).
pub(crate) fn fixed_capacity(positions: usize, capacity: usize) -> Result<()> {
    if positions > capacity {
        return Err(Error::Other(format!(
            "{positions} positions requested of a device KV cache allocated for {capacity}"
        )));
    }
    Ok(())
}

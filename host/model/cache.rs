//! Per-sequence state of the forward pass: the KV cache (f16, rows of every layer's keys and values
//! by position, rolled back by length) and every buffer a forward pass of up to `MAX_M` positions
//! writes, allocated once so the decode loop allocates nothing. A batched CPU state
//! ([`CpuPass::new_batch`](super::CpuPass::new_batch)) holds one [`Kv`] per sequence and one
//! [`Work`] for all of them: a step's `B · m ≤ MAX_M` rows share the products.

use half::f16;

use super::Config;
use crate::weights::cpu::{Acts, MAX_M};

/// Positions a new cache holds before it first grows.
const INITIAL_POSITIONS: usize = 256;

/// Scratch of one forward chunk.
pub(super) struct Work {
    pub x: Vec<f32>,
    pub xn: Vec<f32>,
    pub qkv: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Attention output, per head `[heads, m, hd]`, then by position `[m, heads · hd]`.
    pub att_h: Vec<f32>,
    pub att: Vec<f32>,
    pub o: Vec<f32>,
    pub gu: Vec<f32>,
    pub act: Vec<f32>,
    pub logits: Vec<f32>,
    /// `[out, m]` scratch of the products.
    pub yt: Vec<f32>,
    pub acts: Acts,
    /// Attention scores, one row per head as long as the longest cache's capacity.
    pub scores: Vec<f32>,
    heads: usize,
}

impl Work {
    pub(super) fn new(cfg: &Config) -> Work {
        let (h, kvw) = (cfg.hidden, cfg.kv_heads * cfg.head_dim);
        let qkv = h + 2 * kvw;
        let widest = cfg.vocab.max(2 * cfg.ffn).max(qkv);
        let m = MAX_M;
        Work {
            x: vec![0.0; m * h],
            xn: vec![0.0; m * h],
            qkv: vec![0.0; m * qkv],
            q: vec![0.0; m * h],
            k: vec![0.0; m * kvw],
            v: vec![0.0; m * kvw],
            att_h: vec![0.0; m * h],
            att: vec![0.0; m * h],
            o: vec![0.0; m * h],
            gu: vec![0.0; m * 2 * cfg.ffn],
            act: vec![0.0; m * cfg.ffn],
            logits: vec![0.0; m * cfg.vocab],
            yt: vec![0.0; m * widest],
            acts: Acts::new(h.max(cfg.ffn)),
            scores: Vec::new(),
            heads: cfg.heads,
        }
    }

    /// Score rows for caches of up to `capacity` positions (grows only).
    pub(super) fn fit_scores(&mut self, capacity: usize) {
        if self.scores.len() < self.heads * capacity {
            self.scores.resize(self.heads * capacity, 0.0);
        }
    }
}

/// One sequence's keys and values of every position so far, per layer, in f16 (its length is
/// kept beside it: [`KvCache::len`], or a batched state's lengths).
pub(super) struct Kv {
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
    pub width: usize,
    pub capacity: usize,
}

impl Kv {
    pub(super) fn new(cfg: &Config) -> Kv {
        let mut kv = Kv {
            k: vec![Vec::new(); cfg.layers],
            v: vec![Vec::new(); cfg.layers],
            width: cfg.kv_heads * cfg.head_dim,
            capacity: 0,
        };
        kv.reserve(INITIAL_POSITIONS);
        kv
    }

    /// Room for `positions` in total (growth at least doubles, and copies).
    pub(super) fn reserve(&mut self, positions: usize) {
        if positions <= self.capacity {
            return;
        }
        let cap = positions.max(2 * self.capacity);
        for l in 0..self.k.len() {
            self.k[l].resize(cap * self.width, f16::ZERO);
            self.v[l].resize(cap * self.width, f16::ZERO);
        }
        self.capacity = cap;
    }
}

/// Per-sequence attention state: keys and values of every position so far, and the forward
/// pass's buffers.
pub struct KvCache {
    pub(super) kv: Kv,
    pub(super) len: usize,
    pub(super) work: Work,
}

impl KvCache {
    pub fn new(cfg: &Config) -> KvCache {
        let mut c = KvCache {
            kv: Kv::new(cfg),
            len: 0,
            work: Work::new(cfg),
        };
        c.work.fit_scores(c.kv.capacity);
        c
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `positions` in total, so a decode loop that reserved its length up front
    /// never grows the cache (growth copies; it is the only allocation of a forward pass).
    pub fn reserve(&mut self, positions: usize) {
        self.kv.reserve(positions);
        self.work.fit_scores(self.kv.capacity);
    }

    /// Forgets every position from `len` on (rejected draft tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = len.min(self.len);
    }
}

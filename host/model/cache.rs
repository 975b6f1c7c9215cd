//! Per-sequence state of the forward pass: the KV cache (f16, rows of every layer's keys and values
//! by position, rolled back by length) and every buffer a forward pass of up to `MAX_M` positions
//! writes, allocated once so the decode loop allocates nothing.

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
    /// Attention scores, one row of `capacity` per head.
    pub scores: Vec<f32>,
}

/// Per-sequence attention state: keys and values of every position so far, per layer, in f16.
pub struct KvCache {
    pub(super) k: Vec<Vec<f16>>,
    pub(super) v: Vec<Vec<f16>>,
    pub(super) width: usize,
    pub(super) len: usize,
    pub(super) capacity: usize,
    heads: usize,
    pub(super) work: Work,
}

impl KvCache {
    pub fn new(cfg: &Config) -> KvCache {
        let (h, kvw) = (cfg.hidden, cfg.kv_heads * cfg.head_dim);
        let qkv = h + 2 * kvw;
        let widest = cfg.vocab.max(2 * cfg.ffn).max(qkv);
        let m = MAX_M;
        let mut c = KvCache {
            k: vec![Vec::new(); cfg.layers],
            v: vec![Vec::new(); cfg.layers],
            width: kvw,
            len: 0,
            capacity: 0,
            heads: cfg.heads,
            work: Work {
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
            },
        };
        c.reserve(INITIAL_POSITIONS);
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
        if positions <= self.capacity {
            return;
        }
        let cap = positions.max(2 * self.capacity);
        for l in 0..self.k.len() {
            self.k[l].resize(cap * self.width, f16::ZERO);
            self.v[l].resize(cap * self.width, f16::ZERO);
        }
        self.work.scores.resize(self.heads * cap, 0.0);
        self.capacity = cap;
    }

    /// Forgets every position from `len` on (rejected draft tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = len.min(self.len);
    }
}

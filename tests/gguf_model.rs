//! The `gguf` regime on SmolLM2-135M-Instruct (Q4_1 / Q8_0 blocks as stored; skipped with a
//! message where the model has not been fetched):
//! - its logits against a float64 evaluation of the dequantised GGUF (candle-core's decoding, an
//!   independent f64 transformer written here), within a stated tolerance;
//! - the decode loop's forward pass allocates nothing (a counting global allocator).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use speckv::decode::batch::{plain_batch, speculative_batch};
use speckv::model::{CpuPass, KvCache, Model};
use speckv::weights::Regime;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests of this file run one at a time, so one's allocations never count in the other's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

use common::smollm2;

/// Tensor `name` dequantised by candle-core, as f64.
fn tensor(c: &Content, r: &mut std::fs::File, name: &str) -> Vec<f64> {
    let q = c.tensor(r, name, &Device::Cpu).unwrap();
    let t = q.dequantize(&Device::Cpu).unwrap();
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f64::from).collect()
}

/// y[o] = Σ_i W[o, i] x[i].
fn mv(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let s = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v / s * g).collect()
}

/// The last position's logits of `tokens` in float64 (llama architecture, adjacent-pair RoPE).
fn reference_logits(path: &PathBuf, tokens: &[u32]) -> Vec<f64> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let cfg = speckv::model::Config::from_gguf(&c).unwrap();
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let (nh, nkv) = (cfg.heads, cfg.kv_heads);
    let eps = cfg.rms_eps as f64;
    let emb = tensor(&c, &mut f, "token_embd.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            for j in 0..hd / 2 {
                let th = pos as f64 * (cfg.rope_base as f64).powf(-2.0 * j as f64 / hd as f64);
                let (s, co) = th.sin_cos();
                let (a, b) = (head[2 * j], head[2 * j + 1]);
                head[2 * j] = a * co - b * s;
                head[2 * j + 1] = a * s + b * co;
            }
        }
    };
    for l in 0..cfg.layers {
        let w = |n: &str, f: &mut std::fs::File| tensor(&c, f, &format!("blk.{l}.{n}.weight"));
        let (wq, wk, wv, wo) = (
            w("attn_q", &mut f),
            w("attn_k", &mut f),
            w("attn_v", &mut f),
            w("attn_output", &mut f),
        );
        let (wg, wu, wd) = (
            w("ffn_gate", &mut f),
            w("ffn_up", &mut f),
            w("ffn_down", &mut f),
        );
        let (an, fnorm) = (w("attn_norm", &mut f), w("ffn_norm", &mut f));
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let mut qs = Vec::new();
        for (p, x) in xs.iter().enumerate() {
            let xn = rms(x, &an, eps);
            let (mut q, mut k) = (mv(&wq, &xn), mv(&wk, &xn));
            rope(&mut q, p);
            rope(&mut k, p);
            qs.push(q);
            ks.push(k);
            vs.push(mv(&wv, &xn));
        }
        for (p, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; h];
            for hh in 0..nh {
                let g = hh / (nh / nkv);
                let q = &qs[p][hh * hd..(hh + 1) * hd];
                let sc: Vec<f64> = (0..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][g * hd..(g + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
                for (j, s) in sc.iter().enumerate() {
                    let wgt = (s - mx).exp() / z;
                    for d in 0..hd {
                        att[hh * hd + d] += wgt * vs[j][g * hd + d];
                    }
                }
            }
            for (a, o) in x.iter_mut().zip(mv(&wo, &att)) {
                *a += o;
            }
            let xn = rms(x, &fnorm, eps);
            let (g, u) = (mv(&wg, &xn), mv(&wu, &xn));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (a, o) in x.iter_mut().zip(mv(&wd, &act)) {
                *a += o;
            }
        }
    }
    let on = tensor(&c, &mut f, "output_norm.weight");
    let head = if c.tensor_infos.contains_key("output.weight") {
        tensor(&c, &mut f, "output.weight")
    } else {
        emb
    };
    mv(&head, &rms(xs.last().unwrap(), &on, eps))
}

/// KL divergence of softmax(b) from softmax(a).
fn kl(a: &[f64], b: &[f64]) -> f64 {
    let lse = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(a), lse(b));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - la).exp() * ((x - la) - (y - lb)))
        .sum()
}

/// Tolerance of the `gguf` regime against float64 (8-bit activations, f16 KV cache, f32 sums): the
/// KL divergence of its next-token distribution from float64's, in nats (measured: 0.00024 on
/// this prompt). The raw logits' relative RMS error is no measure here: it is dominated by a
/// shift common to every logit, which the distribution does not see (measured 0.14, FP16 0.003).
const KL_NATS: f64 = 0.005;

#[test]
fn gguf_regime_logits_match_float64_of_the_dequantised_gguf() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = smollm2() else { return };
    let tokens = [1u32, 9690, 198, 2683, 314, 253, 5248, 30, 2, 198];
    let want = reference_logits(&p, &tokens);
    let m = Model::load(&p, Regime::Gguf).unwrap();
    let mut cache = KvCache::new(&m.cfg);
    let got = m.forward(&tokens, &mut cache, 1).unwrap();
    let num: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let rel = (num / den).sqrt();
    let argmax = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let g64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    let kl = kl(&want, &g64);
    eprintln!("KL(float64 ‖ gguf) = {kl:.5} nats");
    eprintln!("gguf regime vs float64: relative RMS error of the logits {rel:.5}");
    assert!(kl < KL_NATS, "KL {kl} nats");
    assert_eq!(argmax(&g64), argmax(&want), "top-1 differs");
}

#[test]
fn the_decode_loop_forward_pass_allocates_nothing() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = smollm2() else { return };
    for regime in [Regime::Gguf, Regime::Int8] {
        let m = Model::load(&p, regime).unwrap();
        let mut cache = KvCache::new(&m.cfg);
        cache.reserve(64);
        let prompt: Vec<u32> = (1..20).collect();
        m.forward_into(&prompt, &mut cache, 1, None).unwrap();
        // Warm every path once: a decoding step, a verification step, a rollback.
        m.forward_into(&[5], &mut cache, 1, None).unwrap();
        m.forward_into(&[6, 7, 8, 9, 10], &mut cache, 5, None)
            .unwrap();
        cache.truncate(cache.len() - 3);
        // The decode loop runs on a pool thread (as `decode::` does), so the products' parallel
        // jobs go to its own deque rather than the pool's injector queue, which allocates.
        let n = rayon::scope(|_| {
            let before = ALLOCS.load(Ordering::SeqCst);
            for step in 0..8u32 {
                m.forward_into(&[11 + step], &mut cache, 1, None).unwrap();
                let l = m
                    .forward_into(&[20, 21, 22, 23, 24], &mut cache, 5, None)
                    .unwrap();
                assert_eq!(l.len(), 5 * m.cfg.vocab);
                cache.truncate(cache.len() - 4);
            }
            ALLOCS.load(Ordering::SeqCst) - before
        });
        assert_eq!(n, 0, "{regime:?}: {n} allocations in 16 forward passes");
    }
}

#[test]
fn greedy_plain_decoding_allocates_nothing_per_token() {
    // The whole decode call's allocations do not grow with the number of tokens: the loop itself
    // (forward pass, argmax, the token pushed into reserved room) allocates nothing.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = smollm2() else { return };
    let m = Model::load(&p, Regime::Gguf).unwrap();
    let prompt: Vec<u32> = (100..120).collect();
    let count = |n: usize| {
        let cfg = speckv::decode::GenConfig {
            max_tokens: n,
            temperature: 0.0,
            seed: 0,
            gamma_max: 8,
            compression: speckv::controller::records::Compression::Nf4,
            draft_catch_up: None,
        };
        let before = ALLOCS.load(Ordering::SeqCst);
        let out = speckv::decode::plain(&m, &prompt, &[], &cfg).unwrap();
        assert_eq!(out.tokens.len(), n);
        ALLOCS.load(Ordering::SeqCst) - before
    };
    count(2); // warm the pool's queues
              // The least of three calls: the pool's injector queue allocates a block every 63 calls into the
              // pool (one per decode call), which may land in any one call.
    let least = |n: usize| (0..3).map(|_| count(n)).min().unwrap_or(0);
    let (short, long) = (least(4), least(36));
    assert_eq!(
        short, long,
        "4 tokens: {short} allocations, 36 tokens: {long}"
    );
}

#[test]
fn speculative_decoding_allocates_nothing_per_step() {
    // Between one step's trace and the next (a whole step: drafting, statistics, verification, the
    // caches cut back, the trace refilled) nothing is allocated: every buffer is sized before the
    // first step. Two drafts: the target itself (every draft accepted: the backlog path) and the
    // target with a quarter of its layers skipped (drafts rejected).
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = smollm2() else { return };
    let m = Model::load(&p, Regime::Gguf).unwrap();
    let skip: Vec<bool> = (0..m.cfg.layers).map(|l| l % 4 == 3).collect();
    let drafts = [
        ("itself", speckv::decode::Draft::Model(&m)),
        ("skip", speckv::decode::Draft::SkipLayers(skip)),
    ];
    let prompt: Vec<u32> = (100..120).collect();
    for policy in ["fixed:3", "confidence:0.6", "heuristic"] {
        let pl = speckv::decode::Policy::parse(policy, None).unwrap();
        for (name, draft) in &drafts {
            for temperature in [0.0f32, 0.8] {
                let cfg = speckv::decode::GenConfig {
                    max_tokens: 24,
                    temperature,
                    seed: 3,
                    gamma_max: 6,
                    compression: speckv::controller::records::Compression::Nf4,
                    draft_catch_up: None,
                };
                let (mut last, mut steps, mut between, mut drafted) = (None, 0, 0, 0);
                let out = speckv::decode::speculative_traced(
                    &m,
                    draft,
                    &prompt,
                    &[],
                    &pl,
                    &cfg,
                    &mut |t| {
                        let now = ALLOCS.load(Ordering::SeqCst);
                        if let Some(l) = last {
                            between += now - l;
                        }
                        last = Some(now);
                        steps += 1;
                        drafted += t.gamma;
                    },
                )
                .unwrap();
                let label = format!("{policy}, draft {name}, T = {temperature}");
                assert_eq!(out.tokens.len(), 24, "{label}");
                assert!(steps >= 3 && drafted > 0, "{label}: {steps} steps");
                assert_eq!(between, 0, "{label}: allocations in {} steps", steps - 1);
            }
        }
    }
}

#[test]
fn batched_decoding_allocates_nothing_per_token() {
    // The batched loops on the CPU's batched state: a whole decode call's allocations (the states
    // made, the buffers sized, the statistics returned) do not grow with the number of tokens —
    // plain, fixed γ and `auto`, greedy and sampled, three prompts of different lengths.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = smollm2() else { return };
    let m = Model::load(&p, Regime::Gguf).unwrap();
    let skip: Vec<bool> = (0..m.cfg.layers).map(|l| l % 4 != 3).collect();
    let prompts: Vec<Vec<u32>> = vec![(100..120).collect(), (200..205).collect(), vec![7]];
    let fixed = speckv::decode::Policy::parse("fixed:3", None).unwrap();
    let auto = speckv::decode::Policy::parse("auto", None).unwrap();
    let cases = [
        ("plain", None, 0.0f32),
        ("plain", None, 0.8),
        ("fixed:3", Some(&fixed), 0.0),
        ("fixed:3", Some(&fixed), 0.8),
        ("auto", Some(&auto), 0.0),
        ("auto", Some(&auto), 0.8),
    ];
    for (label, policy, temperature) in cases {
        let count = |n: usize| {
            let cfg = speckv::decode::GenConfig {
                max_tokens: n,
                temperature,
                seed: 3,
                gamma_max: 4,
                compression: speckv::controller::records::Compression::Nf4,
                draft_catch_up: None,
            };
            let before = ALLOCS.load(Ordering::SeqCst);
            let mut t = CpuPass::new_batch(&m, None, 3).unwrap();
            let mut d = CpuPass::new_batch(&m, Some(&skip), 3).unwrap();
            let out = match policy {
                Some(p) => speculative_batch(&mut t, &mut d, &prompts, &[], p, &cfg),
                None => plain_batch(&mut t, &prompts, &[], &cfg),
            }
            .unwrap();
            for q in &out.sequences {
                assert_eq!(q.tokens.len(), n);
            }
            ALLOCS.load(Ordering::SeqCst) - before
        };
        count(2); // warm the pool's queues
        let least = |n: usize| (0..2).map(|_| count(n)).min().unwrap_or(0);
        let (short, long) = (least(4), least(16));
        assert_eq!(
            short, long,
            "{label}, T {temperature}: 4 tokens {short} allocations, 16 tokens {long}"
        );
    }
}

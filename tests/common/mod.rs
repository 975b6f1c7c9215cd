//! Shared test helpers: seeded inputs and the CUDA backend when one is present.
#![allow(dead_code)]

use std::io::Write;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use speckv::backend::cuda::CudaBackend;

/// SmolLM2-135M-Instruct (Q4_1) from `scripts/fetch-model smollm2`, or `None` and a visible
/// "skipped" message where it has not been fetched.
pub fn smollm2() -> Option<std::path::PathBuf> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: {} missing (run scripts/fetch-model smollm2)",
            p.display()
        );
        None
    }
}

/// `name` in a folder of the system's temporary directory for this test binary (`tag`) and
/// process, created if needed.
pub fn tmp(tag: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("speckv-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A hazard model whose output is `h` whatever the features (every weight zero, bias `h`).
pub fn constant_hazard(h: f64) -> speckv::controller::hazard::HazardModel {
    use speckv::controller::mlp::{Mlp, HIDDEN, INPUTS};
    speckv::controller::hazard::HazardModel {
        mlp: Mlp {
            w1: [[0.0; HIDDEN]; INPUTS],
            b1: [0.0; HIDDEN],
            w2: [[0.0]; HIDDEN],
            b2: [h],
            feature_mean: [0.0; INPUTS],
            feature_std: [1.0; INPUTS],
        },
        source: "test".into(),
    }
}

/// A traced step (as `speckv profile` records one) that drafted one token per entry of `entropy`
/// and `confidence` and had `accepted` of them accepted.
pub fn trace_step(entropy: &[f32], confidence: &[f32], accepted: u32) -> speckv::decode::StepTrace {
    let g = entropy.len() as u32;
    speckv::decode::StepTrace {
        position: 7,
        entropy: entropy.to_vec(),
        confidence: confidence.to_vec(),
        gamma: g,
        accepted,
        counterfactual: (0..=g).map(|x| accepted.min(x) + 1).collect(),
        verify_seconds: 0.02,
        draft: speckv::controller::hazard::DraftTime::steady(g as usize, 0.01),
        draft_tokens: 0,
        emitted: vec![1; accepted as usize + 1],
        stop_features: Vec::new(),
    }
}

/// Greedy statistics options of drafted position `j` of a step (Philox `seed`, step `j`): the
/// step's first position resets the accumulators, later ones add to them.
pub fn draft_opts(seed: u64, j: usize) -> speckv::StatsOptions {
    speckv::StatsOptions {
        temperature: 0.0,
        sample: false,
        seed,
        step: j as u64,
        accumulate: if j == 0 {
            speckv::Accumulate::Reset
        } else {
            speckv::Accumulate::Add
        },
    }
}

/// Seeded normal logits scaled by `scale`.
pub fn normal_logits(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            scale * z as f32
        })
        .collect()
}

/// Logits on a coarse grid (multiples of 1/4 in [−4, 4]): exact in f16 and bf16, so every dtype
/// sees the same values, sums are exact-ish, and the argmax has ties.
pub fn grid_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.gen_range(-16i32..=16) as f32 * 0.25)
        .collect()
}

/// Why the CUDA backend could not be opened: no driver or no device (a skip), or anything else
/// (bad PTX, a failed module load, a missing entry point, a driver error: a failure).
enum Unavailable {
    NoDevice(String),
    Broken(String),
}

/// The CUDA backend, or `None` (and a visible message) where this machine has no CUDA driver or
/// no device. Any other error opening it fails the calling test. The message goes straight to the
/// process's stderr, past libtest's output capture, so a skipped GPU test is visible in a normal
/// `cargo test` run.
pub fn cuda() -> Option<&'static CudaBackend> {
    static CUDA: OnceLock<Result<CudaBackend, Unavailable>> = OnceLock::new();
    let c = CUDA.get_or_init(|| {
        CudaBackend::new(0).map_err(|e| match e {
            speckv::Error::NoCuda(m) => Unavailable::NoDevice(m),
            other => Unavailable::Broken(other.to_string()),
        })
    });
    match c {
        Ok(c) => Some(c),
        Err(Unavailable::NoDevice(e)) => {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            let _ = writeln!(std::io::stderr(), "{name}: skipped: no CUDA device ({e})");
            None
        }
        Err(Unavailable::Broken(e)) => panic!("the CUDA backend failed to open: {e}"),
    }
}

/// |a − b| within `rel` relative or `abs` absolute.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    let d = (a - b).abs();
    d <= abs || d <= rel * b.abs().max(a.abs())
}

/// A tiny llama-architecture model written as GGUF (F32 tensors): 2 layers, hidden 64, 4 query /
/// 2 key-value heads of 16, FFN 128, vocabulary 512, seeded weights. `edit` may change the
/// metadata and the tensors (name → shape and values) before writing, to make malformed files.
pub mod tiny {
    use std::collections::BTreeMap;
    use std::path::Path;

    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    pub const LAYERS: usize = 2;
    pub const HIDDEN: usize = 64;
    pub const FFN: usize = 128;
    pub const HEADS: usize = 4;
    pub const KV_HEADS: usize = 2;
    pub const VOCAB: usize = 512;

    pub struct Spec {
        pub metadata: BTreeMap<String, Value>,
        pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        super::normal_logits(n, scale, seed)
    }

    pub fn spec(seed: u64) -> Spec {
        let mut metadata = BTreeMap::new();
        let u = |v: u32| Value::U32(v);
        metadata.insert("general.architecture".into(), Value::String("llama".into()));
        metadata.insert("llama.block_count".into(), u(LAYERS as u32));
        metadata.insert("llama.embedding_length".into(), u(HIDDEN as u32));
        metadata.insert("llama.feed_forward_length".into(), u(FFN as u32));
        metadata.insert("llama.attention.head_count".into(), u(HEADS as u32));
        metadata.insert("llama.attention.head_count_kv".into(), u(KV_HEADS as u32));
        metadata.insert("llama.context_length".into(), u(256));
        metadata.insert("llama.rope.freq_base".into(), Value::F32(10_000.0));
        metadata.insert(
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        );
        let mut tensors = BTreeMap::new();
        let kv = KV_HEADS * HIDDEN / HEADS;
        let mut k = seed * 1000;
        let mut add = |name: String, shape: Vec<usize>, scale: f32| {
            k += 1;
            let n = shape.iter().product();
            tensors.insert(name, (shape, values(n, k, scale)));
        };
        add("token_embd.weight".into(), vec![VOCAB, HIDDEN], 1.0);
        for l in 0..LAYERS {
            let p = format!("blk.{l}");
            let s = 1.0 / (HIDDEN as f32).sqrt();
            add(format!("{p}.attn_q.weight"), vec![HIDDEN, HIDDEN], s);
            add(format!("{p}.attn_k.weight"), vec![kv, HIDDEN], s);
            add(format!("{p}.attn_v.weight"), vec![kv, HIDDEN], s);
            add(format!("{p}.attn_output.weight"), vec![HIDDEN, HIDDEN], s);
            add(format!("{p}.ffn_gate.weight"), vec![FFN, HIDDEN], s);
            add(format!("{p}.ffn_up.weight"), vec![FFN, HIDDEN], s);
            add(
                format!("{p}.ffn_down.weight"),
                vec![HIDDEN, FFN],
                1.0 / (FFN as f32).sqrt(),
            );
        }
        let mut spec = Spec { metadata, tensors };
        for l in 0..LAYERS {
            for n in ["attn_norm", "ffn_norm"] {
                spec.tensors.insert(
                    format!("blk.{l}.{n}.weight"),
                    (vec![HIDDEN], vec![1.0; HIDDEN]),
                );
            }
        }
        spec.tensors.insert(
            "output_norm.weight".into(),
            (vec![HIDDEN], vec![1.0; HIDDEN]),
        );
        spec
    }

    /// Writes `spec` as a GGUF file: into a file of this thread's, then renamed into place, so a
    /// test reading `path` while another rewrites it (the same tiny model) sees a whole file.
    pub fn write(spec: &Spec, path: &Path) {
        let qs: Vec<(String, QTensor)> = spec
            .tensors
            .iter()
            .map(|(name, (shape, v))| {
                let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap();
                (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
            })
            .collect();
        let md: Vec<(&str, &Value)> = spec.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let part = path.with_extension(format!("part-{:?}", std::thread::current().id()));
        let mut f = std::fs::File::create(&part).unwrap();
        gguf_file::write(&mut f, &md, &ts).unwrap();
        drop(f);
        std::fs::rename(&part, path).unwrap();
    }
}

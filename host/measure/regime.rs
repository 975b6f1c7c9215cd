//! The compression regimes compared at the kernel level: GEMV time per regime on model-shaped
//! layers, the verification step time of a Llama-3-8B-shaped target estimated from them, the γ
//! decision's share of that step, and (`speckv bench step`) the cost model the `speckv-cost` policy
//! reads: draft time per token and verification time as a function of γ, per regime.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, StudentT};
use serde::Serialize;

use crate::backend::Backend;
use crate::controller::CostModel;
use crate::error::Result;
use crate::weights::cpu::{matmul, Acts, Linear};
use crate::weights::ggml::{self, BlockType};
use crate::weights::quant::{relative_rms_error, Format, QMatrix};

/// A linear layer of a model: (name, out, in, how many per transformer layer).
pub type Shape = (&'static str, usize, usize, usize);

/// Llama-3-8B: 32 layers, hidden 4096, 8 KV heads of 128, MLP 14336.
pub const LLAMA3_8B: [Shape; 4] = [
    ("q,o 4096×4096", 4096, 4096, 2),
    ("k,v 1024×4096", 1024, 4096, 2),
    ("gate,up 14336×4096", 14336, 4096, 2),
    ("down 4096×14336", 4096, 14336, 1),
];
pub const LLAMA3_8B_LAYERS: usize = 32;
/// Llama-3.2-1B (the paper's draft): 16 layers, hidden 2048, 8 KV heads of 64, MLP 8192.
pub const LLAMA32_1B: [Shape; 4] = [
    ("q,o 2048×2048", 2048, 2048, 2),
    ("k,v 512×2048", 512, 2048, 2),
    ("gate,up 8192×2048", 8192, 2048, 2),
    ("down 2048×8192", 2048, 8192, 1),
];
pub const LLAMA32_1B_LAYERS: usize = 16;

/// Uniform random weights in [−1, 1) (GEMV time does not depend on the values).
pub fn random_weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..out * inp)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect()
}

/// Backend-resident matrix ready to time: on the CPU, in the decoding path's storage.
enum Resident {
    Host(Linear),
    Device(crate::backend::cuda::DeviceMatrix, QMatrix),
}

fn resident(backend: &Backend, q: QMatrix) -> Result<Resident> {
    Ok(match backend {
        Backend::Cpu(_) => Resident::Host(Linear::Regime(q)),
        Backend::Cuda(c) => Resident::Device(c.upload_matrix(&q)?, q),
    })
}

/// Mean time of the CPU decoding path's product at `m` (activations quantised once, outside).
fn time_host_product(l: &Linear, m: usize, budget: Duration) -> Result<Duration> {
    let (out, inp) = l.shape();
    let x: Vec<f32> = (0..m * inp)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect();
    let mut acts = Acts::new(inp);
    acts.quantize(&x, m, inp)?;
    let (mut y, mut yt) = (vec![0f32; m * out], vec![0f32; m * out]);
    crate::backend::time_host(budget, 2, || matmul(l, &x, &acts, m, &mut y, &mut yt))
}

/// Mean time of one GEMV at `m` over at least `budget`.
fn time_gemv(backend: &Backend, r: &Resident, m: usize, budget: Duration) -> Result<Duration> {
    match (backend, r) {
        (Backend::Cuda(c), Resident::Device(d, _)) => crate::backend::time_device(budget, |n| {
            c.time_gemv(d, m, n, crate::backend::cuda::GemvVersion::V4)
        }),
        (_, Resident::Host(l)) => time_host_product(l, m, budget),
        (_, Resident::Device(_, q)) => {
            let (_, inp) = q.shape();
            let x = vec![0.5f32; m * inp];
            crate::backend::time_host(budget, 2, || crate::weights::gemv::cpu(q, &x, m))
        }
    }
}

/// One regime's row of the report.
#[derive(Debug, Serialize)]
pub struct RegimeRow {
    pub name: &'static str,
    pub bits_per_weight: f64,
    /// Weight bytes per second of the largest layer (gate/up, 14336×4096) at M = 1.
    pub gemv_gbps: f64,
    /// Estimated verification step (γ = 4: M = 5) of the 8B-shaped target: 32 layers of the four
    /// shapes (attention, norms and the LM head not included).
    pub step_ms: f64,
    /// The same at M = 1 (plain decoding of one token).
    pub decode_ms: f64,
    /// The CPU γ decision's share of `step_ms`.
    pub decision_share: f64,
    /// Per shape: (name, µs at M = 1, µs at M = 5).
    pub layers: Vec<(String, f64, f64)>,
}

/// Relative RMS quantisation error per format on two weight distributions.
#[derive(Debug, Serialize)]
pub struct QuantError {
    pub shape: [usize; 2],
    pub gaussian: Vec<(Format, f64)>,
    pub student_t3: Vec<(Format, f64)>,
}

pub fn quant_error() -> Result<QuantError> {
    let (out, inp) = (256, 4096);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let g: Vec<f32> = (0..out * inp)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect::<Vec<f64>>()
        .into_iter()
        .map(|v| 0.02 * v as f32)
        .collect();
    let t = StudentT::new(3.0).map_err(|e| crate::Error::Other(e.to_string()))?;
    let h: Vec<f32> = (0..out * inp)
        .map(|_| 0.02 * t.sample(&mut rng) as f32)
        .collect();
    let errs = |w: &[f32]| -> Result<Vec<(Format, f64)>> {
        Format::ALL
            .iter()
            .map(|&f| {
                Ok((
                    f,
                    relative_rms_error(w, &QMatrix::quantize(w, out, inp, f, false)?),
                ))
            })
            .collect()
    };
    Ok(QuantError {
        shape: [out, inp],
        gaussian: errs(&g)?,
        student_t3: errs(&h)?,
    })
}

/// The regime table on `backend`, spending about `budget` per timing: FP16, INT8, NF4, and on
/// the CPU backend the `gguf` regime (Q4_K blocks, the usual GGUF storage of an 8B model).
pub fn regimes(backend: &Backend, decision_us: f64, budget: Duration) -> Result<Vec<RegimeRow>> {
    let mut rows = Vec::new();
    let mut kinds: Vec<Option<Format>> = Format::ALL.into_iter().map(Some).collect();
    if matches!(backend, Backend::Cpu(_)) {
        kinds.push(None);
    }
    for kind in kinds {
        let mut layers = Vec::new();
        let (mut step, mut decode, mut gbps) = (0.0, 0.0, 0.0);
        for (k, &(name, out, inp, count)) in LLAMA3_8B.iter().enumerate() {
            let r = match kind {
                Some(format) => {
                    let w = random_weights(out, inp, 10 + k as u64);
                    let q = QMatrix::quantize(&w, out, inp, format, false)?;
                    drop(w);
                    resident(backend, q)?
                }
                None => Resident::Host(Linear::Blocks(ggml::random(
                    BlockType::Q4K,
                    out,
                    inp,
                    10 + k as u64,
                )?)),
            };
            let bytes = match &r {
                Resident::Host(l) => l.bytes(),
                Resident::Device(_, q) => q.bytes(),
            };
            let t1 = time_gemv(backend, &r, 1, budget)?.as_secs_f64();
            let t5 = time_gemv(backend, &r, 5, budget)?.as_secs_f64();
            if out == 14336 {
                gbps = bytes as f64 / t1 / 1e9;
            }
            step += (count * LLAMA3_8B_LAYERS) as f64 * t5;
            decode += (count * LLAMA3_8B_LAYERS) as f64 * t1;
            layers.push((name.to_string(), t1 * 1e6, t5 * 1e6));
        }
        rows.push(RegimeRow {
            name: kind.map_or("gguf (Q4_K)", |f| f.name()),
            bits_per_weight: kind.map_or(BlockType::Q4K.bits_per_weight(), |f| {
                f.bits_per_weight(14336, 4096)
            }),
            gemv_gbps: gbps,
            step_ms: step * 1e3,
            decode_ms: decode * 1e3,
            decision_share: decision_us * 1e-3 / (step * 1e3),
            layers,
        });
    }
    Ok(rows)
}

/// `speckv bench step`: the cost model of one regime — draft time per token (the 1B-shaped draft
/// in FP16 at M = 1; each regime's model also holds its passes fed 2..=8 tokens) and verification
/// time of the 8B-shaped target at M = γ + 1, γ = 0..=8.
#[derive(Debug, Serialize)]
pub struct StepCosts {
    pub backend: &'static str,
    pub device: String,
    pub draft_ms_per_token: f64,
    pub regimes: Vec<(Format, CostModel)>,
}

fn model_ms(
    backend: &Backend,
    shapes: &[Shape],
    layers: usize,
    format: Format,
    ms: &[usize],
    budget: Duration,
) -> Result<Vec<f64>> {
    let mut total = vec![0.0; ms.len()];
    for (k, &(_, out, inp, count)) in shapes.iter().enumerate() {
        let w = random_weights(out, inp, 100 + k as u64);
        let q = QMatrix::quantize(&w, out, inp, format, false)?;
        drop(w);
        let r = resident(backend, q)?;
        for (i, &m) in ms.iter().enumerate() {
            total[i] +=
                (count * layers) as f64 * time_gemv(backend, &r, m, budget)?.as_secs_f64() * 1e3;
        }
    }
    Ok(total)
}

pub fn step_costs(backend: &Backend, budget: Duration) -> Result<StepCosts> {
    // The draft fed n = 1..=DRAFT_CATCH_UP tokens: a step's first pass (`CostModel::draft_feed`).
    let feeds: Vec<usize> = (1..=crate::controller::replay::DRAFT_CATCH_UP).collect();
    let draft_feed_ms = model_ms(
        backend,
        &LLAMA32_1B,
        LLAMA32_1B_LAYERS,
        Format::Fp16,
        &feeds,
        budget,
    )?;
    let draft = draft_feed_ms[0];
    let ms: Vec<usize> = (1..=9).collect();
    let mut regimes = Vec::new();
    for format in Format::ALL {
        let verify = model_ms(backend, &LLAMA3_8B, LLAMA3_8B_LAYERS, format, &ms, budget)?;
        regimes.push((
            format,
            CostModel {
                draft_ms_per_token: draft,
                verify_ms: verify,
                draft_feed_ms: draft_feed_ms.clone(),
                source: format!(
                    "measured by `speckv bench step` on {} ({}): linear layers of a Llama-3.2-1B-shaped fp16 draft (M = 1..=8) and a Llama-3-8B-shaped {} target",
                    backend.name(),
                    backend.device(),
                    format.name()
                ),
            },
        ));
    }
    Ok(StepCosts {
        backend: backend.name(),
        device: backend.device(),
        draft_ms_per_token: draft,
        regimes,
    })
}

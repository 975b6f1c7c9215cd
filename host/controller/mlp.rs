//! SpecKV's acceptance predictor: a 6 → 16 (ReLU) → 1 MLP on (mean draft entropy, mean draft
//! confidence, max draft entropy, min draft confidence, compression code, γ), predicting the
//! acceptance rate at γ. Trained here with feature standardisation, Adam, L2 and early stopping on a
//! validation split grouped by prompt run, deterministically for a seed; saved as JSON in the paper's
//! layout (W1 6×16, b1 16, W2 16×1, b2 1) plus the standardisation, and loaded from that layout as
//! JSON or .npz.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::controller::records::StepRecord;
use crate::error::{Error, Result};

pub const INPUTS: usize = 6;
pub const HIDDEN: usize = 16;

/// The predictor's weights and feature standardisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    #[serde(rename = "W1")]
    pub w1: [[f64; HIDDEN]; INPUTS],
    pub b1: [f64; HIDDEN],
    #[serde(rename = "W2")]
    pub w2: [[f64; 1]; HIDDEN],
    pub b2: [f64; 1],
    /// Features are standardised as (x − mean) / std before the first layer. Absent in the paper's
    /// published layout: then 0 and 1 (raw features).
    #[serde(default = "zeros")]
    pub feature_mean: [f64; INPUTS],
    #[serde(default = "ones")]
    pub feature_std: [f64; INPUTS],
}

fn zeros() -> [f64; INPUTS] {
    [0.0; INPUTS]
}
fn ones() -> [f64; INPUTS] {
    [1.0; INPUTS]
}

impl Mlp {
    /// Predicted acceptance rate for raw features `x` (unclamped; callers clamp to [0, 1]).
    #[inline]
    pub fn predict(&self, x: &[f64; INPUTS]) -> f64 {
        let mut z = [0.0; INPUTS];
        for i in 0..INPUTS {
            z[i] = (x[i] - self.feature_mean[i]) / self.feature_std[i];
        }
        let mut y = self.b2[0];
        for j in 0..HIDDEN {
            let mut h = self.b1[j];
            for (i, zi) in z.iter().enumerate() {
                h += zi * self.w1[i][j];
            }
            if h > 0.0 {
                y += h * self.w2[j][0];
            }
        }
        y
    }

    /// The same in f32, as the `gamma_mlp` kernel computes it.
    pub fn to_f32(&self) -> speckv_kernels::params::MlpWeights {
        let mut w = speckv_kernels::params::MlpWeights::default();
        for i in 0..INPUTS {
            for j in 0..HIDDEN {
                w.w1[i * HIDDEN + j] = self.w1[i][j] as f32;
            }
            w.mean[i] = self.feature_mean[i] as f32;
            w.inv_std[i] = (1.0 / self.feature_std[i]) as f32;
        }
        for j in 0..HIDDEN {
            w.b1[j] = self.b1[j] as f32;
            w.w2[j] = self.w2[j][0] as f32;
        }
        w.b2 = self.b2[0] as f32;
        w
    }

    pub fn check(&self) -> Result<()> {
        let all = self
            .w1
            .iter()
            .flatten()
            .chain(&self.b1)
            .chain(self.w2.iter().flatten())
            .chain(&self.b2)
            .chain(&self.feature_mean);
        if all.into_iter().any(|v| !v.is_finite()) {
            return Err(Error::Other("model weights must be finite".to_string()));
        }
        if self
            .feature_std
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::Other(
                "feature_std must be finite and positive".to_string(),
            ));
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(path, s).map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    /// Loads the paper's layout (W1 6×16, b1 16, W2 16×1, b2 1; optional feature_mean and
    /// feature_std) from JSON, or from .npz (arrays `W1`, `b1`, `W2`, `b2`, optional `feature_mean`,
    /// `feature_std`; f32 or f64; W2 as 16 or 16×1, b2 as 1 or a scalar).
    pub fn load(path: &Path) -> Result<Mlp> {
        let is_npz = path
            .extension()
            .map(|e| e.eq_ignore_ascii_case("npz"))
            .unwrap_or(false);
        let m = if is_npz {
            load_npz(path)?
        } else {
            load_json(path)?
        };
        m.check()
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
        Ok(m)
    }
}

fn load_json(path: &Path) -> Result<Mlp> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    serde_json::from_str(&s).map_err(|e| {
        Error::Other(format!(
            "{}: not a 6-16-1 MLP in the paper's layout: {e}",
            path.display()
        ))
    })
}

fn load_npz(path: &Path) -> Result<Mlp> {
    let io = |source: std::io::Error| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    };
    let mut npz = npyz::npz::NpzArchive::open(path).map_err(io)?;
    let mut get = |name: &str, len: usize, required: bool| -> Result<Option<Vec<f64>>> {
        let Some(arr) = npz.by_name(name).map_err(io)? else {
            return if required {
                Err(Error::Other(format!(
                    "{}: missing array {name}",
                    path.display()
                )))
            } else {
                Ok(None)
            };
        };
        let n: u64 = arr.shape().iter().product();
        if n as usize != len {
            return Err(Error::Other(format!(
                "{}: {name} has {n} elements, expected {len}",
                path.display()
            )));
        }
        let v: Vec<f64> = match arr.dtype() {
            npyz::DType::Plain(t) if t.size_field() == 4 => arr
                .into_vec::<f32>()
                .map_err(io)?
                .into_iter()
                .map(f64::from)
                .collect(),
            _ => arr.into_vec::<f64>().map_err(io)?,
        };
        Ok(Some(v))
    };
    let w1 = get("W1", INPUTS * HIDDEN, true)?.unwrap_or_default();
    let b1 = get("b1", HIDDEN, true)?.unwrap_or_default();
    let w2 = get("W2", HIDDEN, true)?.unwrap_or_default();
    let b2 = get("b2", 1, true)?.unwrap_or_default();
    let mean = get("feature_mean", INPUTS, false)?;
    let std = get("feature_std", INPUTS, false)?;
    let mut m = Mlp {
        w1: [[0.0; HIDDEN]; INPUTS],
        b1: [0.0; HIDDEN],
        w2: [[0.0; 1]; HIDDEN],
        b2: [b2[0]],
        feature_mean: zeros(),
        feature_std: ones(),
    };
    for i in 0..INPUTS {
        for j in 0..HIDDEN {
            m.w1[i][j] = w1[i * HIDDEN + j]; // row-major 6 × 16
        }
    }
    for j in 0..HIDDEN {
        m.b1[j] = b1[j];
        m.w2[j][0] = w2[j];
    }
    if let Some(mean) = mean {
        m.feature_mean.copy_from_slice(&mean);
    }
    if let Some(std) = std {
        m.feature_std.copy_from_slice(&std);
    }
    Ok(m)
}

/// Hyper-parameters of training.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TrainConfig {
    pub seed: u64,
    pub learning_rate: f64,
    pub l2: f64,
    pub batch: usize,
    pub max_epochs: usize,
    /// Epochs without a validation improvement before stopping.
    pub patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            learning_rate: 2e-3,
            l2: 1e-4,
            batch: 64,
            max_epochs: 400,
            patience: 40,
        }
    }
}

/// Mean squared error and Pearson correlation of predictions on a set.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Fit {
    pub n: usize,
    pub mse: f64,
    pub corr: f64,
}

/// What training did.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub train_runs: Vec<u32>,
    pub val_runs: Vec<u32>,
    pub test_runs: Vec<u32>,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub train: Fit,
    pub val: Fit,
    pub test: Option<Fit>,
}

/// One training example: inputs, target, and the group (prompt run) that keeps it out of the
/// validation and test splits of its neighbours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Example {
    pub x: [f64; INPUTS],
    pub y: f64,
    pub group: u32,
}

/// (features at the measured γ, measured acceptance rate) of a record.
fn example(r: &StepRecord) -> Example {
    Example {
        x: r.features(r.gamma),
        y: r.acceptance_rate,
        group: r.run,
    }
}

pub fn fit(m: &Mlp, rs: &[&StepRecord]) -> Fit {
    let ex: Vec<Example> = rs.iter().map(|r| example(r)).collect();
    fit_examples(m, &ex.iter().collect::<Vec<_>>())
}

/// [`fit`] on examples.
pub fn fit_examples(m: &Mlp, rs: &[&Example]) -> Fit {
    let n = rs.len();
    if n == 0 {
        return Fit {
            n: 0,
            mse: f64::NAN,
            corr: f64::NAN,
        };
    }
    let (mut se, mut sp, mut sy, mut spp, mut syy, mut spy) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for r in rs {
        let (x, y) = (r.x, r.y);
        let p = m.predict(&x);
        se += (p - y) * (p - y);
        sp += p;
        sy += y;
        spp += p * p;
        syy += y * y;
        spy += p * y;
    }
    let nf = n as f64;
    let cov = spy / nf - sp * sy / nf / nf;
    let vp = spp / nf - (sp / nf).powi(2);
    let vy = syy / nf - (sy / nf).powi(2);
    Fit {
        n,
        mse: se / nf,
        corr: cov / (vp * vy).sqrt(),
    }
}

/// Splits records by prompt run: the last run is the test set, the one before it validation, the
/// rest training (with two runs: no test set; with one: an error).
pub fn split_by_run(records: &[StepRecord]) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    split_groups(records.iter().map(|r| r.run))
}

/// [`split_by_run`] for any examples' groups (prompt runs).
pub fn split_groups(
    groups: impl IntoIterator<Item = u32>,
) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let mut runs: Vec<u32> = groups.into_iter().collect();
    runs.sort_unstable();
    runs.dedup();
    match runs.len() {
        0 | 1 => Err(Error::Other(format!(
            "training needs at least two prompt runs (column `run`) to hold one out for validation; found {runs:?}"
        ))),
        2 => Ok((vec![runs[0]], vec![runs[1]], vec![])),
        n => Ok((runs[..n - 2].to_vec(), vec![runs[n - 2]], vec![runs[n - 1]])),
    }
}

/// Trains on the records of `train_runs`, early-stopping on `val_runs`, reporting `test_runs`.
pub fn train(
    records: &[StepRecord],
    train_runs: &[u32],
    val_runs: &[u32],
    test_runs: &[u32],
    cfg: TrainConfig,
) -> Result<(Mlp, TrainReport)> {
    let ex: Vec<Example> = records.iter().map(example).collect();
    train_examples(&ex, train_runs, val_runs, test_runs, cfg)
}

#[allow(clippy::needless_range_loop)] // index arithmetic mirrors the parameter layout
/// [`train`] on examples grouped by `group` (prompt runs).
pub fn train_examples(
    examples: &[Example],
    train_runs: &[u32],
    val_runs: &[u32],
    test_runs: &[u32],
    cfg: TrainConfig,
) -> Result<(Mlp, TrainReport)> {
    let pick = |runs: &[u32]| -> Vec<&Example> {
        examples
            .iter()
            .filter(|r| runs.contains(&r.group))
            .collect()
    };
    let (tr, va, te) = (pick(train_runs), pick(val_runs), pick(test_runs));
    if tr.len() < 2 || va.is_empty() {
        return Err(Error::Other(format!(
            "too few records to train: {} training, {} validation",
            tr.len(),
            va.len()
        )));
    }
    // Standardisation from the training split.
    let mut mean = [0.0; INPUTS];
    let mut std = [0.0; INPUTS];
    for r in &tr {
        for i in 0..INPUTS {
            mean[i] += r.x[i];
        }
    }
    for m in &mut mean {
        *m /= tr.len() as f64;
    }
    for r in &tr {
        for i in 0..INPUTS {
            std[i] += (r.x[i] - mean[i]).powi(2);
        }
    }
    for s in &mut std {
        *s = (*s / tr.len() as f64).sqrt();
        if *s < 1e-12 {
            *s = 1.0; // a constant feature (one compression or one γ only)
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    // He-uniform initialisation.
    let lim1 = (6.0 / INPUTS as f64).sqrt();
    let lim2 = (6.0 / HIDDEN as f64).sqrt();
    let mut m = Mlp {
        w1: [[0.0; HIDDEN]; INPUTS],
        b1: [0.0; HIDDEN],
        w2: [[0.0; 1]; HIDDEN],
        b2: [0.0],
        feature_mean: mean,
        feature_std: std,
    };
    for row in m.w1.iter_mut() {
        for w in row.iter_mut() {
            *w = rng.gen_range(-lim1..lim1);
        }
    }
    for w in m.w2.iter_mut() {
        w[0] = rng.gen_range(-lim2..lim2) * 0.5;
    }
    m.b2[0] = tr.iter().map(|r| r.y).sum::<f64>() / tr.len() as f64;

    let n_params = INPUTS * HIDDEN + HIDDEN + HIDDEN + 1;
    let mut adam_m = vec![0.0; n_params];
    let mut adam_v = vec![0.0; n_params];
    let mut t = 0usize;
    let (b1c, b2c, eps) = (0.9f64, 0.999f64, 1e-8);
    let mut order: Vec<usize> = (0..tr.len()).collect();
    let mut best = (f64::INFINITY, m.clone(), 0usize);
    let mut epochs_run = 0;
    for epoch in 0..cfg.max_epochs {
        epochs_run = epoch + 1;
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch.max(1)) {
            let mut g = vec![0.0; n_params];
            for &k in chunk {
                let (x, y) = (tr[k].x, tr[k].y);
                let mut z = [0.0; INPUTS];
                for i in 0..INPUTS {
                    z[i] = (x[i] - m.feature_mean[i]) / m.feature_std[i];
                }
                let mut h = [0.0; HIDDEN];
                let mut out = m.b2[0];
                for j in 0..HIDDEN {
                    let mut a = m.b1[j];
                    for i in 0..INPUTS {
                        a += z[i] * m.w1[i][j];
                    }
                    h[j] = a.max(0.0);
                    out += h[j] * m.w2[j][0];
                }
                let d = 2.0 * (out - y) / chunk.len() as f64;
                // Parameter order: W1 (row-major), b1, W2, b2.
                for j in 0..HIDDEN {
                    if h[j] > 0.0 {
                        let dh = d * m.w2[j][0];
                        for i in 0..INPUTS {
                            g[i * HIDDEN + j] += dh * z[i];
                        }
                        g[INPUTS * HIDDEN + j] += dh;
                    }
                    g[INPUTS * HIDDEN + HIDDEN + j] += d * h[j];
                }
                g[n_params - 1] += d;
            }
            t += 1;
            let lr_t =
                cfg.learning_rate * (1.0 - b2c.powi(t as i32)).sqrt() / (1.0 - b1c.powi(t as i32));
            let mut idx = 0;
            let mut step = |w: &mut f64, idx: usize, decay: bool| {
                let gi = g[idx] + if decay { cfg.l2 * *w } else { 0.0 };
                adam_m[idx] = b1c * adam_m[idx] + (1.0 - b1c) * gi;
                adam_v[idx] = b2c * adam_v[idx] + (1.0 - b2c) * gi * gi;
                *w -= lr_t * adam_m[idx] / (adam_v[idx].sqrt() + eps);
            };
            for i in 0..INPUTS {
                for j in 0..HIDDEN {
                    step(&mut m.w1[i][j], idx, true);
                    idx += 1;
                }
            }
            for j in 0..HIDDEN {
                step(&mut m.b1[j], idx, false);
                idx += 1;
            }
            for j in 0..HIDDEN {
                step(&mut m.w2[j][0], idx, true);
                idx += 1;
            }
            step(&mut m.b2[0], idx, false);
        }
        let v = fit_examples(&m, &va).mse;
        if v < best.0 - 1e-9 {
            best = (v, m.clone(), epoch + 1);
        } else if epoch + 1 - best.2 >= cfg.patience {
            break;
        }
    }
    let (_, model, best_epoch) = best;
    // Records are checked when read, so this is a guard against a diverged fit, never written out.
    model
        .check()
        .map_err(|e| Error::Other(format!("training diverged ({e}); check the step records")))?;
    let report = TrainReport {
        config: cfg,
        train_runs: train_runs.to_vec(),
        val_runs: val_runs.to_vec(),
        test_runs: test_runs.to_vec(),
        best_epoch,
        epochs_run,
        train: fit_examples(&model, &tr),
        val: fit_examples(&model, &va),
        test: (!te.is_empty()).then(|| fit_examples(&model, &te)),
    };
    Ok((model, report))
}

//! Aggregation (mean of per-compression means) and the paired bootstrap both methods use.

use rand::{Rng, SeedableRng};

/// (overall = mean of per-compression means, per-compression means) over rows with a value,
/// optionally restricted to `sample` (a bootstrap resample of row indices).
pub(super) fn aggregate(
    vals: &[Option<f64>],
    comps: &[usize],
    sample: Option<&[usize]>,
) -> (f64, [Option<f64>; 3]) {
    let mut s = [(0.0, 0usize); 3];
    let mut add = |i: usize| {
        if let Some(v) = vals[i] {
            s[comps[i]].0 += v;
            s[comps[i]].1 += 1;
        }
    };
    match sample {
        Some(idx) => idx.iter().for_each(|&i| add(i)),
        None => (0..vals.len()).for_each(add),
    }
    let per = s.map(|(t, n)| (n > 0).then(|| t / n as f64));
    let present: Vec<f64> = per.iter().flatten().copied().collect();
    let overall = if present.is_empty() {
        f64::NAN
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    };
    (overall, per)
}

/// Paired bootstrap: the same resampled rows for every policy; returns per resample the overall
/// value of each policy.
pub(super) fn bootstrap(
    policies: &[Vec<Option<f64>>],
    comps: &[usize],
    resamples: usize,
    seed: u64,
) -> Vec<Vec<f64>> {
    let n = comps.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx = vec![0usize; n];
    (0..resamples)
        .map(|_| {
            for x in idx.iter_mut() {
                *x = rng.gen_range(0..n);
            }
            policies
                .iter()
                .map(|v| aggregate(v, comps, Some(&idx)).0)
                .collect()
        })
        .collect()
}

/// The 2.5 % and 97.5 % percentiles.
pub(super) fn percentile_ci(xs: &[f64]) -> [f64; 2] {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    [q(0.025), q(0.975)]
}

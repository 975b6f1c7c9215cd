//! The honest method: measured outcomes only (see the module documentation of `evaluate`).

use std::collections::BTreeMap;

use super::bootstrap::{bootstrap, percentile_ci};
use super::{
    base_features, comp_index, trajectories, Context, EvalConfig, HonestPolicy, FIXED_NAMES,
};
use crate::controller::records::StepRecord;
use crate::controller::Controller;

/// What a policy picks for one row under the honest method.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Choice {
    /// One γ.
    Gamma(u32),
    /// Any γ in lo..=hi (a per-token rule whose stopping point the aggregates do not pin down).
    Range(u32, u32),
    /// Unknown (a sequential rule whose state became unknown).
    Unknown,
}

/// Measured outcome of γ' on a row, if known.
fn outcome(r: &StepRecord, g: u32) -> Option<u32> {
    if g <= r.gamma || r.accepted < r.gamma {
        Some(r.accepted.min(g) + 1)
    } else {
        None
    }
}

/// (known value, lower, upper) of a choice on a row.
fn value(r: &StepRecord, c: Choice, max_gamma: u32) -> (Option<u32>, f64, f64) {
    match c {
        Choice::Gamma(g) => match outcome(r, g) {
            Some(v) => (Some(v), v as f64, v as f64),
            None => (None, (r.gamma + 1) as f64, (g + 1) as f64),
        },
        Choice::Range(lo, hi) if lo > hi => (None, 1.0, (max_gamma + 1) as f64),
        Choice::Range(lo, hi) => {
            let vals: Vec<Option<u32>> = (lo..=hi).map(|g| outcome(r, g)).collect();
            let lower = (lo..=hi)
                .map(|g| outcome(r, g).unwrap_or(r.gamma + 1))
                .min()
                .unwrap_or(1) as f64;
            let upper = (lo..=hi)
                .map(|g| outcome(r, g).unwrap_or(g + 1))
                .max()
                .unwrap_or(1) as f64;
            let first = vals[0];
            let known = if first.is_some() && vals.iter().all(|v| *v == first) {
                first
            } else {
                None
            };
            (known, lower, upper)
        }
        Choice::Unknown => (None, 1.0, (max_gamma + 1) as f64),
    }
}

/// The honest method: each policy's choice per row, scored on the rows whose outcome is measured,
/// with coverage, bounds over all rows and tokens per unit time under the cost model.
pub(super) fn policies(
    test: &[StepRecord],
    ctx: &Context<'_>,
    cfg: &EvalConfig,
) -> BTreeMap<String, HonestPolicy> {
    let (speckv, speckv_cost) = (ctx.speckv, ctx.speckv_cost);
    let (best_comp, best_task) = (&ctx.best_comp, &ctx.best_task);
    let rules = &cfg.rules;
    let comps: Vec<usize> = test.iter().map(|r| comp_index(r.compression)).collect();
    let mut choices: Vec<(String, Vec<Choice>)> = Vec::new();
    for (name, g) in FIXED_NAMES.iter().zip([2u32, 4, 6, 8]) {
        choices.push((name.to_string(), vec![Choice::Gamma(g); test.len()]));
    }
    choices.push((
        "fixed_best".into(),
        test.iter()
            .map(|r| Choice::Gamma(*best_comp.get(&r.compression).unwrap_or(&4)))
            .collect(),
    ));
    choices.push((
        "task_oracle".into(),
        test.iter()
            .map(|r| {
                Choice::Gamma(
                    *best_task
                        .get(&(r.compression, r.task.clone()))
                        .unwrap_or(&4),
                )
            })
            .collect(),
    ));
    choices.push((
        "speckv".into(),
        test.iter()
            .map(|r| Choice::Gamma(speckv.decide(base_features(r), r.compression).gamma))
            .collect(),
    ));
    choices.push((
        "speckv_cost".into(),
        test.iter()
            .map(|r| Choice::Gamma(speckv_cost.decide(base_features(r), r.compression).gamma))
            .collect(),
    ));
    let trajs = trajectories(test);
    let lagged = |c: &Controller| -> Vec<Choice> {
        let mut out = vec![Choice::Gamma(4); test.len()];
        for t in &trajs {
            for w in t.windows(2) {
                let prev = &test[w[0]];
                out[w[1]] = Choice::Gamma(c.decide(base_features(prev), prev.compression).gamma);
            }
        }
        out
    };
    choices.push(("speckv_lagged".into(), lagged(speckv)));
    choices.push(("speckv_cost_lagged".into(), lagged(speckv_cost)));
    // Per-token stop rules from the step's aggregates: no stop within γ_m → anywhere in γ_m..=max;
    // a stop within γ_m → before one of the drafted tokens, 0..=γ_m − 1.
    let stop_rule = |stops: &dyn Fn(&StepRecord) -> bool| -> Vec<Choice> {
        test.iter()
            .map(|r| {
                if stops(r) {
                    Choice::Range(0, r.gamma - 1)
                } else {
                    Choice::Range(r.gamma.min(rules.max_gamma), rules.max_gamma)
                }
            })
            .collect()
    };
    let p = rules.confidence_threshold;
    choices.push((
        format!("confidence_{p}"),
        stop_rule(&|r| r.min_draft_confidence < p),
    ));
    let h_max = (1.0 - rules.adaedl_lambda).powi(2) / rules.adaedl_beta;
    choices.push(("adaedl".into(), stop_rule(&|r| r.max_draft_entropy > h_max)));
    // HF heuristic: sequential within each trajectory.
    let mut heur = vec![Choice::Unknown; test.len()];
    for t in &trajs {
        let mut g = Some(rules.heuristic_start);
        for &i in t {
            let r = &test[i];
            match g {
                Some(gh) => {
                    heur[i] = Choice::Gamma(gh);
                    g = match outcome(r, gh) {
                        Some(v) => {
                            let full = v == gh + 1;
                            Some(if full {
                                (gh + 2).min(rules.max_gamma)
                            } else {
                                gh.saturating_sub(1).max(1)
                            })
                        }
                        None => None,
                    };
                }
                None => heur[i] = Choice::Unknown,
            }
        }
    }
    choices.push(("hf_heuristic".into(), heur));
    // Oracle: knowing where the first rejection falls, draft exactly up to it — γ = k: the k + 1
    // tokens of the row at the least step time any γ ≥ k would give them (for a fully accepted row,
    // γ = γ_m is the best choice its measurement can vouch for: a lower bound of the true oracle).
    choices.push((
        "oracle".into(),
        test.iter().map(|r| Choice::Gamma(r.accepted)).collect(),
    ));

    let mut honest = BTreeMap::new();
    let mut honest_vals: Vec<Vec<Option<f64>>> = Vec::new();
    for (_, ch) in &choices {
        honest_vals.push(
            test.iter()
                .zip(ch)
                .map(|(r, c)| value(r, *c, rules.max_gamma).0.map(f64::from))
                .collect(),
        );
    }
    let hboot = bootstrap(
        &honest_vals,
        &comps,
        cfg.resamples.min(2000),
        cfg.seed ^ 0x5eed,
    );
    let fixed4_vals = honest_vals[1].clone();
    for (k, (name, ch)) in choices.iter().enumerate() {
        let vals = &honest_vals[k];
        let known: Vec<f64> = vals.iter().flatten().copied().collect();
        let (mut lo, mut hi) = (0.0, 0.0);
        let mut time = (0.0, 0.0, true);
        let mut all_time = (0.0, 0.0, 0.0); // (lower tokens, upper tokens, cost) over all rows
        let mut hist: BTreeMap<String, BTreeMap<u32, usize>> = BTreeMap::new();
        let mut per: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (r, c) in test.iter().zip(ch) {
            let (v, l, u) = value(r, *c, rules.max_gamma);
            lo += l;
            hi += u;
            match c {
                Choice::Gamma(g) => {
                    *hist
                        .entry(r.compression.name().to_string())
                        .or_default()
                        .entry(*g)
                        .or_default() += 1;
                    all_time.0 += l;
                    all_time.1 += u;
                    all_time.2 += cfg.cost.step(*g);
                    if let Some(v) = v {
                        time.0 += v as f64;
                        time.1 += cfg.cost.step(*g);
                    }
                }
                _ => time.2 = false,
            }
            let e = per
                .entry(r.compression.name().to_string())
                .or_insert((0.0, 0));
            if let Some(v) = v {
                e.0 += v as f64;
                e.1 += 1;
            }
        }
        let n = test.len() as f64;
        let ci = percentile_ci(
            &hboot
                .iter()
                .map(|b| b[k])
                .filter(|x| x.is_finite())
                .collect::<Vec<_>>(),
        );
        honest.insert(
            name.clone(),
            HonestPolicy {
                tokens_per_step: (!known.is_empty())
                    .then(|| known.iter().sum::<f64>() / known.len() as f64),
                ci95: (!known.is_empty() && ci[0].is_finite()).then_some(ci),
                coverage: known.len() as f64 / n,
                lower: lo / n,
                upper: hi / n,
                tokens_per_time: (time.2 && time.1 > 0.0).then(|| time.0 / time.1),
                tokens_per_time_bounds: (time.2 && all_time.2 > 0.0)
                    .then(|| [all_time.0 / all_time.2, all_time.1 / all_time.2]),
                gamma_histogram: if time.2 { hist } else { BTreeMap::new() },
                per_compression: per
                    .into_iter()
                    .map(|(c, (s, k))| (c, (k > 0).then(|| s / k as f64)))
                    .collect(),
                vs_fixed4_common_rows: {
                    let d: Vec<f64> = vals
                        .iter()
                        .zip(&fixed4_vals)
                        .filter_map(|(a, b)| Some((*a)? - (*b)?))
                        .collect();
                    (!d.is_empty()).then(|| (d.len(), d.iter().sum::<f64>() / d.len() as f64))
                },
            },
        );
    }
    honest
}

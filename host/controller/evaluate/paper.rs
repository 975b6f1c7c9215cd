//! The paper's method (faithful to SpecKV's Table 1): fixed γ valued by the rows measured at that
//! γ, SpecKV by the predictor's own â(γ*)·γ* + 1.

use std::collections::BTreeMap;

use super::bootstrap::{aggregate, bootstrap, percentile_ci};
use super::{base_features, comp_index, Context, EvalConfig, PaperPolicy, FIXED_NAMES};
use crate::controller::records::{Compression, StepRecord};
use crate::controller::PAPER_CANDIDATES;

/// The paper's method: every policy's per-row value (None = a row the policy does not use),
/// aggregated as the mean of per-compression means, with paired bootstrap intervals.
pub(super) fn policies(
    test: &[StepRecord],
    ctx: &Context<'_>,
    cfg: &EvalConfig,
) -> BTreeMap<String, PaperPolicy> {
    let (speckv, speckv_cost) = (ctx.speckv, ctx.speckv_cost);
    let (best_comp, best_task) = (&ctx.best_comp, &ctx.best_task);
    let fixed_names = FIXED_NAMES;
    let mut paper: Vec<(String, &'static str, Vec<Option<f64>>)> = Vec::new();
    for (name, g) in fixed_names.iter().zip([2u32, 4, 6, 8]) {
        paper.push((
            name.to_string(),
            "measured",
            test.iter()
                .map(|r| (r.gamma == g).then_some(r.tokens_produced as f64))
                .collect(),
        ));
    }
    paper.push((
        "fixed_best".into(),
        "measured",
        test.iter()
            .map(|r| {
                (Some(&r.gamma) == best_comp.get(&r.compression))
                    .then_some(r.tokens_produced as f64)
            })
            .collect(),
    ));
    paper.push((
        "task_oracle".into(),
        "measured",
        test.iter()
            .map(|r| {
                (Some(&r.gamma) == best_task.get(&(r.compression, r.task.clone())))
                    .then_some(r.tokens_produced as f64)
            })
            .collect(),
    ));
    paper.push((
        "speckv".into(),
        "predicted",
        test.iter()
            .map(|r| {
                Some(
                    speckv
                        .decide(base_features(r), r.compression)
                        .expected_tokens,
                )
            })
            .collect(),
    ));
    paper.push((
        "speckv_cost".into(),
        "predicted",
        test.iter()
            .map(|r| {
                Some(
                    speckv_cost
                        .decide(base_features(r), r.compression)
                        .expected_tokens,
                )
            })
            .collect(),
    ));
    // The paper-style oracle: the row's true acceptance rate in the same linear model α·γ + 1.
    paper.push((
        "oracle".into(),
        "measured α in α·γ + 1",
        test.iter()
            .map(|r| {
                Some(
                    PAPER_CANDIDATES
                        .iter()
                        .map(|&g| r.acceptance_rate * g as f64 + 1.0)
                        .fold(f64::NEG_INFINITY, f64::max),
                )
            })
            .collect(),
    ));
    let comps: Vec<usize> = test.iter().map(|r| comp_index(r.compression)).collect();
    let boot = bootstrap(
        &paper.iter().map(|p| p.2.clone()).collect::<Vec<_>>(),
        &comps,
        cfg.resamples,
        cfg.seed,
    );
    let fixed4_idx = 1;
    let mut policies = BTreeMap::new();
    for (k, (name, valued_by, vals)) in paper.iter().enumerate() {
        let (point, per) = aggregate(vals, &comps, None);
        let ci = percentile_ci(&boot.iter().map(|b| b[k]).collect::<Vec<_>>());
        let diff = percentile_ci(
            &boot
                .iter()
                .map(|b| b[k] - b[fixed4_idx])
                .collect::<Vec<_>>(),
        );
        policies.insert(
            name.clone(),
            PaperPolicy {
                tokens_per_step: point,
                ci95: ci,
                diff_vs_fixed4_ci95: diff,
                per_compression: Compression::ALL
                    .iter()
                    .zip(per)
                    .filter_map(|(c, v)| v.map(|v| (c.name().to_string(), v)))
                    .collect(),
                valued_by,
            },
        );
    }

    policies
}

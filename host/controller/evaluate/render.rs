//! `speckv evaluate`'s text output.

use super::EvalReport;

/// Four significant digits, whatever the unit of the cost model.
fn sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// The report as text.
pub fn render(r: &EvalReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "predictor ({}): test MSE {:.4}, test correlation {:.3} (paper: MLP-16 0.0896 / 0.685)\n",
        r.predictor.source, r.predictor.test_mse, r.predictor.test_corr
    ));
    s.push_str(&format!(
        "train records {}, test records {}; bootstrap {} resamples\n\n",
        r.train_records, r.test_records, r.resamples
    ));
    s.push_str(
        "Paper method (fixed: measured at that γ; speckv: the predictor's own â(γ*)·γ* + 1)\n",
    );
    s.push_str(&format!(
        "{:<14} {:>8} {:>18} {:>7} {:>7} {:>7} {:>22}\n",
        "policy", "tok/step", "95% CI", "fp16", "int8", "nf4", "Δ vs fixed4 95% CI"
    ));
    for (name, p) in &r.policies {
        let pc = |c: &str| {
            p.per_compression
                .get(c)
                .map(|v| format!("{v:.2}"))
                .unwrap_or("-".into())
        };
        s.push_str(&format!(
            "{:<14} {:>8.2} {:>18} {:>7} {:>7} {:>7} {:>22}   ({})\n",
            name,
            p.tokens_per_step,
            format!("[{:.2}, {:.2}]", p.ci95[0], p.ci95[1]),
            pc("fp16"),
            pc("int8"),
            pc("nf4"),
            format!(
                "[{:+.2}, {:+.2}]",
                p.diff_vs_fixed4_ci95[0], p.diff_vs_fixed4_ci95[1]
            ),
            p.valued_by
        ));
    }
    s.push_str(
        "\nHonest method (measured outcomes only; tok/step over rows whose outcome is known)\n",
    );
    s.push_str(&format!(
        "{:<20} {:>8} {:>16} {:>9} {:>15} {:>9} {:>16} {:>16}\n",
        "policy",
        "tok/step",
        "95% CI",
        "coverage",
        "bounds (all)",
        "tok/time",
        "Δ fixed4 (rows)",
        "tok/time bounds"
    ));
    for (name, h) in &r.honest {
        s.push_str(&format!(
            "{:<20} {:>8} {:>16} {:>8.1}% {:>15} {:>9} {:>16} {:>16}\n",
            name,
            h.tokens_per_step
                .map(|v| format!("{v:.2}"))
                .unwrap_or("-".into()),
            h.ci95
                .map(|c| format!("[{:.2}, {:.2}]", c[0], c[1]))
                .unwrap_or("-".into()),
            100.0 * h.coverage,
            format!("[{:.2}, {:.2}]", h.lower, h.upper),
            h.tokens_per_time.map(sig).unwrap_or("-".into()),
            h.vs_fixed4_common_rows
                .map(|(n, d)| format!("{d:+.2} ({n})"))
                .unwrap_or("-".into()),
            h.tokens_per_time_bounds
                .map(|b| format!("[{}, {}]", sig(b[0]), sig(b[1])))
                .unwrap_or("-".into()),
        ));
    }
    s.push_str(&format!(
        "\ntok/time: tokens per unit of step time under the cost model ({})\n",
        r.cost_model.source
    ));
    for (k, why) in &r.not_computable {
        s.push_str(&format!("not computable: {k}: {why}\n"));
    }
    s
}

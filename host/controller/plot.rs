//! `speckv evaluate --plot OUT.png`: the policies with their 95 % intervals (paper method and
//! honest method side by side) and the γ the SpecKV predictor chose per compression.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::controller::evaluate::EvalReport;
use crate::error::{Error, Result};

/// DejaVu Sans (Bitstream Vera licence, assets/fonts/DejaVuSans-LICENSE.txt), embedded so plots
/// render the same on every machine.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Other(
            "the embedded font could not be loaded".to_string(),
        ))
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("plot: {e}"))
}

pub fn plot_evaluation(r: &EvalReport, path: &Path) -> Result<()> {
    register()?;
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(580);
    let (left, right) = top.split_horizontally(700);

    // Paper method.
    let paper: Vec<(String, f64, [f64; 2])> = r
        .policies
        .iter()
        .map(|(k, p)| (k.clone(), p.tokens_per_step, p.ci95))
        .collect();
    bars(
        &left,
        "Paper method: tokens/step (95% CI)",
        &paper,
        RGBColor(70, 110, 190),
    )?;
    // Honest method (policies with a known mean).
    let honest: Vec<(String, f64, [f64; 2])> = r
        .honest
        .iter()
        .filter_map(|(k, h)| {
            h.tokens_per_step.map(|v| {
                (
                    format!("{k} ({:.0}%)", 100.0 * h.coverage),
                    v,
                    h.ci95.unwrap_or([v, v]),
                )
            })
        })
        .collect();
    bars(
        &right,
        "Honest method: measured tokens/step (coverage)",
        &honest,
        RGBColor(200, 110, 50),
    )?;

    // Chosen γ per compression (speckv, honest choices).
    let hist = r
        .honest
        .get("speckv")
        .map(|h| h.gamma_histogram.clone())
        .unwrap_or_default();
    let panels = bottom.split_evenly((1, hist.len().max(1)));
    for (area, (comp, counts)) in panels.iter().zip(&hist) {
        let total: usize = counts.values().sum();
        let maxc = counts.values().copied().max().unwrap_or(1) as f64 / total.max(1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("speckv chosen γ — {comp}"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d((1u32..9u32).into_segmented(), 0.0..(maxc * 1.15).max(0.05))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("γ")
            .y_desc("share of steps")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(RGBColor(90, 160, 90).filled())
                    .margin(6)
                    .data(
                        counts
                            .iter()
                            .map(|(g, c)| (*g, *c as f64 / total.max(1) as f64)),
                    ),
            )
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Horizontal bars with their intervals, one row per policy (long names stay readable).
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    data: &[(String, f64, [f64; 2])],
    color: RGBColor,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = data.len().max(1) as u32;
    let xmax = data.iter().map(|d| d.2[1].max(d.1)).fold(1.0, f64::max) * 1.1;
    let labels: Vec<String> = data.iter().map(|d| d.0.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(190)
        .build_cartesian_2d(0f64..xmax, (0u32..n).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_labels(n as usize)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 14))
        .x_desc("tokens per step")
        .disable_y_mesh()
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            Histogram::horizontal(&chart)
                .style(color.filled())
                .margin(5)
                .data(data.iter().enumerate().map(|(i, d)| (i as u32, d.1))),
        )
        .map_err(err)?;
    chart
        .draw_series(data.iter().enumerate().map(|(i, d)| {
            PathElement::new(
                vec![
                    (d.2[0], SegmentValue::CenterOf(i as u32)),
                    (d.2[1], SegmentValue::CenterOf(i as u32)),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(err)?;
    Ok(())
}

//! `speckv simulate`: the seed note's table — expected tokens per speculation step
//! E(α, γ) = (1 − α^(γ+1)) / (1 − α) (Chen et al. 2023) by γ and compression level, the best γ and
//! its gain over fixed γ = 4 — computed from the note's α table (default), an α table in JSON, or α
//! estimated per (compression, γ) from step records. The note printed numbers its own formula and α
//! table do not give; the table says where.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::controller::records::StepRecord;
use crate::error::{Error, Result};

/// α per compression, per γ.
pub type AlphaTable = BTreeMap<String, BTreeMap<u32, f64>>;

/// The seed note's α table.
pub fn seed_alpha() -> AlphaTable {
    let rows: [(&str, [(u32, f64); 4]); 3] = [
        ("FP16", [(1, 0.82), (2, 0.80), (4, 0.74), (8, 0.65)]),
        ("INT8", [(1, 0.78), (2, 0.75), (4, 0.66), (8, 0.54)]),
        ("NF4", [(1, 0.71), (2, 0.67), (4, 0.55), (8, 0.40)]),
    ];
    rows.iter()
        .map(|(c, r)| (c.to_string(), r.iter().copied().collect()))
        .collect()
}

/// What the seed note printed: E by γ ∈ {1, 2, 4, 8} and its best γ, per compression.
pub fn seed_printed() -> BTreeMap<String, (BTreeMap<u32, f64>, u32)> {
    let rows: [(&str, [f64; 4], u32); 3] = [
        ("FP16", [1.82, 2.44, 3.13, 3.47], 8),
        ("INT8", [1.78, 2.31, 2.84, 3.03], 8),
        ("NF4", [1.71, 2.18, 2.50, 2.53], 8),
    ];
    rows.iter()
        .map(|(c, v, b)| {
            (
                c.to_string(),
                (
                    [1u32, 2, 4, 8].into_iter().zip(v.iter().copied()).collect(),
                    *b,
                ),
            )
        })
        .collect()
}

/// E(α, γ) = (1 − α^(γ+1)) / (1 − α), = γ + 1 at α = 1.
pub fn expected_tokens(alpha: f64, gamma: u32) -> f64 {
    if (alpha - 1.0).abs() < 1e-12 {
        return gamma as f64 + 1.0;
    }
    (1.0 - alpha.powi(gamma as i32 + 1)) / (1.0 - alpha)
}

/// α per (compression, γ) from step records: mean acceptance rate at that γ.
pub fn alpha_from_records(records: &[StepRecord]) -> AlphaTable {
    let mut acc: BTreeMap<String, BTreeMap<u32, (f64, usize)>> = BTreeMap::new();
    for r in records {
        let e = acc
            .entry(r.compression.name().to_uppercase())
            .or_default()
            .entry(r.gamma)
            .or_insert((0.0, 0));
        e.0 += r.acceptance_rate;
        e.1 += 1;
    }
    acc.into_iter()
        .map(|(c, m)| {
            (
                c,
                m.into_iter().map(|(g, (s, n))| (g, s / n as f64)).collect(),
            )
        })
        .collect()
}

pub fn load_alpha(path: &Path) -> Result<AlphaTable> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let t: AlphaTable = serde_json::from_str(&s).map_err(|e| {
        Error::Other(format!(
            "{}: expected {{\"FP16\": {{\"1\": 0.82, …}}, …}}: {e}",
            path.display()
        ))
    })?;
    for (c, row) in &t {
        if row.is_empty() || row.iter().any(|(g, a)| *g == 0 || !(0.0..=1.0).contains(a)) {
            return Err(Error::Other(format!(
                "{}: {c}: α must be in [0, 1] at γ ≥ 1",
                path.display()
            )));
        }
    }
    Ok(t)
}

/// One compression's row of the table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SimRow {
    pub compression: String,
    pub expected: BTreeMap<u32, f64>,
    pub best_gamma: u32,
    pub fixed4: Option<f64>,
    pub best: f64,
    pub gain_over_fixed4_pct: Option<f64>,
    /// Where the seed note's printed row differs from this computation.
    pub differs_from_note: Vec<String>,
}

pub fn table(alpha: &AlphaTable, compare_with_note: bool) -> Vec<SimRow> {
    let printed = seed_printed();
    alpha
        .iter()
        .map(|(c, row)| {
            let expected: BTreeMap<u32, f64> = row
                .iter()
                .map(|(&g, &a)| (g, expected_tokens(a, g)))
                .collect();
            let (&best_gamma, &best) =
                expected.iter().fold(
                    (&0, &f64::NEG_INFINITY),
                    |b, e| if e.1 > b.1 { e } else { b },
                );
            let fixed4 = expected.get(&4).copied();
            let mut differs = Vec::new();
            if compare_with_note {
                if let Some((p, pb)) = printed.get(c) {
                    for (g, v) in p {
                        if let Some(e) = expected.get(g) {
                            if (e - v).abs() >= 0.005 {
                                differs.push(format!(
                                    "γ={g}: note printed {v:.2}, formula gives {e:.2}"
                                ));
                            }
                        }
                    }
                    if *pb != best_gamma {
                        differs.push(format!(
                            "best γ: note printed {pb}, formula gives {best_gamma}"
                        ));
                    }
                }
            }
            SimRow {
                compression: c.clone(),
                expected,
                best_gamma,
                fixed4,
                best,
                gain_over_fixed4_pct: fixed4.map(|f| (best - f) / f * 100.0),
                differs_from_note: differs,
            }
        })
        .collect()
}

pub fn render(rows: &[SimRow], source: &str) -> String {
    let mut gammas: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.expected.keys().copied())
        .collect();
    gammas.sort_unstable();
    gammas.dedup();
    let mut s = format!("Expected tokens per speculation step by γ and compression ({source})\n");
    s.push_str(&format!("{:<12}", "Compression"));
    for g in &gammas {
        s.push_str(&format!("{:>8}", format!("γ={g}")));
    }
    s.push_str(&format!("{:>8}\n", "Best γ"));
    for r in rows {
        s.push_str(&format!("{:<12}", r.compression));
        for g in &gammas {
            match r.expected.get(g) {
                Some(v) => s.push_str(&format!("{v:>8.2}")),
                None => s.push_str(&format!("{:>8}", "-")),
            }
        }
        s.push_str(&format!("{:>8}\n", format!("γ={}", r.best_gamma)));
    }
    s.push_str("\nFixed-4 vs the best fixed γ per compression:\n");
    for r in rows {
        match (r.fixed4, r.gain_over_fixed4_pct) {
            (Some(f), Some(g)) => s.push_str(&format!(
                "  {}: Fixed-4={f:.2} | Best={:.2} (γ={}) | Gain={g:+.1}%\n",
                r.compression, r.best, r.best_gamma
            )),
            _ => s.push_str(&format!(
                "  {}: no γ=4 column | Best={:.2} (γ={})\n",
                r.compression, r.best, r.best_gamma
            )),
        }
    }
    let diffs: Vec<&SimRow> = rows
        .iter()
        .filter(|r| !r.differs_from_note.is_empty())
        .collect();
    if !diffs.is_empty() {
        s.push_str(
            "\nWhere the seed note's printed table differs from its own formula and α table:\n",
        );
        for r in diffs {
            for d in &r.differs_from_note {
                s.push_str(&format!("  {}: {d}\n", r.compression));
            }
        }
    }
    s
}

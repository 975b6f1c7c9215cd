//! Step records in the SpecKV paper's CSV schema (extra columns allowed): one speculation step,
//! measured at its own γ, with the draft features of that step's drafted tokens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Target compression regime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Fp16,
    Int8,
    Nf4,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::Fp16, Compression::Int8, Compression::Nf4];

    /// The paper's feature code: 0 = fp16, 1 = int8, 2 = nf4.
    pub fn code(self) -> f64 {
        match self {
            Compression::Fp16 => 0.0,
            Compression::Int8 => 1.0,
            Compression::Nf4 => 2.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Fp16 => "fp16",
            Compression::Int8 => "int8",
            Compression::Nf4 => "nf4",
        }
    }

    pub fn parse(s: &str) -> Result<Compression> {
        match s.to_ascii_lowercase().as_str() {
            "fp16" => Ok(Compression::Fp16),
            "int8" => Ok(Compression::Int8),
            "nf4" => Ok(Compression::Nf4),
            _ => Err(Error::Unknown {
                what: "compression",
                value: s.to_string(),
                expected: "fp16, int8, nf4",
            }),
        }
    }
}

/// One speculation step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Prompt run within its (compression, γ, task) group; absent in some files (then 0).
    #[serde(default)]
    pub run: u32,
    pub compression: Compression,
    /// γ the step was measured at.
    pub gamma: u32,
    pub task: String,
    pub step: u32,
    /// Draft tokens accepted (0..=γ).
    pub accepted: u32,
    pub acceptance_rate: f64,
    pub tokens_produced: u32,
    pub mean_draft_entropy: f64,
    pub mean_draft_confidence: f64,
    pub max_draft_entropy: f64,
    pub min_draft_confidence: f64,
    /// Traces only (`speckv profile`): the γmax the step was drafted and verified at; a trace row
    /// at γ < γmax is the same step seen at a shorter γ.
    #[serde(default)]
    pub trace_gamma_max: Option<u32>,
}

impl StepRecord {
    /// The predictor's features at a candidate γ: (mean entropy, mean confidence, max entropy,
    /// min confidence, compression code, γ).
    pub fn features(&self, gamma: u32) -> [f64; 6] {
        [
            self.mean_draft_entropy,
            self.mean_draft_confidence,
            self.max_draft_entropy,
            self.min_draft_confidence,
            self.compression.code(),
            gamma as f64,
        ]
    }

    fn check(&self, line: usize) -> Result<()> {
        let bad = |what: &str| Err(Error::Other(format!("step record on line {line}: {what}")));
        if self.gamma == 0 {
            return bad("gamma must be at least 1");
        }
        if self.accepted > self.gamma {
            return bad(&format!(
                "accepted {} exceeds gamma {}",
                self.accepted, self.gamma
            ));
        }
        if self.tokens_produced != self.accepted + 1 {
            return bad(&format!(
                "tokens_produced {} is not accepted + 1 = {}",
                self.tokens_produced,
                self.accepted + 1
            ));
        }
        if !(0.0..=1.0).contains(&self.acceptance_rate) {
            return bad(&format!(
                "acceptance_rate {} must be a number in [0, 1]",
                self.acceptance_rate
            ));
        }
        let feats = [
            self.mean_draft_entropy,
            self.mean_draft_confidence,
            self.max_draft_entropy,
            self.min_draft_confidence,
        ];
        if feats.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return bad("draft features must be finite and non-negative");
        }
        if self.mean_draft_confidence > 1.0 || self.min_draft_confidence > 1.0 {
            return bad("confidences must be at most 1");
        }
        Ok(())
    }
}

/// Reads step records from a CSV file with the paper's columns (in any order; extra columns are
/// ignored). Every record is checked (accepted ≤ γ, tokens = accepted + 1, acceptance rate in
/// [0, 1], features finite).
pub fn read_records(path: &Path) -> Result<Vec<StepRecord>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    read_records_from(file, &path.display().to_string())
}

/// As [`read_records`], from any reader (`name` is used in error messages).
pub fn read_records_from(reader: impl std::io::Read, name: &str) -> Result<Vec<StepRecord>> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let mut out = Vec::new();
    for (i, rec) in rdr.deserialize::<StepRecord>().enumerate() {
        let line = i + 2;
        let r = rec.map_err(|e| Error::Other(format!("{name}: line {line}: {e}")))?;
        r.check(line)
            .map_err(|e| Error::Other(format!("{name}: {e}")))?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(Error::Other(format!("{name}: no step records")));
    }
    Ok(out)
}

/// One CSV row: a traced step seen at γ' (`gamma`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRow {
    pub run: u32,
    pub compression: Compression,
    pub gamma: u32,
    pub task: String,
    pub step: u32,
    pub accepted: u32,
    pub acceptance_rate: f64,
    pub tokens_produced: u32,
    pub mean_draft_entropy: f64,
    pub mean_draft_confidence: f64,
    pub max_draft_entropy: f64,
    pub min_draft_confidence: f64,
    /// Index of the prompt in the prompt file.
    pub prompt: usize,
    /// Committed tokens (prompt included) before the step.
    pub position: usize,
    pub trace_gamma_max: u32,
    pub trace_accepted: u32,
    /// The previous step's features over its γmax drafts and its accepted count (empty on a
    /// prompt's first step).
    pub lag_mean_draft_entropy: Option<f64>,
    pub lag_mean_draft_confidence: Option<f64>,
    pub lag_max_draft_entropy: Option<f64>,
    pub lag_min_draft_confidence: Option<f64>,
    pub lag_accepted: Option<u32>,
    /// Draft γ' − 1's own entropy and confidence (the hazard model's per-token inputs; empty in
    /// traces written before these columns).
    #[serde(default)]
    pub draft_entropy: Option<f64>,
    #[serde(default)]
    pub draft_confidence: Option<f64>,
    /// Measured wall times of the traced step (γmax drafts; one verification of γmax + 1).
    pub draft_ms: f64,
    pub verify_ms: f64,
}

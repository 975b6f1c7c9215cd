//! What a hazard model is trained on: `speckv profile`'s trace rows, or the draft records an engine
//! writes while it decodes (one verified draft per row: [`DraftRecord`]).
//!
//! Both become the same [`Example`]s: one per draft j that verification reached (drafts 0..j−1
//! accepted), its inputs the [`token_features`] the live rule computes — replaying the step's f32
//! feature accumulator — and its label whether draft j was accepted too. A hazard model is
//! specific to its draft, target and sampling (`examples/python/adaptive_loop.py` shows the shipped
//! one under-drafting on sampled drafts), so an engine that records its own drafts can train the
//! model its own rule runs: `speckv train --hazard --steps drafts.csv`.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use speckv_kernels::params::FeatureAccum;

use crate::controller::hazard::token_features;
use crate::controller::mlp::Example;
use crate::controller::records::{Compression, TraceRow};
use crate::error::{Error, Result};

/// One verified draft, as an engine records it after verification (a CSV row; columns by name,
/// extra columns allowed). A step's rows are consecutive, positions 0, 1, … in order; write the
/// drafts that were verified (j < γ of the step), not a draft the stopping rule discarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DraftRecord {
    /// The group training holds out whole for validation and testing (a prompt, a conversation):
    /// drafts of one run are correlated, so they are never split between training and test.
    pub run: u32,
    /// The sequence within a batch (0 when absent).
    #[serde(default)]
    pub sequence: u32,
    /// The speculation step (any number unique to the step within its run and sequence).
    pub step: u64,
    /// The draft's index j within its step, from 0.
    pub position: u32,
    /// The draft distribution's entropy in nats and its top-1 probability, at the temperature the
    /// draft was taken at: `softmax_stats`'s `entropy` and `confidence`.
    pub entropy: f64,
    pub confidence: f64,
    /// The target's weight regime: fp16, int8 or nf4.
    pub compression: Compression,
    /// 1 if verification accepted this draft, else 0.
    pub accepted: u8,
}

/// The columns a draft record needs (`sequence` is optional).
pub const DRAFT_RECORD_COLUMNS: &str =
    "run, step, position, entropy, confidence, compression, accepted";

/// Appends draft n of a step to `out` as an example: its own (entropy, confidence) pushed on the
/// step's accumulator first, as the live rule does after the draft's statistics.
fn push_draft(
    out: &mut Vec<Example>,
    accum: &mut FeatureAccum,
    (e, c): (f32, f32),
    compression: Compression,
    n: usize,
    accepted: bool,
    group: u32,
) {
    accum.push(e, c, 0);
    out.push(Example {
        x: token_features(e, c, accum, compression, n),
        y: accepted as u32 as f64,
        group,
    });
}

/// Training examples from trace rows (`speckv profile --out steps.csv`): one per draft j of a traced
/// step whose drafts 0..j−1 were all accepted, labelled 1 if draft j was accepted too. Rows are
/// grouped by (run, prompt, step); the group of an example is its run. A draft's own entropy and
/// confidence come from the rows' `draft_entropy`/`draft_confidence` columns, or — in traces
/// written before those columns — from consecutive prefix means (exact up to rounding).
pub fn examples(rows: &[TraceRow]) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for step in trace_steps(rows) {
        // The accumulator the live rule reads, replayed in the same f32 arithmetic.
        let mut accum = FeatureAccum::EMPTY;
        for (n, r) in step.iter().enumerate() {
            if r.gamma as usize != n + 1 {
                return Err(Error::Other(format!(
                    "trace rows of run {} prompt {} step {}: γ' = {} where {} was expected (rows \
                     of a step must list γ' = 1, 2, … in order)",
                    r.run,
                    r.prompt,
                    r.step,
                    r.gamma,
                    n + 1
                )));
            }
            let accepted = r.trace_accepted as usize;
            if accepted < n {
                break; // draft n is only reached when drafts 0..n−1 were accepted
            }
            let (e, c) = draft_values(step, n);
            let values = (e as f32, c as f32);
            push_draft(
                &mut out,
                &mut accum,
                values,
                r.compression,
                n,
                accepted > n,
                r.run,
            );
        }
    }
    if out.is_empty() {
        return Err(Error::Empty {
            what: "trace rows (no drafted token to learn from)",
        });
    }
    Ok(out)
}

/// The rows of each traced step (consecutive rows of one run, prompt and step), in file order.
pub(crate) fn trace_steps(rows: &[TraceRow]) -> impl Iterator<Item = &[TraceRow]> {
    rows.chunk_by(|a, b| (a.run, a.prompt, a.step) == (b.run, b.prompt, b.step))
}

/// Draft n's own (entropy, confidence) in the rows of one traced step: the rows' per-draft
/// columns, or — in traces written before them — derived from consecutive prefix means (exact up
/// to rounding).
pub(crate) fn draft_values(step: &[TraceRow], n: usize) -> (f64, f64) {
    let Some(r) = step.get(n) else {
        return (f64::NAN, f64::NAN);
    };
    match (r.draft_entropy, r.draft_confidence) {
        (Some(e), Some(c)) => (e, c),
        _ => {
            let prev = n.checked_sub(1).and_then(|p| step.get(p));
            let k = (n + 1) as f64;
            let e =
                k * r.mean_draft_entropy - prev.map_or(0.0, |p| n as f64 * p.mean_draft_entropy);
            let c = k * r.mean_draft_confidence
                - prev.map_or(0.0, |p| n as f64 * p.mean_draft_confidence);
            (e, c)
        }
    }
}

/// Reads `speckv profile`'s trace rows (CSV).
pub fn read_trace_rows(path: &Path) -> Result<Vec<TraceRow>> {
    rows_of(&mut open_csv(path)?, path, "a trace row")
}

/// Training examples from draft records ([`DraftRecord`]): one per draft verification reached, up
/// to and including a step's first rejected draft. The group of an example is its run. Refused,
/// with the line: a step whose rows are not consecutive or whose positions are not 0, 1, … in
/// order; an accepted draft after a rejected one (verification accepts a prefix); a non-finite or
/// negative entropy, or a confidence outside 0..=1; `accepted` other than 0 or 1; a step whose
/// rows disagree on the compression. Lines are counted as in a CSV file holding `rows` after its
/// header.
pub fn draft_examples(rows: &[DraftRecord]) -> Result<Vec<Example>> {
    let key = |r: &DraftRecord| (r.run, r.sequence, r.step);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut line = 2; // the CSV line of the next row (line 1 is the header)
    for step in rows.chunk_by(|a, b| key(a) == key(b)) {
        let first = &step[0];
        let bad = |at: usize, why: String| {
            Error::Other(format!(
                "line {at} (run {}, sequence {}, step {}): {why}",
                first.run, first.sequence, first.step
            ))
        };
        if !seen.insert(key(first)) {
            return Err(bad(
                line,
                "the step's rows are not consecutive (it appeared earlier)".to_string(),
            ));
        }
        let mut accum = FeatureAccum::EMPTY;
        let mut rejected = false;
        for (n, r) in step.iter().enumerate() {
            let at = line + n;
            if r.position as usize != n {
                return Err(bad(
                    at,
                    format!(
                        "position {} where {n} was expected (a step lists its drafts 0, 1, … in order)",
                        r.position
                    ),
                ));
            }
            if r.compression != first.compression {
                return Err(bad(
                    at,
                    format!(
                        "compression {} in a step that began with {}",
                        r.compression.name(),
                        first.compression.name()
                    ),
                ));
            }
            if !(r.entropy.is_finite() && r.entropy >= 0.0) {
                return Err(bad(
                    at,
                    format!("entropy {} is not finite and ≥ 0", r.entropy),
                ));
            }
            if !(0.0..=1.0).contains(&r.confidence) {
                return Err(bad(
                    at,
                    format!("confidence {} is outside 0..=1", r.confidence),
                ));
            }
            let accepted = match r.accepted {
                0 => false,
                1 => true,
                a => return Err(bad(at, format!("accepted {a} is not 0 or 1"))),
            };
            if rejected {
                if accepted {
                    return Err(bad(
                        at,
                        "accepted after a rejected draft (verification accepts a prefix of the \
                         drafts)"
                            .to_string(),
                    ));
                }
                continue; // not reached: an earlier draft was rejected
            }
            let values = (r.entropy as f32, r.confidence as f32);
            push_draft(
                &mut out,
                &mut accum,
                values,
                r.compression,
                n,
                accepted,
                r.run,
            );
            rejected = !accepted;
        }
        line += step.len();
    }
    if out.is_empty() {
        return Err(Error::Empty {
            what: "draft records (no verified draft to learn from)",
        });
    }
    Ok(out)
}

/// Reads draft records (CSV with a header).
pub fn read_draft_records(path: &Path) -> Result<Vec<DraftRecord>> {
    rows_of(&mut open_csv(path)?, path, "a draft record")
}

/// Training examples from a file of either kind, told apart by its header: `speckv profile`'s
/// trace rows (a `trace_accepted` column) or draft records ([`DRAFT_RECORD_COLUMNS`]).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let mut r = open_csv(path)?;
    let header = r
        .headers()
        .map_err(|e| Error::Other(format!("{}: cannot read its header: {e}", path.display())))?
        .clone();
    let has = |c: &str| header.iter().any(|h| h == c);
    let in_file = |e: Error| Error::Other(format!("{}: {e}", path.display()));
    // The rows are read from the reader that read the header: the file is opened once.
    if has("trace_accepted") {
        examples(&rows_of::<TraceRow>(&mut r, path, "a trace row")?).map_err(in_file)
    } else if DRAFT_RECORD_COLUMNS.split(", ").all(has) {
        draft_examples(&rows_of::<DraftRecord>(&mut r, path, "a draft record")?).map_err(in_file)
    } else {
        Err(Error::Other(format!(
            "{}: neither `speckv profile`'s trace rows (a trace_accepted column) nor draft records \
             (columns {DRAFT_RECORD_COLUMNS})",
            path.display()
        )))
    }
}

fn open_csv(path: &Path) -> Result<csv::Reader<std::fs::File>> {
    csv::Reader::from_path(path)
        .map_err(|e| Error::Other(format!("{}: cannot read: {e}", path.display())))
}

/// The rows of `r` (a CSV of `path` with a header) as `T`s; a row that is not one names its line.
fn rows_of<T: serde::de::DeserializeOwned>(
    r: &mut csv::Reader<std::fs::File>,
    path: &Path,
    what: &str,
) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for (i, row) in r.deserialize::<T>().enumerate() {
        rows.push(row.map_err(|e| {
            Error::Other(format!(
                "{} line {}: not {what}: {e}",
                path.display(),
                i + 2
            ))
        })?);
    }
    Ok(rows)
}

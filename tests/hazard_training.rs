//! `controller::hazard_training`: an engine's draft records become the same training examples as
//! the trace rows they restate, every malformed record is refused with its line, and a model
//! trained on them by `speckv train --hazard` learns the hazard that generated them.

mod common;

use std::fmt::Write as _;
use std::process::Command;

use rand::{Rng, SeedableRng};
use speckv::controller::hazard::HazardModel;
use speckv::controller::hazard_training::{self, DraftRecord};
use speckv::controller::mlp::INPUTS;
use speckv::controller::records::Compression;
use speckv::decode::profile::trace_rows;

const HEADER: &str = "run,sequence,step,position,entropy,confidence,compression,accepted\n";

fn record_line(r: &DraftRecord) -> String {
    format!(
        "{},{},{},{},{},{},{},{}\n",
        r.run,
        r.sequence,
        r.step,
        r.position,
        r.entropy,
        r.confidence,
        r.compression.name(),
        r.accepted
    )
}

fn write(name: &str, body: &str) -> std::path::PathBuf {
    let p = common::tmp("hazard-training", name);
    std::fs::write(&p, body).unwrap();
    p
}

use common::trace_step as step;

#[test]
fn draft_records_train_as_the_trace_rows_they_restate() {
    let steps = [
        step(&[0.5, 1.0, 2.0, 0.25], &[0.9, 0.6, 0.3, 0.8], 2),
        step(&[0.125, 3.0, 0.7, 0.1], &[0.95, 0.2, 0.5, 0.99], 0),
        step(&[0.75, 0.5, 1.5, 0.3], &[0.7, 0.9, 0.4, 0.85], 4),
    ];
    let mut traces = String::new();
    let mut records = String::from(HEADER);
    for (run, compression) in [(0, Compression::Int8), (1, Compression::Nf4)] {
        let rows = trace_rows(&steps, compression, "code", run, 5).unwrap();
        let mut w = csv::WriterBuilder::new()
            .has_headers(traces.is_empty())
            .from_writer(Vec::new());
        for r in &rows {
            w.serialize(r).unwrap();
            // The same draft as an engine records it: every verified draft, accepted or not.
            let position = r.gamma - 1;
            records += &record_line(&DraftRecord {
                run,
                sequence: 2,
                step: r.step as u64,
                position,
                entropy: r.draft_entropy.unwrap(),
                confidence: r.draft_confidence.unwrap(),
                compression,
                accepted: (position < r.trace_accepted) as u8,
            });
        }
        traces += std::str::from_utf8(&w.into_inner().unwrap()).unwrap();
    }
    let from_traces = hazard_training::read_examples(&write("traces.csv", &traces)).unwrap();
    let from_records = hazard_training::read_examples(&write("drafts.csv", &records)).unwrap();
    // Drafts reached: 3 + 1 + 4 per run, in the same order, with the same inputs and labels.
    assert_eq!(from_records.len(), 16);
    assert_eq!(from_records, from_traces);
    assert_eq!(from_records[2].y, 0.0);
    assert_eq!(from_records[2].x[4], Compression::Int8.code());
    assert_eq!(from_records[8].group, 1);
    // `sequence` is optional: without it the steps are the same.
    let without: String = records
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f.remove(1);
            f.join(",") + "\n"
        })
        .collect();
    let path = write("no-sequence.csv", &without);
    assert_eq!(hazard_training::read_examples(&path).unwrap(), from_records);
}

/// The error of a draft-record file with these rows after the header, as `speckv train` reports it.
fn refusal(rows: &str) -> String {
    let path = write("bad.csv", &format!("{HEADER}{rows}"));
    hazard_training::read_examples(&path)
        .expect_err(rows)
        .to_string()
}

#[test]
fn malformed_draft_records_are_refused_with_their_line() {
    let ok = "0,0,7,0,1.5,0.5,fp16,1\n0,0,7,1,1.0,0.25,fp16,0\n";
    assert!(hazard_training::read_examples(&write("ok.csv", &format!("{HEADER}{ok}"))).is_ok());
    let cases = [
        // (rows after the two good ones, the line and the words the error must hold)
        (
            "0,0,8,1,1.0,0.5,fp16,1\n",
            "line 4 (run 0, sequence 0, step 8): position 1 where 0",
        ),
        (
            "0,0,8,0,1.0,0.5,fp16,0\n0,0,8,1,1.0,0.5,fp16,1\n",
            "line 5 (run 0, sequence 0, step 8): accepted after a rejected draft",
        ),
        (
            "0,0,8,0,NaN,0.5,fp16,1\n",
            "line 4 (run 0, sequence 0, step 8): entropy NaN",
        ),
        (
            "0,0,8,0,-0.5,0.5,fp16,1\n",
            "entropy -0.5 is not finite and ≥ 0",
        ),
        (
            "0,0,8,0,1.0,1.5,fp16,1\n",
            "line 4 (run 0, sequence 0, step 8): confidence 1.5",
        ),
        (
            "0,0,8,0,1.0,NaN,fp16,1\n",
            "confidence NaN is outside 0..=1",
        ),
        ("0,0,8,0,1.0,0.5,fp16,2\n", "accepted 2 is not 0 or 1"),
        (
            "0,0,8,0,1.0,0.5,fp16,1\n0,0,8,1,1.0,0.5,nf4,1\n",
            "line 5 (run 0, sequence 0, step 8): compression nf4 in a step that began with fp16",
        ),
        (
            "0,1,7,0,1.0,0.5,fp16,1\n0,0,7,0,1.0,0.5,fp16,1\n",
            "line 5 (run 0, sequence 0, step 7): the step's rows are not consecutive",
        ),
        ("0,0,8,0,1.0,0.5,fp32,1\n", "line 4: not a draft record"),
        ("0,0,8,0,high,0.5,fp16,1\n", "line 4: not a draft record"),
    ];
    for (rows, want) in cases {
        let err = refusal(&format!("{ok}{rows}"));
        assert!(err.contains(want), "{rows:?}: {err}");
        assert!(err.contains("bad.csv"), "{err}");
    }
    // A file of neither kind names what it lacks; a file without drafts is empty.
    let path = write(
        "other.csv",
        "run,step,position,entropy,confidence\n0,0,0,1.0,0.5\n",
    );
    let err = hazard_training::read_examples(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("neither") && err.contains("compression, accepted"),
        "{err}"
    );
    let err = refusal("");
    assert!(err.contains("no verified draft"), "{err}");
}

/// Draft records whose acceptance depends on the draft's confidence alone, with the hazard
/// h(c) = 0.1 + 0.85·c: `speckv train --hazard` on them learns a model whose hazard follows h.
#[test]
fn speckv_train_learns_the_hazard_of_draft_records() {
    let truth = |c: f64| 0.1 + 0.85 * c;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut body = String::from("run,step,position,entropy,confidence,compression,accepted\n");
    let mut labels = Vec::new();
    for run in 0..5u32 {
        for step in 0..400u64 {
            for position in 0..8u32 {
                let c: f64 = rng.gen_range(0.05..1.0);
                let e = 3.0 * (1.0 - c); // flatter drafts have lower confidence
                let accepted = rng.gen_bool(truth(c));
                labels.push(accepted as u32 as f64);
                writeln!(
                    body,
                    "{run},{step},{position},{e},{c},int8,{}",
                    accepted as u8
                )
                .unwrap();
                if !accepted {
                    break;
                }
            }
        }
    }
    let drafts = write("synthetic.csv", &body);
    let model = common::tmp("hazard-training", "learned.json");
    let out = Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args(["train", "--hazard", "--steps"])
        .arg(&drafts)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("runs [0, 1, 2]"), "{stdout}");
    assert!(stdout.contains("Context.load_hazard"), "{stdout}");
    let m = HazardModel::load(&model).unwrap();
    // A single first draft (position 0) at each confidence, INT8.
    let at = |c: f64| {
        let x: [f64; INPUTS] = [3.0 * (1.0 - c), c, 3.0 * (1.0 - c), c, 1.0, 0.0];
        m.hazard(&x)
    };
    for c in [0.2, 0.5, 0.8] {
        assert!(
            (at(c) - truth(c)).abs() < 0.08,
            "h({c}) = {} vs {}",
            at(c),
            truth(c)
        );
    }
    assert!(at(0.9) - at(0.15) > 0.5);
    // The examples' count is the records reached: every label drawn above.
    let ex = hazard_training::read_examples(&drafts).unwrap();
    assert_eq!(ex.len(), labels.len());
}

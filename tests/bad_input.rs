//! Bad input is a typed error that says what was wrong — never a panic, an abort, a silent token 0
//! or a NaN model written to disk.

mod common;

use std::process::Command;

use speckv::controller::records::Compression;
use speckv::decode::{self, GenConfig};
use speckv::model::Model;
use speckv::weights::quant::Format;
use speckv::Error;

fn speckv(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args(args)
        .output()
        .expect("run speckv");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    common::tmp("bad-input", name)
}

#[test]
fn verify_sim_checks_sizes_before_allocating() {
    // Used to abort with "memory allocation of 32000000000 bytes failed".
    let (code, _, err) = speckv(&[
        "--backend",
        "cpu",
        "verify-sim",
        "--vocab",
        "4000000000",
        "--gamma",
        "4",
        "--samples",
        "10",
    ]);
    assert_eq!(code, Some(1), "an error exit, not a signal: {err}");
    assert!(err.contains("too large"), "{err}");
    // Within MAX_VOCAB but beyond this machine's memory: the budget says so.
    let (code, _, err) = speckv(&[
        "--backend",
        "cpu",
        "verify-sim",
        "--vocab",
        "2000000000",
        "--gamma",
        "4",
        "--samples",
        "10",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("bytes of memory") && err.contains("--batch"),
        "{err}"
    );
    let need = speckv::measure::verify_sim::memory_needed(50_000, 4, 8192).unwrap();
    assert_eq!(
        need,
        9 * 50_000 * 12 + 5 * 50_000 * 8 + 8192 * 9 * 50_000 * 4u128
    );
    assert!(speckv::measure::verify_sim::memory_needed(usize::MAX, 4, usize::MAX).is_none());
}

#[test]
fn training_on_non_finite_acceptance_rates_is_refused() {
    let csv = tmp("nan.csv");
    let mut text = String::from("run,compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence\n");
    for run in 0..3 {
        for step in 0..20 {
            let rate = if run == 1 && step == 7 {
                "NaN".to_string()
            } else {
                "0.5".to_string()
            };
            text += &format!("{run},fp16,2,code,{step},1,{rate},2,1.0,0.6,1.5,0.4\n");
        }
    }
    std::fs::write(&csv, text).unwrap();
    let model = tmp("nan-model.json");
    let _ = std::fs::remove_file(&model);
    let (code, out, err) = speckv(&[
        "train",
        "--steps",
        csv.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("line 29") && err.contains("acceptance_rate NaN"),
        "{err}"
    );
    assert!(!model.exists(), "no model may be written");
    // Out of [0, 1] is refused the same way.
    let records = speckv::controller::records::read_records_from(
        "run,compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence\n0,int8,4,chat,0,2,1.5,3,1.0,0.6,1.5,0.4\n".as_bytes(),
        "x",
    );
    assert!(records
        .unwrap_err()
        .to_string()
        .contains("acceptance_rate 1.5"));
}

fn load(spec: &common::tiny::Spec, name: &str) -> speckv::Result<Model> {
    let p = tmp(name);
    common::tiny::write(spec, &p);
    Model::load(&p, Format::Fp16)
}

#[test]
fn gguf_shapes_are_checked_against_the_configuration() {
    // The well-formed tiny model loads.
    let good = common::tiny::spec(1);
    let m = load(&good, "good.gguf").unwrap();
    assert_eq!((m.cfg.vocab, m.cfg.hidden, m.cfg.layers), (512, 64, 2));
    // token_embd.weight with a zero dimension: used to panic (an index into its empty shape).
    for shape in [vec![0, 64], vec![512, 0]] {
        let mut s = common::tiny::spec(1);
        s.tensors
            .insert("token_embd.weight".into(), (shape.clone(), vec![]));
        match load(&s, "zero.gguf") {
            Err(Error::BadModel(m)) => assert!(m.contains("token_embd.weight"), "{m}"),
            other => panic!("{shape:?}: {:?}", other.map(|m| m.cfg)),
        }
    }
    // output_norm of the wrong length: never checked before.
    let mut s = common::tiny::spec(1);
    s.tensors
        .insert("output_norm.weight".into(), (vec![65], vec![1.0; 65]));
    match load(&s, "norm.gguf") {
        Err(Error::BadModel(m)) => assert!(
            m.contains("output_norm.weight") && m.contains("[64]"),
            "{m}"
        ),
        other => panic!("{:?}", other.map(|m| m.cfg)),
    }
    // A projection of the wrong shape, and inconsistent head counts.
    let mut s = common::tiny::spec(1);
    s.tensors.insert(
        "blk.1.attn_k.weight".into(),
        (vec![64, 64], vec![0.0; 64 * 64]),
    );
    assert!(
        matches!(load(&s, "k.gguf"), Err(Error::BadModel(m)) if m.contains("blk.1.attn_k.weight"))
    );
    let mut s = common::tiny::spec(1);
    s.metadata.insert(
        "llama.attention.head_count_kv".into(),
        candle_core::quantized::gguf_file::Value::U32(3),
    );
    assert!(matches!(load(&s, "heads.gguf"), Err(Error::BadModel(m)) if m.contains("head_count")));
}

#[test]
fn nan_logits_are_an_error_in_plain_decoding() {
    let cfg = |t: f32| GenConfig {
        max_tokens: 4,
        temperature: t,
        seed: 0,
        gamma_max: 4,
        compression: Compression::Fp16,
        draft_catch_up: None,
    };
    let good = load(&common::tiny::spec(2), "plain.gguf").unwrap();
    let out = decode::plain(&good, &[1, 2, 3], &[], &cfg(0.0)).unwrap();
    assert_eq!(out.tokens.len(), 4);
    // A NaN in the final norm makes every logit NaN: greedy decoding used to pick token 0.
    let mut s = common::tiny::spec(2);
    let mut norm = vec![1.0f32; 64];
    norm[5] = f32::NAN;
    s.tensors
        .insert("output_norm.weight".into(), (vec![64], norm));
    let bad = load(&s, "nan.gguf").unwrap();
    for t in [0.0, 0.7] {
        match decode::plain(&bad, &[1, 2, 3], &[], &cfg(t)) {
            Err(Error::NonFiniteLogits { step: 0, .. }) => {}
            other => panic!("T = {t}: {:?}", other.map(|o| o.tokens)),
        }
    }
    assert!(decode::argmax(&[0.5, f32::NAN, 0.1], 3).is_err());
    assert!(decode::argmax(&[f32::NEG_INFINITY; 3], 0).is_err());
    assert_eq!(
        decode::argmax(&[0.5, 2.0, 2.0, f32::NEG_INFINITY], 0).unwrap(),
        1
    );
}

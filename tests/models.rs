//! Real-model tests (SmolLM2-135M-Instruct from `scripts/fetch-model smollm2`; skipped with a
//! message where it has not been fetched): tokenizer round trips, plain greedy decoding, and the
//! greedy identity — speculative greedy output equals the target's own greedy output, token for
//! token, for every policy and weight regime.

mod common;

use speckv::controller::records::Compression;
use speckv::controller::{Controller, PAPER_CANDIDATES};
use speckv::decode::{self, Draft, GenConfig, Policy};
use speckv::model::tokenizer::Tokenizer;
use speckv::model::{read_gguf, Model};
use speckv::weights::quant::Format;
use speckv::weights::Regime;

use common::smollm2;

#[test]
fn tokenizer_round_trips_and_knows_the_chat_tokens() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    for text in [
        "Hello, world!",
        "  leading spaces and\nnewlines\t tabs",
        "ünïcödé — 東京 🙂",
        "fn main() { println!(\"{}\", 1 + 2); }",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
    let ids = tok.encode(&Tokenizer::chat_prompt("Hi")).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert!(tok.stop.contains(&2), "<|im_end|> stops a turn");
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn greedy_decoding_answers_a_simple_question() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let m = Model::load(&p, Format::Fp16).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("What is the capital of France?"))
        .unwrap();
    let cfg = GenConfig {
        max_tokens: 12,
        temperature: 0.0,
        seed: 0,
        gamma_max: 8,
        compression: Compression::Fp16,
        draft_catch_up: None,
    };
    let out = decode::plain(&m, &prompt, &tok.stop, &cfg).unwrap();
    let text = tok.decode(&out.tokens).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn speculative_greedy_equals_plain_greedy_for_every_policy_and_regime() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("List three uses of copper."))
        .unwrap();
    let ctl = Controller::new(
        speckv::measure::overhead::random_mlp(3),
        &PAPER_CANDIDATES,
        None,
    )
    .unwrap();
    let policies = [
        Policy::Fixed(1),
        Policy::Fixed(4),
        Policy::Fixed(8),
        Policy::Confidence(0.6),
        Policy::Heuristic,
        Policy::SpecKv(Box::new(ctl)),
        Policy::parse("auto", None).unwrap(),
        Policy::parse("adaedl", None).unwrap(),
        Policy::parse("hf-dynamic", None).unwrap(),
    ];
    for format in Regime::ALL {
        let m = Model::load(&p, format).unwrap();
        // Self-speculative draft: every other layer, first and last kept.
        let n = m.cfg.layers;
        let mask: Vec<bool> = (0..n).map(|i| i == 0 || i == n - 1 || i % 2 == 0).collect();
        let cfg = GenConfig {
            max_tokens: 24,
            temperature: 0.0,
            seed: 1,
            gamma_max: 8,
            compression: Compression::Fp16,
            draft_catch_up: None,
        };
        let want = decode::plain(&m, &prompt, &tok.stop, &cfg).unwrap().tokens;
        assert!(want.len() >= 8, "{format:?}: {want:?}");
        for policy in &policies {
            let got = decode::speculative(
                &m,
                &Draft::SkipLayers(mask.clone()),
                &prompt,
                &tok.stop,
                policy,
                &cfg,
            )
            .unwrap();
            assert_eq!(
                got.tokens, want,
                "{format:?} {policy:?}: speculative greedy diverged"
            );
            assert!(got.steps > 0 && got.acceptance_rate <= 1.0);
        }
    }
}

/// The self-draft above accepts little. Here the draft is the same GGUF in FP16 drafting for its
/// INT8 / NF4 regime: close but not identical, so steps accept everything, part, or nothing, and
/// the KV cache rolls back after partial acceptance — the greedy output must still be the
/// target's own, token for token.
#[test]
fn speculative_greedy_equals_plain_greedy_with_a_draft_that_accepts() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("Write a haiku about rivers."))
        .unwrap();
    let draft = Model::load(&p, Format::Fp16).unwrap();
    let policies = [Policy::Fixed(3), Policy::Fixed(8), Policy::Heuristic];
    let (mut full, mut partial, mut none) = (0, 0, 0);
    for format in [Regime::Int8, Regime::Nf4, Regime::Gguf] {
        let target = Model::load(&p, format).unwrap();
        let cfg = GenConfig {
            max_tokens: 32,
            temperature: 0.0,
            seed: 1,
            gamma_max: 8,
            compression: Compression::Fp16,
            draft_catch_up: None,
        };
        let want = decode::plain(&target, &prompt, &tok.stop, &cfg)
            .unwrap()
            .tokens;
        for policy in &policies {
            let got = decode::speculative_traced(
                &target,
                &Draft::Model(&draft),
                &prompt,
                &tok.stop,
                policy,
                &cfg,
                &mut |s| {
                    if s.gamma > 0 && s.accepted == s.gamma {
                        full += 1;
                    } else if s.accepted > 0 {
                        partial += 1;
                    } else if s.gamma > 0 {
                        none += 1;
                    }
                },
            )
            .unwrap();
            assert_eq!(
                got.tokens, want,
                "{format:?} {policy:?}: speculative greedy diverged"
            );
        }
    }
    assert!(
        full > 0 && partial > 0,
        "steps fully accepted {full}, partially {partial}, rejected at once {none}"
    );
}

#[test]
fn sampled_speculative_decoding_is_reproducible_for_a_seed() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let m = Model::load(&p, Format::Fp16).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("Tell me a short story."))
        .unwrap();
    let mask: Vec<bool> = (0..m.cfg.layers).map(|i| i % 3 != 1).collect();
    let cfg = GenConfig {
        max_tokens: 20,
        temperature: 0.8,
        seed: 42,
        gamma_max: 6,
        compression: Compression::Fp16,
        draft_catch_up: None,
    };
    let a = decode::speculative(
        &m,
        &Draft::SkipLayers(mask.clone()),
        &prompt,
        &tok.stop,
        &Policy::Fixed(4),
        &cfg,
    )
    .unwrap();
    let b = decode::speculative(
        &m,
        &Draft::SkipLayers(mask),
        &prompt,
        &tok.stop,
        &Policy::Fixed(4),
        &cfg,
    )
    .unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
}

#[test]
fn malformed_gguf_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("speckv-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.gguf");
    // Not GGUF at all, a truncated header, and (with the real file) random truncations and byte flips.
    let mut cases: Vec<Vec<u8>> = vec![
        b"nope".to_vec(),
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        Vec::new(),
    ];
    if let Some(p) = smollm2() {
        let bytes = std::fs::read(&p).unwrap();
        let header = &bytes[..4 << 20];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..40 {
            let mut v = header[..(1000 + i * 97_531) % header.len()].to_vec();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize) % v.len().min(200_000);
                v[at] ^= (state >> 32) as u8 | 1;
            }
            cases.push(v);
        }
    }
    for (i, bytes) in cases.iter().enumerate() {
        std::fs::write(&f, bytes).unwrap();
        // Either the header parses (a flip in a harmless place) or a clean error; loading the
        // model from a truncated file must fail cleanly.
        let _ = read_gguf(&f);
        assert!(Model::load(&f, Format::Fp16).is_err(), "case {i} loaded");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn calibration_of_the_full_model_agrees_with_itself() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let m = Model::load(&p, Format::Fp16).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("Name a primary colour."))
        .unwrap();
    // No cost bound: nothing is removed, and the teacher-forced target reproduces its own greedy
    // tokens (chunked prefill and one-token decoding agree).
    let cal =
        speckv::decode::calibrate::calibrate(&m, std::slice::from_ref(&prompt), &tok.stop, 10, 1.0)
            .unwrap();
    assert_eq!(cal.keep.len(), m.cfg.layers);
    assert_eq!(cal.agreement, 1.0);
    assert_eq!(cal.path.len(), 1);
    assert!(
        speckv::decode::calibrate::calibrate(&m, &[prompt], &tok.stop, 10, 0.0).is_err(),
        "a zero cost bound is refused"
    );
}

/// The `auto` policy's per-token decisions see exactly the features its hazard model is trained
/// on: the live inputs of every draft (recorded in the step trace) equal the training examples
/// built from the same steps' trace rows (`speckv profile`'s CSV form), bit for bit.
#[test]
fn auto_policy_sees_the_features_it_was_trained_on() {
    let Some(p) = smollm2() else { return };
    let (c, _) = read_gguf(&p).unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let prompt = tok
        .encode(&Tokenizer::chat_prompt("Name four planets."))
        .unwrap();
    let target = Model::load(&p, Regime::Int8).unwrap();
    let draft = Model::load(&p, Regime::Gguf).unwrap();
    let cfg = GenConfig {
        max_tokens: 40,
        temperature: 0.0,
        seed: 1,
        gamma_max: 8,
        compression: Compression::Int8,
        draft_catch_up: None,
    };
    // `auto`'s gate decides from measured times after the first step, and here the draft costs
    // about what the target does, so whether it speculates again depends on the machine. The
    // first step always drafts (no hazards yet) and decides under the prior alone: a prior with
    // cheap drafts makes it keep some, whatever the machine.
    let shipped = decode::Auto::shipped().unwrap();
    let prior = speckv::controller::CostModel {
        draft_ms_per_token: 0.1,
        verify_ms: vec![10.0; cfg.gamma_max as usize + 1],
        draft_feed_ms: Vec::new(),
        source: "test: cheap drafts".into(),
    };
    let policy = Policy::Auto(Box::new(decode::Auto { prior, ..shipped }));
    let mut steps = Vec::new();
    decode::speculative_traced(
        &target,
        &Draft::Model(&draft),
        &prompt,
        &tok.stop,
        &policy,
        &cfg,
        &mut |t| steps.push(t.clone()),
    )
    .unwrap();
    assert!(
        steps[0].gamma > 0,
        "the first step keeps drafts: {:?}",
        steps[0]
    );
    let rows =
        speckv::decode::profile::trace_rows(&steps, Compression::Int8, "test", 0, 0).unwrap();
    let examples = speckv::controller::hazard_training::examples(&rows).unwrap();
    let mut live = Vec::new();
    let (mut stopped_early, mut kept) = (0, 0);
    for s in &steps {
        let g = s.gamma as usize;
        // One decision per draft made: the kept ones, and a discarded last one.
        let discarded = s.stop_features.len() == g + 1;
        assert!(discarded || s.stop_features.len() == g, "{s:?}");
        stopped_early += (g < cfg.gamma_max as usize) as usize;
        kept += g;
        if g > 0 {
            live.extend_from_slice(&s.stop_features[..=(s.accepted as usize).min(g - 1)]);
        }
    }
    assert!(
        stopped_early > 0 && kept > 0,
        "the rule must both stop and keep drafts here"
    );
    let trained: Vec<_> = examples.iter().map(|e| e.x).collect();
    assert_eq!(trained, live);
}

/// `bench batch`: the prompts decoded together and one at a time give the same tokens (greedy),
/// the batch in fewer target passes; γmax is capped per batch size so a verification of every
/// sequence fits a step of 16 rows; the speed-up is the ratio of the two tokens/s it prints.
/// Runs it cannot do are refused before any model runs.
#[test]
fn bench_batch_decodes_the_same_tokens_together_and_alone() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "batch", "--model", m, "--max-tokens", "4"];
        args.extend(["--per-category", "1", "--json"]);
        args.extend(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
            .args(&args)
            .env_remove("SPECKV_CUDA_EMULATE")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["--batch-sizes", "1,3", "--policies", "plain,fixed:2,auto"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{out}");
    for r in rows {
        let b = r["batch"].as_u64().unwrap();
        assert_eq!(r["same_tokens"], true, "{r}");
        let tokens = r["tokens"].as_u64().unwrap();
        assert!(tokens >= b && tokens <= 4 * b, "{r}");
        let (bp, ap) = (
            r["batched"]["target_passes"].as_u64().unwrap(),
            r["one_at_a_time"]["target_passes"].as_u64().unwrap(),
        );
        // `auto` decides from the times it measures, so its two sides may choose other γ.
        if r["policy"] != "auto" {
            assert!(bp <= ap, "{r}");
            if b == 3 {
                assert!(bp < ap, "three prompts share their passes: {r}");
            }
        }
        let tps = |side: &str| r[side]["tokens_per_second"].as_f64().unwrap();
        let ratio = tps("batched") / tps("one_at_a_time");
        assert!(
            (r["speedup"].as_f64().unwrap() - ratio).abs() < 1e-9 * ratio,
            "{r}"
        );
        let want_gamma = match (r["policy"].as_str().unwrap(), b) {
            ("plain", _) => serde_json::Value::Null,
            (_, 1) => 8.into(),
            _ => 4.into(), // 16 / 3 − 1
        };
        assert_eq!(r["gamma_max"], want_gamma, "{r}");
    }
    for (extra, says) in [
        (&["--batch-sizes", "17"][..], "1 to 16"),
        (
            &["--batch-sizes", "16", "--policies", "fixed:2"][..],
            "no room for a draft",
        ),
        (&["--batch-sizes", "5"][..], "needs 5 prompts"),
    ] {
        let (ok, _, err) = run(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
    }
}

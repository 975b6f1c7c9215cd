//! The `speckv` binary as a user runs it.

mod common;

use std::process::Command;

fn speckv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args(args)
        .output()
        .expect("run speckv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn report_json_has_the_documented_keys() {
    let (ok, stdout, stderr) =
        speckv(&["--backend", "cpu", "report", "--json", "--seconds", "0.02"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["backend"], "cpu");
    assert!(v["device"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(v["ptx_archs"].is_array());
    let gbps = v["kernels"]["softmax_stats"]["gbps"]
        .as_f64()
        .expect("gbps");
    assert!(gbps > 0.0 && gbps.is_finite());
    assert_eq!(
        v["kernels"]["softmax_stats"]["cases"]
            .as_array()
            .map(|c| c.len()),
        Some(4)
    );
    assert_eq!(v["kernels"]["softmax_stats"]["validated_on_gpu"], true);
}

#[test]
fn report_text_names_backend_and_kernel() {
    let (ok, stdout, stderr) = speckv(&["--backend", "cpu", "report", "--seconds", "0.02"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("backend     cpu"), "{stdout}");
    assert!(stdout.contains("softmax_stats"), "{stdout}");
}

/// The README's first command must embed PTX on a fresh machine (build.rs installs the pinned
/// toolchain with rust-src): a build without it fails here, saying why, unless the PTX step was
/// skipped on purpose with SPECKV_SKIP_PTX=1.
#[test]
fn ptx_is_embedded_with_every_entry_point() {
    if speckv::ptx::PTX_SKIPPED {
        eprintln!("skipped: SPECKV_SKIP_PTX=1 at build time");
        return;
    }
    assert_eq!(
        speckv::ptx::PTX_BUILD_ERROR,
        None,
        "no PTX is embedded in this build"
    );
    assert_eq!(speckv::ptx::built_archs(), vec!["sm_80", "sm_90"]);
    for arch in ["sm_80", "sm_90"] {
        let (ok, stdout, stderr) = speckv(&["ptx", "--arch", arch]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains(&format!(".target {arch}")));
        for entry in speckv::ptx::ENTRY_POINTS {
            assert!(
                stdout.contains(&format!(".entry {entry}(")),
                "{arch} lacks {entry}"
            );
        }
    }
}

#[test]
fn bad_arguments_fail_with_a_message_not_a_panic() {
    let (ok, _, stderr) = speckv(&["ptx", "--arch", "sm_70"]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown architecture \"sm_70\""),
        "{stderr}"
    );
    let (ok, _, stderr) = speckv(&["--backend", "cpu", "report", "--seconds", "-1"]);
    assert!(!ok);
    assert!(stderr.contains("--seconds must be positive"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // v3 is the statistics kernel's alone.
    for (kernel, most) in [("verify", 2), ("softmax_stats", 3)] {
        let (ok, _, stderr) = speckv(&[
            "--backend",
            "cpu",
            "plan",
            "--kernel",
            kernel,
            "--version",
            "4",
            "--rows",
            "1",
            "--batch",
            "1",
            "--gamma",
            "1",
            "--vocab",
            "8",
        ]);
        assert!(!ok);
        assert!(
            stderr.contains(&format!(
                "--version must be 1 to {most} for this kernel, got 4"
            )),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = speckv(&[
        "--backend",
        "cpu",
        "plan",
        "--kernel",
        "verify",
        "--version",
        "3",
        "--batch",
        "1",
        "--gamma",
        "1",
        "--vocab",
        "8",
    ]);
    assert!(!ok && stderr.contains("must be 1 to 2"), "{stderr}");
}

#[test]
fn forcing_cuda_without_a_device_is_an_error() {
    if speckv::backend::cuda::CudaBackend::new(0).is_ok() {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    }
    let (ok, _, stderr) = speckv(&["--backend", "cuda", "report", "--seconds", "0.01"]);
    assert!(!ok);
    assert!(stderr.contains("CUDA"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `speckv plan --json` prints what the backends launch: the emulator runs each kernel for the
/// same shape and SM count, every launch it makes is recorded, and the two lists must agree
/// (entry, grid, block, shared bytes). Also the floor: 1 × 128256 f16 gets ≥ 2 × 132 CTAs.
#[test]
fn plan_json_is_what_the_backend_launches() {
    use speckv::backend::emulate::Emulator;
    use speckv::stats::{Logits, LogitsData, StatsOptions};
    use speckv::verify::{DraftDist, VerifyBatch};
    use speckv::weights::quant::{Format, QMatrix};
    use speckv_kernels::emu::{record_launches, RecordedLaunch};

    fn plan(args: &[&str]) -> serde_json::Value {
        let mut a = vec!["plan", "--json"];
        a.extend_from_slice(args);
        let (ok, stdout, stderr) = speckv(&a);
        assert!(ok, "speckv {a:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        for key in [
            "entry",
            "grid",
            "block",
            "shared_bytes",
            "ctas_per_sm",
            "launches",
        ] {
            assert!(!v[key].is_null(), "{key} missing in {v}");
        }
        v
    }
    fn planned(v: &serde_json::Value) -> Vec<RecordedLaunch> {
        v["launches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| RecordedLaunch {
                name: l["entry"].as_str().unwrap().to_string(),
                config: speckv_kernels::emu::LaunchConfig {
                    grid: l["grid"][0].as_u64().unwrap() as u32,
                    block: l["block"][0].as_u64().unwrap() as u32,
                    shared_bytes: l["shared_bytes"].as_u64().unwrap() as usize,
                },
            })
            .collect()
    }
    fn distinct(seen: Vec<RecordedLaunch>) -> Vec<RecordedLaunch> {
        let mut out: Vec<RecordedLaunch> = Vec::new();
        for l in seen {
            if !out.contains(&l) {
                out.push(l);
            }
        }
        out
    }

    let big = plan(&[
        "--kernel",
        "softmax_stats",
        "--rows",
        "1",
        "--vocab",
        "128256",
        "--dtype",
        "f16",
    ]);
    assert_eq!(big["entry"], "softmax_stats_v2_f16");
    assert!(big["grid"][0].as_u64().unwrap() >= 264, "{big}");

    let emu = Emulator::new(32);
    // softmax_stats v2, 3 rows × 5000 f16 on 132 SMs.
    let (rows, vocab) = (3usize, 5000usize);
    let x: Vec<half::f16> = (0..rows * vocab)
        .map(|i| half::f16::from_f32(((i * 37) % 101) as f32 / 16.0 - 3.0))
        .collect();
    let l = Logits::dense(LogitsData::F16(&x), vocab).unwrap();
    let (r, seen) =
        record_launches(|| emu.softmax_stats_v2(&l, &StatsOptions::default(), None, 132, None));
    r.unwrap();
    let p = plan(&[
        "--kernel",
        "softmax_stats",
        "--rows",
        "3",
        "--vocab",
        "5000",
        "--dtype",
        "f16",
    ]);
    assert_eq!(distinct(seen), planned(&p));

    // softmax_stats v3, 4 described rows (out of order, one read twice) of those 3 rows.
    let opts = [StatsOptions::default(); 4];
    let mut acc = [speckv::FeatureAccum::EMPTY; 4];
    let (r, seen) =
        record_launches(|| emu.softmax_stats_v3(&l, &[2, 0, 2, 1], &opts, &mut acc, 132));
    r.unwrap();
    let p = plan(&[
        "--kernel",
        "softmax_stats",
        "--version",
        "3",
        "--rows",
        "4",
        "--vocab",
        "5000",
        "--dtype",
        "f16",
    ]);
    assert_eq!(p["entry"], "softmax_stats_v3_f16");
    assert_eq!(distinct(seen), planned(&p));

    // verify v2, 2 sequences, γ = 3, logits draft (the draft rows' statistics launch included).
    let (batch, g) = (2usize, 3usize);
    let target: Vec<half::f16> = (0..batch * (g + 1) * vocab)
        .map(|i| half::f16::from_f32(((i * 13) % 29) as f32 / 8.0))
        .collect();
    let draft: Vec<half::f16> = (0..batch * g * vocab)
        .map(|i| half::f16::from_f32(((i * 7) % 31) as f32 / 8.0))
        .collect();
    let tokens = vec![5i32; batch * g];
    let gammas = vec![g as i32; batch];
    let temps = vec![1.0f32; batch];
    let vb = VerifyBatch {
        target: LogitsData::F16(&target),
        target_stride: vocab,
        draft: DraftDist::Logits {
            data: LogitsData::F16(&draft),
            temperature: &temps,
        },
        draft_stride: vocab,
        draft_tokens: &tokens,
        gammas: &gammas,
        target_temperature: &temps,
        batch,
        gamma_max: g,
        vocab,
        seed: 3,
        step: 0,
    };
    let (r, seen) = record_launches(|| emu.verify_v2(&vb, 132));
    r.unwrap();
    let p = plan(&[
        "--kernel", "verify", "--batch", "2", "--gamma", "3", "--vocab", "5000", "--dtype", "f16",
    ]);
    assert_eq!(distinct(seen), planned(&p));

    // gemv v2: CUDA cores at M = 1, tensor cores at M = 5, every format.
    let (out, inp) = (96usize, 256usize);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 11) % 17) as f32 / 64.0 - 0.1)
        .collect();
    for format in Format::ALL {
        let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
        for m in [1usize, 5] {
            let xs: Vec<f32> = (0..m * inp).map(|i| (i % 7) as f32 / 8.0).collect();
            let (r, seen) = record_launches(|| emu.gemv_v2(&q, &xs, m, 132));
            r.unwrap();
            let (o, i, mm) = (out.to_string(), inp.to_string(), m.to_string());
            let p = plan(&[
                "--kernel",
                "gemv",
                "--format",
                format.name(),
                "--out",
                &o,
                "--in",
                &i,
                "--m",
                &mm,
            ]);
            assert_eq!(distinct(seen), planned(&p), "{} m={m}", format.name());
        }
    }
}

/// `bench predict` on the committed FP16 traces: plain is one token per M = 1 pass, fixed γ and the
/// oracle are what `bench decode --traces` computes, the oracle bounds every fixed γ and the
/// heuristic.
#[test]
fn bench_predict_reads_traces_and_a_cost_model() {
    let root = env!("CARGO_MANIFEST_DIR");
    let traces = format!("{root}/results/qwen/fp16/steps.csv");
    let cost = format!("{root}/results/qwen/fp16/steps.cost.json");
    let (ok, out, err) = speckv(&[
        "bench", "predict", "--traces", &traces, "--cost", &cost, "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cost).unwrap()).unwrap();
    let plain = v["plain_tokens_per_second"].as_f64().unwrap();
    assert!((plain - 1e3 / c["verify_ms"][0].as_f64().unwrap()).abs() < 1e-9);
    let oracle = v["oracle_tokens_per_second"].as_f64().unwrap();
    for (_, f) in v["fixed_tokens_per_second"].as_object().unwrap() {
        assert!(f.as_f64().unwrap() <= oracle + 1e-9);
    }
    assert!(v["heuristic_tokens_per_second"].as_f64().unwrap() <= oracle + 1e-9);
    let hf = v["hf_default_tokens_per_second"].as_f64().unwrap();
    assert!(hf > 0.0 && hf <= oracle + 1e-9, "{hf}");
    assert!(v["hf_default_mean_gamma"].as_f64().unwrap() >= 1.0);
    // `auto` replayed with its gate off (every step drafts).
    assert!(v["auto_gate_off_tokens_per_second"].as_f64().unwrap() > 0.0);
    let p_min = v["p_min_tokens_per_second"].as_object().unwrap();
    let ps: Vec<&str> = p_min.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        ps,
        ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    );
    assert!(
        p_min.values().all(|t| t.as_f64().unwrap() > 0.0),
        "{p_min:?}"
    );
    assert!(v["steps"].as_u64().unwrap() > 0);
    // That cost model predates the draft's feeds, and says so.
    assert!(
        v["draft_first_feed"]
            .as_str()
            .unwrap()
            .starts_with("not in"),
        "{v}"
    );
    let (ok, _, err) = speckv(&[
        "bench",
        "predict",
        "--traces",
        &traces,
        "--cost",
        "/nonexistent",
    ]);
    assert!(!ok && err.contains("nonexistent"), "{err}");
}

/// `bench step` on the CPU writes a cost model per regime that carries the draft's feeds (a pass
/// fed n = 1..=8 tokens, as `speckv profile`'s): the replays read it, and the draft's time per token
/// is its one-token feed.
#[test]
fn bench_step_writes_cost_models_with_the_drafts_feeds() {
    let dir = std::env::temp_dir().join(format!("speckv-step-{}", std::process::id()));
    let (ok, out, err) = speckv(&[
        "--backend",
        "cpu",
        "bench",
        "step",
        "--seconds",
        "0.001",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("fed n = 1..8 tokens"), "{out}");
    let traces = format!("{}/results/qwen/fp16/steps.csv", env!("CARGO_MANIFEST_DIR"));
    for regime in ["fp16", "int8", "nf4"] {
        let path = dir.join(format!("cost_{regime}.json"));
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let feeds: Vec<f64> = c["draft_feed_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(feeds.len(), 8, "{regime}");
        assert!(feeds.iter().all(|&f| f.is_finite() && f > 0.0), "{feeds:?}");
        assert_eq!(c["draft_ms_per_token"].as_f64().unwrap(), feeds[0]);
        assert_eq!(c["verify_ms"].as_array().unwrap().len(), 9);
        let (ok, out, err) = speckv(&[
            "bench",
            "predict",
            "--traces",
            &traces,
            "--cost",
            path.to_str().unwrap(),
        ]);
        assert!(ok, "{regime}: {err}");
        assert!(
            out.contains(
                "the draft's first feed: charged by the tokens it feeds (draft_feed_ms, 1..=8"
            ),
            "{out}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--draft-catch-up` is one option of the three decoding commands: 0 and words other than `all`
/// are refused by the parser, and on a model a window of 1 feeds the draft fewer tokens than `all`
/// while decoding plain decoding's tokens (`every:3:1`: two plain steps before each draft).
#[test]
fn the_draft_catch_up_window_is_an_option_of_the_decoding_commands() {
    let base: [&[&str]; 3] = [
        &["generate", "--model", "m.gguf", "--prompt", "hi"],
        &["bench", "decode", "--model", "m.gguf"],
        &["bench", "batch", "--model", "m.gguf"],
    ];
    for cmd in base {
        for (value, says) in [
            ("0", "at least 1 (the pending token)"),
            ("x", "\"x\" is neither a token count nor `all`"),
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--draft-catch-up", value]);
            let (ok, _, stderr) = speckv(&args);
            assert!(!ok, "{args:?}");
            assert!(
                stderr.contains(says) && !stderr.contains("panicked"),
                "{args:?}: {stderr}"
            );
        }
    }
    let Some(m) = common::smollm2() else { return };
    let m = m.to_str().unwrap();
    let gen = |policy: &str, window: &str| {
        let (ok, out, err) = speckv(&[
            "--backend",
            "cpu",
            "generate",
            "--model",
            m,
            "--prompt",
            "Name three colours.",
            "--max-tokens",
            "12",
            "--policy",
            policy,
            "--draft-catch-up",
            window,
            "--json",
        ]);
        assert!(ok, "{policy} {window}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let plain = gen("plain", "all");
    let (all, one) = (gen("every:3:1", "all"), gen("every:3:1", "1"));
    assert_eq!(all["tokens"], plain["tokens"]);
    assert_eq!(one["tokens"], plain["tokens"]);
    let fed = |v: &serde_json::Value| v["draft_tokens"].as_u64().unwrap();
    assert!(
        fed(&one) < fed(&all),
        "window 1: {}, all: {}",
        fed(&one),
        fed(&all)
    );
    // γ = 1 drafts feed nothing after the catch-up, so a window of 1 feeds one token per draft.
    let drafts: u64 = one["gamma_histogram"]["1"].as_u64().unwrap();
    assert_eq!(fed(&one), drafts);
}

/// `generate --step-log` writes one row per sequence and speculative step, and the rows add up to
/// the counts the JSON reports (one prompt with `auto`, two batched with `fixed:2`).
#[test]
fn generate_logs_every_speculative_step() {
    let log_rows = |path: &std::path::Path| -> Vec<Vec<f64>> {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(
                "step,sequence,gamma,accepted,verify_positions,draft_passes,draft_tokens,\
                 first_feed_tokens,first_feed_seconds,draft_seconds,verify_seconds"
            )
        );
        // An empty field (a first feed not timed apart) reads as NaN.
        lines
            .map(|l| {
                l.split(',')
                    .map(|x| {
                        if x.is_empty() {
                            f64::NAN
                        } else {
                            x.parse().unwrap()
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let (ok, _, stderr) = speckv(&[
        "generate",
        "--model",
        "m.gguf",
        "--prompt",
        "hi",
        "--policy",
        "plain",
        "--step-log",
        "x.csv",
    ]);
    assert!(
        !ok && stderr.contains("`--policy plain` makes none"),
        "{stderr}"
    );
    let Some(m) = common::smollm2() else { return };
    let m = m.to_str().unwrap();
    let gen = |prompts: &[&str], policy: &str, log: &std::path::Path| {
        let mut args = vec!["--backend", "cpu", "generate", "--model", m];
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        args.extend([
            "--max-tokens",
            "10",
            "--policy",
            policy,
            "--json",
            "--step-log",
        ]);
        args.push(log.to_str().unwrap());
        let (ok, out, err) = speckv(&args);
        assert!(ok, "{policy}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // The counts of one sequence's rows: steps, drafts verified, drafts accepted.
    let counts = |rows: &[Vec<f64>], seq: f64| {
        let mine: Vec<&Vec<f64>> = rows.iter().filter(|r| r[1] == seq).collect();
        let sum = |c: usize| mine.iter().map(|r| r[c]).sum::<f64>();
        (mine.len() as f64, sum(2), sum(3))
    };
    let from_json = |q: &serde_json::Value| {
        let steps = q["steps"].as_f64().unwrap();
        let drafted = q["mean_gamma"].as_f64().unwrap() * steps;
        let accepted = q["acceptance_rate"].as_f64().unwrap() * drafted;
        (steps, drafted.round(), accepted.round())
    };
    let one = common::tmp("cli", "steps-one.csv");
    let v = gen(&["Name three colours."], "auto", &one);
    let rows = log_rows(&one);
    assert_eq!(counts(&rows, 0.0), from_json(&v));
    let fed: f64 = rows.iter().map(|r| r[6]).sum();
    assert_eq!(fed, v["draft_tokens"].as_f64().unwrap());
    for (i, r) in rows.iter().enumerate() {
        assert_eq!((r[0], r[1]), (i as f64, 0.0), "{r:?}");
        assert!(r[3] <= r[2] && r[4] == r[2] + 1.0, "{r:?}");
        assert!(r[9] >= 0.0 && r[10] > 0.0, "{r:?}");
        // `auto` decides per draft: every drafted token is a pass (a discarded one too), the
        // first feeds the pending token and any backlog, the others one draft each.
        let passes = r[5];
        if passes == 0.0 {
            assert!(
                r[2] == 0.0 && r[6] == 0.0 && r[8].is_nan(),
                "a plain step: {r:?}"
            );
        } else {
            assert!(passes >= r[2] && passes <= r[2] + 1.0, "{r:?}");
            assert_eq!(r[6], r[7] + passes - 1.0, "{r:?}");
            assert!(r[7] >= 1.0 && r[8] > 0.0 && r[8] <= r[9], "{r:?}");
        }
    }
    // The model drafting for itself accepts every draft, so each step after the first begins by
    // feeding the pending token and the draft the step before left unseen, then one per draft.
    let own = common::tmp("cli", "steps-own.csv");
    let (ok, _, err) = speckv(&[
        "--backend",
        "cpu",
        "generate",
        "--model",
        m,
        "--draft",
        m,
        "--prompt",
        "Name three colours.",
        "--max-tokens",
        "16",
        "--gamma-max",
        "3",
        "--policy",
        "confidence:0",
        "--step-log",
        own.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let rows = log_rows(&own);
    assert!(rows.len() >= 3, "{rows:?}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(
            (r[2], r[3], r[5]),
            (3.0, 3.0, 3.0),
            "all drafted, all accepted: {r:?}"
        );
        assert_eq!(r[7], if i == 0 { 1.0 } else { 2.0 }, "{r:?}");
        assert_eq!(r[6], r[7] + 2.0, "{r:?}");
        assert!(r[8] > 0.0 && r[8] < r[9], "{r:?}");
    }
    let two = common::tmp("cli", "steps-two.csv");
    let v = gen(&["Name three colours.", "What is 2+2?"], "fixed:2", &two);
    let rows = log_rows(&two);
    let fed: f64 = rows.iter().map(|r| r[6]).sum();
    assert_eq!(fed, v["draft_tokens"].as_f64().unwrap());
    for (b, q) in v["sequences"].as_array().unwrap().iter().enumerate() {
        assert_eq!(counts(&rows, b as f64), from_json(q), "sequence {b}");
    }
    // A step's rows share its pass: one verification of the step's largest γ + 1 positions.
    let mut steps: Vec<f64> = rows.iter().map(|r| r[0]).collect();
    steps.dedup();
    let passes = v["target_passes"].as_u64().unwrap();
    assert_eq!(steps, (0..passes).map(|s| s as f64).collect::<Vec<_>>());
    for s in steps {
        let of: Vec<&Vec<f64>> = rows.iter().filter(|r| r[0] == s).collect();
        let widest = of.iter().map(|r| r[2]).fold(0.0, f64::max);
        let shared =
            |r: &&Vec<f64>| [r[5], r[8], r[9], r[10]] == [of[0][5], of[0][8], of[0][9], of[0][10]];
        assert!(
            of.iter().all(|r| r[4] == widest + 1.0 && shared(r)),
            "{of:?}"
        );
        // fixed:2 drafts twice in lockstep: a first feed, then one draft each.
        assert_eq!(of[0][5], 2.0, "{of:?}");
        assert!(of.iter().all(|r| r[6] == r[7] + 1.0), "{of:?}");
        assert!(of[0][8] > 0.0 && of[0][8] <= of[0][9], "{of:?}");
    }
    let passes: f64 = rows.iter().filter(|r| r[1] == 0.0).map(|r| r[5]).sum();
    assert_eq!(passes, v["draft_passes"].as_f64().unwrap());
}

/// The replays charge a step's first draft pass for the tokens `DraftLag` says the draft has yet
/// to see; `generate`'s step log says what the decode loop fed it. They agree row by row: after a
/// partly accepted step, after a fully accepted one (the model drafting for itself), after plain
/// steps (`every:N:G`; `auto`'s too, when its gate probes within the run), and with a catch-up
/// window shorter than the backlog.
#[test]
fn the_replays_feed_the_draft_as_generate_does() {
    use speckv::controller::replay::DraftLag;
    let Some(m) = common::smollm2() else { return };
    let m = m.to_str().unwrap();
    let cases: [(&str, &[&str], Option<usize>); 5] = [
        ("auto", &[], Some(8)),
        ("every:3:2", &[], Some(8)),
        ("every:4:2", &["--draft-catch-up", "2"], Some(2)),
        ("every:3:3", &["--draft", m], Some(8)),
        ("fixed:3", &["--draft", m], Some(8)),
    ];
    for (policy, extra, window) in cases {
        let log = common::tmp("cli", &format!("lag-{}.csv", policy.replace(':', "-")));
        let mut args = vec!["--backend", "cpu", "generate", "--model", m];
        args.extend_from_slice(extra);
        args.extend([
            "--prompt",
            "Name three colours.",
            "--max-tokens",
            "24",
            "--policy",
            policy,
            "--step-log",
            log.to_str().unwrap(),
        ]);
        let (ok, _, err) = speckv(&args);
        assert!(ok, "{policy}: {err}");
        let text = std::fs::read_to_string(&log).unwrap();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        let num = |r: &[&str], c: usize| r[c].parse::<usize>().unwrap();
        let mut lag = DraftLag::new(window);
        let (mut checked, mut longest) = (0, 0);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(num(r, 0), i, "{policy}: one row a step: {r:?}");
            let (gamma, accepted, passes) = (num(r, 2), num(r, 3), num(r, 5));
            if passes > 0 {
                assert_eq!(num(r, 7), lag.first_feed(), "{policy}, step {i}: {r:?}");
                longest = longest.max(num(r, 7));
                checked += 1;
            }
            lag.after_step(passes, gamma, accepted);
        }
        // `auto` speculates on its first step (no first-draft hazard yet); whether it speculates
        // again within 24 tokens depends on the times it measures (under load a self-draft's
        // first pass can measure dearer than a target pass, and then the gate stays plain), so
        // only the fixed schedules must feed the draft more than once.
        let least = if policy == "auto" { 1 } else { 2 };
        assert!(checked >= least, "{policy}: {rows:?}");
        // The every:N:G cases catch up after plain steps; with window 2 no feed exceeds it.
        match (policy, window) {
            ("every:3:2", _) | ("every:3:3", _) => assert!(longest >= 3, "{policy}: {rows:?}"),
            (_, Some(2)) => assert_eq!(longest, 2, "{policy}: {rows:?}"),
            _ => {}
        }
    }
}

/// A hazard model trained by `speckv train --hazard` is what `auto` runs: `bench predict --hazard`
/// replays it (the same numbers as the library's replay with that file), `generate --hazard`
/// decodes with it, and `--test-steps` scores it on other prompts' traces. A model that predicts
/// rejection for every draft makes `auto` verify none. `--hazard` where nothing reads it is refused.
#[test]
fn a_trained_hazard_model_is_what_auto_runs() {
    use speckv::controller::{hazard, hazard_training, replay, CostModel};
    let root = env!("CARGO_MANIFEST_DIR");
    let model = common::tmp("cli", "hazard.json");
    let (train, test) = (
        format!("{root}/results/qwen/int8/steps.csv"),
        format!("{root}/results/qwen/fp16/steps.csv"),
    );
    let m = model.to_str().unwrap();
    let (ok, out, err) = speckv(&[
        "train",
        "--hazard",
        "--steps",
        &train,
        "--test-steps",
        &test,
        "--out",
        m,
    ]);
    assert!(ok, "{err}");
    // Tested on every draft of the other file, trained and validated on the first file's runs.
    let held = hazard_training::examples(&hazard_training::read_trace_rows(test.as_ref()).unwrap())
        .unwrap()
        .len();
    assert!(
        out.contains(&format!("(--test-steps, {held} drafts)")),
        "{out}"
    );
    assert!(out.contains(&format!("--hazard {m}")), "{out}");
    let trained = hazard::HazardModel::load(&model).unwrap();
    assert!(
        trained
            .source
            .contains("[0, 1] train, [2] validation, tested on --test-steps"),
        "{}",
        trained.source
    );
    // bench predict replays `auto` with it: what the library's replay gives with that model.
    let cost = format!("{root}/results/qwen/controller-v5/fp16/steps.cost.json");
    let predict = |hazard: &str| {
        let (ok, out, err) = speckv(&[
            "bench", "predict", "--traces", &test, "--cost", &cost, "--hazard", hazard, "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = predict(m);
    let rows = hazard_training::read_trace_rows(test.as_ref()).unwrap();
    let cm = CostModel::load(cost.as_ref()).unwrap();
    let want = replay::auto_on_traces(&rows, &trained, &cm).unwrap();
    assert_eq!(
        v["auto_tokens_per_second"].as_f64().unwrap(),
        want.tokens_per_second
    );
    assert!(v["hazard_model"].as_str().unwrap().starts_with(m), "{v}");
    // A model that predicts rejection for every draft: `auto` verifies none.
    let reject_path = common::tmp("cli", "reject.json");
    common::constant_hazard(0.001).save(&reject_path).unwrap();
    let v = predict(reject_path.to_str().unwrap());
    assert_eq!(v["auto_mean_gamma"].as_f64(), Some(0.0), "{v}");
    // --hazard is refused where nothing would read it, and a missing file is an error.
    let (ok, _, err) = speckv(&[
        "generate", "--model", "m.gguf", "--prompt", "hi", "--policy", "fixed:2", "--hazard", m,
    ]);
    assert!(!ok && err.contains("only the auto policies"), "{err}");
    let (ok, _, err) = speckv(&[
        "bench",
        "predict",
        "--traces",
        &test,
        "--cost",
        &cost,
        "--hazard",
        "/nonexistent/h.json",
    ]);
    assert!(!ok && err.contains("/nonexistent/h.json"), "{err}");
    let (ok, _, err) = speckv(&[
        "train",
        "--steps",
        &train,
        "--test-steps",
        &test,
        "--out",
        m,
    ]);
    assert!(!ok && err.contains("needs --hazard"), "{err}");
    // Runs numbered up to u32::MAX leave no number for the held-out runs: an error, not a wrap.
    let text = std::fs::read_to_string(&train).unwrap();
    let last: String = text
        .lines()
        .map(|l| match l.strip_prefix("2,") {
            Some(rest) => format!("4294967295,{rest}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    let last_path = common::tmp("cli", "run-max.csv");
    std::fs::write(&last_path, last).unwrap();
    let (ok, _, err) = speckv(&[
        "train",
        "--hazard",
        "--steps",
        last_path.to_str().unwrap(),
        "--test-steps",
        &test,
        "--out",
        m,
    ]);
    assert!(!ok && err.contains("run 4294967295: too large"), "{err}");
    // generate decodes with it (the model as its own draft: every draft is accepted). The
    // rejecting model's drafts are all discarded; a model that predicts acceptance for every
    // draft drafts γmax on the first step, decided under the prior's costs before any is measured
    // (the shipped model discards that step's first draft here).
    let accept_path = common::tmp("cli", "accept.json");
    common::constant_hazard(0.999).save(&accept_path).unwrap();
    if let Some(gguf) = common::smollm2() {
        let g = gguf.to_str().unwrap();
        let gen = |policy: &str, hazard: &str| {
            speckv(&[
                "--backend",
                "cpu",
                "generate",
                "--model",
                g,
                "--draft",
                g,
                "--prompt",
                "Name three colours.",
                "--max-tokens",
                "8",
                "--policy",
                policy,
                "--hazard",
                hazard,
                "--json",
            ])
        };
        let json = |(ok, out, err): (bool, String, String)| {
            assert!(ok, "{err}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        };
        let reject = reject_path.to_str().unwrap();
        let v = json(gen("auto", reject));
        assert_eq!(v["mean_gamma"].as_f64(), Some(0.0), "{v}");
        assert!(v["draft_tokens"].as_u64().unwrap() > 0, "{v}");
        // auto's gate then makes plain steps, drafting only on probes.
        let drafts = |v: &serde_json::Value| v["draft_tokens"].as_u64().unwrap();
        assert!(drafts(&v) < v["steps"].as_u64().unwrap(), "{v}");
        // auto-nogate: no plain step, so every step drafts a token and discards it.
        let v = json(gen("auto-nogate", reject));
        assert_eq!(v["mean_gamma"].as_f64(), Some(0.0), "{v}");
        assert!(drafts(&v) >= v["steps"].as_u64().unwrap(), "{v}");
        let v = json(gen("auto", accept_path.to_str().unwrap()));
        assert!(v["gamma_histogram"]["8"].as_u64().unwrap() >= 1, "{v}");
        let (ok, _, err) = gen("auto", "/nonexistent/h.json");
        assert!(!ok && err.contains("/nonexistent/h.json"), "{err}");
    }
}

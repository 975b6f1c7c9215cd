//! `--backend cuda` on the real-model commands (`generate`, `profile`, `bench decode`), checked
//! without a GPU: `SPECKV_CUDA_EMULATE=1` runs the same device passes (speckv's kernels in the
//! launch program) on the emulator, on SmolLM2-135M in the FP16 regime (skipped with a message where
//! the model has not been fetched). Without that variable and without a GPU, the command says CUDA
//! is unavailable; the gguf regime, which has no device kernels, is refused before any GPU work.

mod common;

use std::process::Command;

use common::smollm2;

/// Runs speckv; `emulate` sets SPECKV_CUDA_EMULATE=1 (one emulator schedule: the kernels' schedule
/// independence is the kernel tests' business, this checks the passes).
fn speckv(args: &[&str], emulate: bool) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_speckv"));
    c.args(args).env_remove("SPECKV_CUDA_EMULATE");
    if emulate {
        c.env("SPECKV_CUDA_EMULATE", "1")
            .env("SPECKV_EMU_SCHEDULES", "1");
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tokens(json: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    common::tmp("device-cli", name)
}

#[test]
fn generate_on_the_device_passes_decodes_the_cpu_tokens() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let gen = |backend: &str, policy: &str, emulate: bool| {
        let (ok, out, err) = speckv(
            &[
                "--backend",
                backend,
                "generate",
                "--model",
                m,
                "--target",
                "fp16",
                "--prompt",
                "What is 2+2?",
                "--max-tokens",
                "3",
                "--policy",
                policy,
                "--json",
            ],
            emulate,
        );
        assert!(ok, "{backend} {policy}: {err}");
        tokens(&out)
    };
    let cpu = gen("cpu", "plain", false);
    assert_eq!(cpu.len(), 3);
    assert_eq!(
        gen("cuda", "plain", true),
        cpu,
        "the device pass decodes the CPU's tokens"
    );
    // Speculative on the device passes (the target skipping every other layer drafts): lossless.
    assert_eq!(gen("cuda", "fixed:2", true), cpu);
}

/// Two prompts given to `generate` decode as one batch, on the device passes (emulated) and on the
/// CPU's batched state: each gets the tokens it gets alone on the CPU (plain and speculative,
/// greedy).
#[test]
fn generate_batches_several_prompts_on_every_backend() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let prompts = ["What is 2+2?", "Name a colour."];
    // `generate` with `prompts`, γmax 2 unless `gamma` says otherwise, JSON out.
    let gen_with = |backend: &str, policy: &str, prompts: &[&str], gamma: &str, emulate: bool| {
        let mut args = vec!["--backend", backend, "generate", "--model", m];
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        args.extend(["--target", "fp16", "--max-tokens", "3", "--policy", policy]);
        args.extend(["--gamma-max", gamma, "--json"]);
        speckv(&args, emulate)
    };
    let gen = |backend: &str, policy: &str, prompts: &[&str], emulate: bool| {
        gen_with(backend, policy, prompts, "2", emulate)
    };
    let alone: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| {
            let (ok, out, err) = gen("cpu", "plain", &[p], false);
            assert!(ok, "{err}");
            tokens(&out)
        })
        .collect();
    // The device program (emulated) and the CPU's batched state.
    for (backend, policy) in [("cuda", "plain"), ("cuda", "fixed:2"), ("cpu", "fixed:2")] {
        let (ok, out, err) = gen(backend, policy, &prompts, backend == "cuda");
        assert!(ok, "{backend} {policy}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let seqs = v["sequences"].as_array().unwrap();
        for (b, want) in alone.iter().enumerate() {
            let got: Vec<u64> = seqs[b]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            assert_eq!(&got, want, "{backend} {policy}: prompt {b}");
        }
        assert!(v["target_passes"].as_u64().unwrap() > 0, "{out}");
    }
    // Two sequences verify at most 7 drafts each in a step of 16 rows: γmax 8 is refused.
    let (ok, _, err) = gen_with("cuda", "fixed:2", &prompts, "8", true);
    assert!(!ok && err.contains("γmax 1 to 7"), "{err}");
}

#[test]
fn profile_and_bench_decode_run_on_the_device_passes() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let prompts = tmp("prompts.jsonl");
    std::fs::write(&prompts, "{\"category\": \"math\", \"prompt\": \"2+2?\"}\n").unwrap();
    let p = prompts.to_str().unwrap();
    let csv = tmp("steps.csv");
    let (ok, out, err) = speckv(
        &[
            "--backend",
            "cuda",
            "profile",
            "--model",
            m,
            "--target",
            "fp16",
            "--prompts",
            p,
            "--per-category",
            "1",
            "--max-tokens",
            "2",
            "--gamma-max",
            "2",
            "--out",
            csv.to_str().unwrap(),
        ],
        true,
    );
    assert!(ok, "{out}{err}");
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert!(rows.lines().count() > 1, "{rows}");
    assert!(csv.with_extension("cost.json").exists());
    let (ok, out, err) = speckv(
        &[
            "--backend",
            "cuda",
            "bench",
            "decode",
            "--model",
            m,
            "--target",
            "fp16",
            "--prompts",
            p,
            "--offset",
            "0",
            "--per-category",
            "1",
            "--max-tokens",
            "2",
            "--policies",
            "plain,fixed:2",
            "--json",
        ],
        true,
    );
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fixed = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"] == "fixed:2")
        .unwrap();
    assert_eq!(fixed["matches_plain"], true, "{out}");
}

#[test]
fn backend_without_a_device_or_device_kernels_is_an_error() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    // GGUF blocks have no device kernels: refused before any GPU work, GPU or not.
    let (ok, _, err) = speckv(
        &[
            "--backend",
            "cuda",
            "generate",
            "--model",
            m,
            "--target",
            "gguf",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ],
        false,
    );
    assert!(
        !ok && err.contains("not supported") && err.contains("gguf"),
        "{err}"
    );
    if speckv::backend::cuda::driver_present() {
        return; // a machine with a driver runs the real thing instead
    }
    let (ok, _, err) = speckv(
        &[
            "--backend",
            "cuda",
            "generate",
            "--model",
            m,
            "--target",
            "fp16",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ],
        false,
    );
    assert!(!ok && err.contains("CUDA backend is unavailable"), "{err}");
}

/// `bench step --shapes` checks its options before it looks for a GPU: a batch larger than one
/// step holds, a "batch" of one, no timed launches.
#[test]
fn bench_step_refuses_bad_options_before_any_gpu_work() {
    for (flag, value, says) in [
        ("--batch-sizes", "4,17", "batch size 17"),
        ("--batch-sizes", "1", "batch size 1"),
        ("--iters", "0", "--iters"),
    ] {
        let (ok, _, err) = speckv(
            &[
                "--backend",
                "cuda",
                "bench",
                "step",
                "--shapes",
                "qwen2.5-coder-0.5b",
                flag,
                value,
            ],
            false,
        );
        assert!(!ok && err.contains(says), "{flag} {value}: {err}");
    }
}

//! The C example (`examples/c/step.c`) is compiled against the shared library and run; its output
//! must equal the Rust API's on the same inputs, line for line.

use std::path::{Path, PathBuf};
use std::process::Command;

use speckv::backend::cpu::CpuBackend;
use speckv::controller::hazard::HazardModel;
use speckv::controller::Controller;
use speckv::stats::{Accumulate, Logits, LogitsData, StatsOptions};
use speckv::verify::{DraftDist, VerifyBatch};
use speckv_kernels::params::FeatureAccum;

const B: usize = 2;
const G: usize = 4;
const V: usize = 64;

fn draft_logit(b: usize, j: usize, k: usize) -> f32 {
    ((k * k * (1 + j + b) + k * 37 + b * 5) % 64) as f32 / 4.0 - 8.0
}

fn target_logit(b: usize, j: usize, k: usize) -> f32 {
    if j == G {
        return ((k * 29 + b * 3) % 64) as f32 / 8.0 - 4.0;
    }
    draft_logit(b, j, k)
        + if b == 1 {
            ((k * 13) % 7) as f32 / 4.0
        } else {
            0.0
        }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The C example's output computed with the Rust API.
fn rust_output() -> String {
    let mut draft = vec![0f32; B * G * V];
    let mut target = vec![0f32; B * (G + 1) * V];
    for b in 0..B {
        for j in 0..=G {
            for k in 0..V {
                if j < G {
                    draft[(b * G + j) * V + k] = draft_logit(b, j, k);
                }
                target[(b * (G + 1) + j) * V + k] = target_logit(b, j, k);
            }
        }
    }
    let cpu = CpuBackend::new();
    let mut out = String::new();
    let mut accum = [FeatureAccum::EMPTY; B];
    let mut tokens = [0i32; B * G];
    for j in 0..G {
        let l = Logits::new(LogitsData::F32(&draft[j * V..]), B, V, G * V).unwrap();
        let o = StatsOptions {
            temperature: 1.0,
            sample: true,
            seed: 42,
            step: j as u64,
            accumulate: if j == 0 {
                Accumulate::Reset
            } else {
                Accumulate::Add
            },
        };
        let st = cpu.softmax_stats(&l, &o, Some(&mut accum)).unwrap();
        for (b, s) in st.iter().enumerate() {
            tokens[b * G + j] = s.sampled;
            out += &format!(
                "stats j={j} b={b} entropy={:.6} confidence={:.6} argmax={} sampled={}\n",
                s.entropy, s.confidence, s.argmax, s.sampled
            );
        }
    }
    let mlp = speckv::controller::mlp::Mlp::load(&root().join("assets/controller.json")).unwrap();
    let c = Controller::new(mlp, &[1, 2, 3, 4], None).unwrap();
    let w = c.mlp.to_f32();
    let mut gammas = [0i32; B];
    for b in 0..B {
        let (g, t, f) = c.decide_f32(&w, &accum[b], 0.0, 4);
        gammas[b] = g;
        out += &format!("gamma b={b} gamma={g} expected={t:.6} flags={f}\n");
    }
    let temps = [1.0f32; B];
    let vb = VerifyBatch {
        target: LogitsData::F32(&target),
        target_stride: V,
        draft: DraftDist::Logits {
            data: LogitsData::F32(&draft),
            temperature: &temps,
        },
        draft_stride: V,
        draft_tokens: &tokens,
        gammas: &gammas,
        target_temperature: &temps,
        batch: B,
        gamma_max: G,
        vocab: V,
        seed: 7,
        step: 0,
    };
    let o = cpu.verify(&vb).unwrap();
    for b in 0..B {
        let em: Vec<String> = o.tokens(b).iter().map(|t| t.to_string()).collect();
        let cf: Vec<String> = o.counterfactual[b * (G + 1)..(b + 1) * (G + 1)]
            .iter()
            .map(|t| t.to_string())
            .collect();
        out += &format!(
            "verify b={b} accepted={} flags={} emitted={} counterfactual={}\n",
            o.accepted[b],
            o.flags[b],
            em.join(","),
            cf.join(",")
        );
    }
    out += "misuse: args is null\n";
    out
}

/// Compiles `examples/c/<name>.c` against the shared library, runs it with `args` and returns its
/// output.
fn run_c_example(name: &str, args: &[PathBuf]) -> String {
    // target/<profile>/deps/c_example-… → target/<profile>
    let exe = std::env::current_exe().unwrap();
    let lib_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        lib_dir.join("libspeckv_c.so").exists(),
        "libspeckv_c.so not found in {}: run `cargo build --release -p speckv-capi` first (scripts/test does)",
        lib_dir.display()
    );
    let bin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("speckv_{name}"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .arg(root().join(format!("examples/c/{name}.c")))
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-lspeckv_c")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&bin)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e} (set CC)"));
    assert!(status.success(), "compiling examples/c/{name}.c failed");
    let out = Command::new(&bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "the C example {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value after `key` in a line of an example's output.
fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn c_example_matches_the_rust_api() {
    let c_text = run_c_example("step", &[root().join("assets/controller.json")]);
    let rust_text = rust_output();
    assert_eq!(c_text, rust_text);
    // The step did something: every row was drafted, γ came from the controller (not the
    // fallback) for every sequence, and drafts were accepted — the comparison above would also
    // pass on a step that rejected everything.
    assert_eq!(
        c_text.lines().filter(|l| l.starts_with("stats")).count(),
        B * G
    );
    let gamma_lines: Vec<&str> = c_text.lines().filter(|l| l.starts_with("gamma ")).collect();
    assert_eq!(gamma_lines.len(), B);
    for l in &gamma_lines {
        assert_eq!(field(l, "flags="), 0, "fallback γ: {l}");
        assert!((1..=4).contains(&field(l, "gamma=")), "{l}");
    }
    let accepted: Vec<i64> = c_text
        .lines()
        .filter(|l| l.starts_with("verify "))
        .map(|l| {
            assert_eq!(field(l, "flags="), 0, "flagged sequence: {l}");
            field(l, "accepted=")
        })
        .collect();
    assert_eq!(accepted.len(), B);
    assert!(
        accepted.iter().any(|&a| a > 0),
        "no draft was accepted in the example: {accepted:?}"
    );
}

const AB: usize = 3;
const AG: usize = 6;
const AV: usize = 64;

/// `examples/c/auto_step.c`'s inputs.
fn auto_draft_logit(b: usize, j: usize, k: usize) -> f32 {
    if k == (j * 5 + b * 11) % AV {
        return if j < 2 * b { 12.0 } else { 1.0 };
    }
    ((k * k * (1 + j + b) + k * 37 + b * 5) % 64) as f32 / 16.0 - 2.0
}

fn auto_target_logit(b: usize, j: usize, k: usize) -> f32 {
    if j < AG && j <= b {
        return auto_draft_logit(b, j, k);
    }
    if k == (j * 7 + b) % AV {
        9.0
    } else {
        ((k * 29 + b * 3) % 64) as f32 / 16.0
    }
}

/// The adaptive C example's output computed with the Rust API: the CPU backend's batched stop
/// with the shipped hazard model and the assumed costs, then verification.
fn rust_auto_output() -> String {
    use speckv::backend::emulate::Stop;
    use speckv::controller::hazard::{
        Calibration, HazardModel, OnlineCost, CALIBRATION_RATE, ONLINE_COST_ALPHA,
    };
    use speckv::controller::CostModel;
    use speckv_kernels::params::StopState;

    let mut draft = vec![0f32; AB * AG * AV];
    let mut target = vec![0f32; AB * (AG + 1) * AV];
    for b in 0..AB {
        for j in 0..=AG {
            for k in 0..AV {
                if j < AG {
                    draft[(b * AG + j) * AV + k] = auto_draft_logit(b, j, k);
                }
                target[(b * (AG + 1) + j) * AV + k] = auto_target_logit(b, j, k);
            }
        }
    }
    let cpu = CpuBackend::new();
    let costs = OnlineCost::new(CostModel::assumed(), ONLINE_COST_ALPHA).step_costs(AG);
    let w = HazardModel::default_model().unwrap().weights();
    let mut out = format!(
        "costs draft={:.6} verify0={:.6} verify{AG}={:.6}\n",
        costs.draft, costs.verify[0], costs.verify[AG]
    );
    let mut accum = [FeatureAccum::EMPTY; AB];
    let mut state = vec![StopState::START; AB];
    let mut gammas = vec![0i32; AB];
    let mut tokens = [0i32; AB * AG];
    let mut hazards = [f32::NAN; AB * 16];
    let (mut stopped, mut drafted) = (0, 0);
    while drafted < AG && stopped < AB as u32 {
        let j = drafted;
        let l = Logits::new(LogitsData::F32(&draft[j * AV..]), AB, AV, AG * AV).unwrap();
        let o = StatsOptions {
            temperature: 0.0,
            sample: false,
            seed: 0,
            step: j as u64,
            accumulate: if j == 0 {
                Accumulate::Reset
            } else {
                Accumulate::Add
            },
        };
        let stop = Stop {
            weights: &w,
            state: &state,
            costs,
            gamma_max: AG as u32,
            compression_code: 0.0,
            odds_scale: 1.0,
            odds_scales: None,
            lockstep: false,
        };
        let r = cpu.softmax_stats_stop(&l, &o, &mut accum, stop).unwrap();
        state = r.stop_state.unwrap();
        gammas = r.gammas.unwrap();
        for (i, h) in r.hazards.unwrap().into_iter().enumerate() {
            if !h.is_nan() {
                hazards[i] = h;
            }
        }
        stopped += r.stopped_count.unwrap();
        drafted += 1;
        for (b, (s, st)) in r.stats.iter().zip(&state).enumerate() {
            tokens[b * AG + j] = s.argmax;
            out += &format!(
                "draft j={j} b={b} confidence={:.6} kept={} stopped={} expected={:.6}\n",
                s.confidence, st.kept, st.stopped, st.expected
            );
        }
        out += &format!("after j={j} stopped={stopped}\n");
    }
    out += &format!("drafted positions={drafted}\n");
    for (b, g) in gammas.iter().enumerate() {
        out += &format!("gamma b={b} gamma={g}\n");
    }
    let zero = [0f32; AB];
    let vb = VerifyBatch {
        target: LogitsData::F32(&target),
        target_stride: AV,
        draft: DraftDist::Logits {
            data: LogitsData::F32(&draft),
            temperature: &zero,
        },
        draft_stride: AV,
        draft_tokens: &tokens,
        gammas: &gammas,
        target_temperature: &zero,
        batch: AB,
        gamma_max: AG,
        vocab: AV,
        seed: 0,
        step: 0,
    };
    let o = cpu.verify(&vb).unwrap();
    for b in 0..AB {
        let em: Vec<String> = o.tokens(b).iter().map(|t| t.to_string()).collect();
        let hz: Vec<String> = hazards[b * 16..b * 16 + gammas[b] as usize]
            .iter()
            .map(|h| format!("{h:.6}"))
            .collect();
        out += &format!(
            "verify b={b} accepted={} flags={} emitted={} hazards={}\n",
            o.accepted[b],
            o.flags[b],
            em.join(","),
            hz.join(",")
        );
    }
    let kept = |b: usize| -> Vec<f64> {
        hazards[b * 16..b * 16 + gammas[b] as usize]
            .iter()
            .map(|&h| h as f64)
            .collect()
    };
    let mut cal = Calibration::new(CALIBRATION_RATE);
    for b in 0..AB {
        cal.observe(&kept(b), o.accepted[b] as usize);
    }
    out += &format!("calibrated odds_scale={:.6}\n", cal.odds_scale());
    for b in 0..AB {
        let mut own = Calibration::new(CALIBRATION_RATE);
        own.observe(&kept(b), o.accepted[b] as usize);
        out += &format!("calibrated each b={b} odds_scale={:.6}\n", own.odds_scale());
    }
    out
}

#[test]
fn c_auto_example_matches_the_rust_api() {
    let c_text = run_c_example("auto_step", &[]);
    assert_eq!(c_text, rust_auto_output());
    // The rule did its job: the sequences got different γ (flat drafts stop at once, confident
    // ones draft on), the loop ended on the counter before γmax, and drafts were accepted.
    let gammas: std::collections::BTreeSet<i64> = c_text
        .lines()
        .filter(|l| l.starts_with("gamma "))
        .map(|l| field(l, "gamma="))
        .collect();
    assert!(gammas.len() >= 3, "{gammas:?}");
    let drafted = c_text
        .lines()
        .find(|l| l.starts_with("drafted "))
        .map(|l| field(l, "positions="))
        .unwrap();
    assert!(drafted < AG as i64, "{c_text}");
    assert!(c_text
        .lines()
        .filter(|l| l.starts_with("verify "))
        .any(|l| field(l, "accepted=") > 1 && field(l, "flags=") == 0));
    // A hazard file and a cost file are read: a model that rejects everything drafts nothing.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let mut reject = HazardModel::default_model().unwrap();
    reject.mlp.w1 = [[0.0; 16]; 6];
    reject.mlp.w2 = [[0.0]; 16];
    reject.mlp.b2 = [0.001];
    let hazard = dir.join("c_auto_reject.json");
    reject.save(&hazard).unwrap();
    let cost = dir.join("c_auto_cost.json");
    std::fs::write(
        &cost,
        r#"{"draft_ms_per_token": 2.0, "verify_ms": [20.0, 21.0], "source": "test"}"#,
    )
    .unwrap();
    let text = run_c_example("auto_step", &[hazard, cost]);
    assert!(
        text.starts_with("costs draft=2.000000 verify0=20.000000 verify6=26.000000\n"),
        "{text}"
    );
    assert!(text.contains("drafted positions=1\n"), "{text}");
    assert!(text
        .lines()
        .filter(|l| l.starts_with("gamma "))
        .all(|l| field(l, "gamma=") == 0));
}

#[test]
fn committed_header_is_current() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/speckv.h")).unwrap();
    let committed = std::fs::read_to_string(root().join("include/speckv.h")).unwrap();
    assert!(
        generated == committed,
        "include/speckv.h is stale: run SPECKV_WRITE_HEADER=1 cargo build -p speckv-capi"
    );
}

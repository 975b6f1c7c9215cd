//! The `speckv` binary as a user runs it.

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
    assert_eq!(v["kernels"]["softmax_stats"]["validated_on_gpu"], false);
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

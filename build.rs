//! Compiles `kernels/` to PTX with rustc's own NVPTX backend and embeds it in the host library.
//!
//! For each architecture in `ARCHS` this runs
//! `cargo +nightly rustc --release --target nvptx64-nvidia-cuda -Zbuild-std=core -- --emit=asm
//! -C target-cpu=sm_XX -C codegen-units=1` on the kernels crate, with its own target directory
//! (`<target>/speckv-ptx`, so no lock is shared with this build) and with this build's `CARGO*`,
//! `RUSTC*`, `RUSTUP_TOOLCHAIN` and `RUSTFLAGS` variables removed (otherwise the child inherits the
//! stable toolchain). It never links: no nvptx rust-std or bitcode linker is needed.
//!
//! Without a nightly toolchain with `rust-src` the build still succeeds, with a cargo warning; the
//! generated `PTX_*` constants are then `None` and the CUDA backend explains how to get the PTX.
//! `SPECKV_NIGHTLY` names another toolchain; `SPECKV_SKIP_PTX=1` skips the step.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];
const ENTRIES: [&str; 3] = [
    "softmax_stats_f32",
    "softmax_stats_f16",
    "softmax_stats_bf16",
];

fn main() {
    println!("cargo:rerun-if-changed=kernels/src");
    println!("cargo:rerun-if-changed=kernels/Cargo.toml");
    println!("cargo:rerun-if-env-changed=SPECKV_NIGHTLY");
    println!("cargo:rerun-if-env-changed=SPECKV_SKIP_PTX");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let toolchain = env::var("SPECKV_NIGHTLY").unwrap_or_else(|_| "nightly".to_string());

    let mut consts = String::new();
    let mut error: Option<String> = None;
    let mut version = String::new();
    if env::var("SPECKV_SKIP_PTX")
        .map(|v| v == "1")
        .unwrap_or(false)
    {
        error = Some("PTX build skipped (SPECKV_SKIP_PTX=1)".to_string());
    } else {
        version = nightly_version(&toolchain).unwrap_or_default();
        let ptx_target = ptx_target_dir(&out_dir);
        for arch in ARCHS {
            let file = out_dir.join(format!("speckv_{arch}.ptx"));
            match build_arch(&manifest_dir, &ptx_target, &toolchain, arch, &file) {
                Ok(_) => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
    }
    for arch in ARCHS {
        let name = arch.to_uppercase();
        if error.is_none() {
            consts.push_str(&format!(
                "/// PTX of every kernel for {arch}.\npub const PTX_{name}: Option<&str> = \
                 Some(include_str!(concat!(env!(\"OUT_DIR\"), \"/speckv_{arch}.ptx\")));\n"
            ));
        } else {
            consts.push_str(&format!(
                "/// PTX of every kernel for {arch} (not built).\npub const PTX_{name}: Option<&str> = None;\n"
            ));
        }
    }
    if let Some(e) = &error {
        for line in e.lines().take(12) {
            println!("cargo:warning=speckv: no PTX embedded: {line}");
        }
        println!(
            "cargo:warning=speckv: the CPU backend works; for the CUDA backend install a nightly \
             with rust-src (`rustup toolchain install nightly --component rust-src`) and rebuild"
        );
    }
    consts.push_str(&format!(
        "/// Why no PTX was built, if none was.\npub const PTX_BUILD_ERROR: Option<&str> = {};\n",
        match &error {
            Some(e) => format!("Some({:?})", e.lines().last().unwrap_or(e)),
            None => "None".to_string(),
        }
    ));
    consts.push_str(&format!(
        "/// `rustc --version` of the toolchain that built the PTX.\npub const PTX_TOOLCHAIN: &str = {version:?};\n"
    ));
    consts.push_str(&format!(
        "/// Entry points every PTX module defines.\npub const PTX_ENTRIES: [&str; {}] = {:?};\n",
        ENTRIES.len(),
        ENTRIES
    ));
    fs::write(out_dir.join("ptx.rs"), consts).expect("write ptx.rs");
}

/// `<target>/speckv-ptx`: OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`, and the
/// PTX does not depend on the host profile, so debug and release builds share it.
fn ptx_target_dir(out_dir: &Path) -> PathBuf {
    if let Ok(t) = env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("speckv-ptx");
    }
    out_dir
        .ancestors()
        .nth(4)
        .map(|p| p.join("speckv-ptx"))
        .unwrap_or_else(|| out_dir.join("speckv-ptx"))
}

/// A child command with none of this build's toolchain selection in its environment.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn nightly_version(toolchain: &str) -> Option<String> {
    let out = clean_command("rustc")
        .arg(format!("+{toolchain}"))
        .arg("--version")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn build_arch(
    manifest_dir: &Path,
    target_dir: &Path,
    toolchain: &str,
    arch: &str,
    dest: &Path,
) -> Result<String, String> {
    // rustc writes the PTX straight to `dest` (`--emit=asm=PATH`): each architecture has its own
    // file, so nothing depends on which artifact cargo considers newest.
    let run = || {
        clean_command("cargo")
            .current_dir(manifest_dir)
            .arg(format!("+{toolchain}"))
            .args([
                "rustc",
                "--release",
                "--quiet",
                "--target",
                "nvptx64-nvidia-cuda",
                "-Zbuild-std=core",
            ])
            .arg("--manifest-path")
            .arg(manifest_dir.join("kernels/Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--")
            .arg(format!("--emit=asm={}", dest.display()))
            .args(["-C", "codegen-units=1"])
            .arg("-C")
            .arg(format!("target-cpu={arch}"))
            .output()
            .map_err(|e| format!("could not run `cargo +{toolchain}`: {e}"))
    };
    let _ = fs::remove_file(dest);
    let mut output = run()?;
    if output.status.success() && !dest.exists() {
        // cargo considered the crate fresh (same arguments as a build whose output was since
        // removed): drop its fingerprint and build again.
        let fp = target_dir.join("nvptx64-nvidia-cuda/release/.fingerprint");
        if let Ok(entries) = fs::read_dir(&fp) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with("speckv-kernels-")
                {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        output = run()?;
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(format!(
            "`cargo +{toolchain} rustc --target nvptx64-nvidia-cuda` failed for {arch}:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let ptx = fs::read_to_string(dest).map_err(|e| format!("reading {}: {e}", dest.display()))?;
    check_ptx(&ptx, arch)?;
    Ok(ptx)
}

/// The PTX must be self-contained (a reference to an external function — a panic path into an
/// un-inlined `core` function — would fail at module load) and define every entry point.
fn check_ptx(ptx: &str, arch: &str) -> Result<(), String> {
    if !ptx.contains(&format!(".target {arch}")) {
        return Err(format!("PTX for {arch} lacks `.target {arch}`"));
    }
    if let Some(line) = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".extern .func"))
    {
        return Err(format!(
            "PTX for {arch} calls an external function (a reachable panic or an un-inlined core \
             function): {line}"
        ));
    }
    for entry in ENTRIES {
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(format!("PTX for {arch} lacks the entry point {entry}"));
        }
    }
    Ok(())
}

//! Compiles `kernels/` to PTX with rustc's own NVPTX backend and embeds it in the host library.
//!
//! The kernel toolchain is pinned in `kernels/toolchain/rust-toolchain.toml` (a dated nightly with
//! `rust-src`, which `-Zbuild-std=core` needs). This script first makes sure that toolchain is
//! there — `rustup toolchain install <channel> --profile minimal --component rust-src`, which is a
//! no-op when it already is — so a fresh machine whose `nightly` lacks `rust-src` gets PTX from the
//! README's first command with nothing done by hand. Then, for each architecture in `ARCHS`, it runs
//! `cargo +<channel> rustc --release --target nvptx64-nvidia-cuda -Zbuild-std=core -- --emit=asm
//! -C target-cpu=sm_XX -C codegen-units=1` on the kernels crate, from the toolchain's folder, with
//! its own target directory (`<target>/speckv-ptx`, so no lock is shared with this build) and with
//! this build's `CARGO*` (but `CARGO_HOME`), `RUSTC*`, `RUSTUP_TOOLCHAIN` and `RUSTFLAGS` variables
//! removed (otherwise the child inherits the stable toolchain). It never links: no nvptx rust-std or
//! bitcode linker is needed.
//!
//! The PTX must define exactly the entry points of `kernels/src/entries.rs` and call no external
//! function. This script re-runs when the kernels, the pinned toolchain, or that toolchain's
//! installed components change (adding `rust-src` by hand re-runs it).
//!
//! When no PTX can be built (no network for rustup, say) the build still succeeds with a cargo
//! warning; the generated `PTX_*` constants are then `None`, the CUDA backend explains how to get
//! the PTX, and the test `ptx::embedded` fails saying why. `SPECKV_NIGHTLY=<toolchain>` uses another
//! installed toolchain; `SPECKV_SKIP_PTX=1` skips the step on purpose (that test then skips).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

include!("kernels/src/entries.rs");

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];
const TOOLCHAIN_DIR: &str = "kernels/toolchain";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let toolchain_dir = manifest_dir.join(TOOLCHAIN_DIR);
    println!("cargo:rerun-if-changed=kernels/src");
    println!("cargo:rerun-if-changed=kernels/Cargo.toml");
    println!("cargo:rerun-if-changed={TOOLCHAIN_DIR}/rust-toolchain.toml");
    println!("cargo:rerun-if-env-changed=SPECKV_NIGHTLY");
    println!("cargo:rerun-if-env-changed=SPECKV_SKIP_PTX");

    let skip = env::var("SPECKV_SKIP_PTX")
        .map(|v| v == "1")
        .unwrap_or(false);
    let mut version = String::new();
    let mut error: Option<String> = None;
    if skip {
        error = Some("PTX build skipped (SPECKV_SKIP_PTX=1)".to_string());
    } else {
        match prepare_toolchain(&toolchain_dir) {
            Ok(tc) => {
                version = tc.version.clone();
                let ptx_target = ptx_target_dir(&out_dir);
                for arch in ARCHS {
                    let file = out_dir.join(format!("speckv_{arch}.ptx"));
                    if let Err(e) =
                        build_arch(&manifest_dir, &toolchain_dir, &ptx_target, &tc, arch, &file)
                    {
                        error = Some(e);
                        break;
                    }
                }
            }
            Err(e) => error = Some(e),
        }
    }

    let mut consts = String::new();
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
        if !skip {
            println!(
                "cargo:warning=speckv: the CPU backend works; the CUDA backend and the test \
                 `ptx::embedded` need the PTX (see the lines above; SPECKV_SKIP_PTX=1 skips it on purpose)"
            );
        }
    }
    consts.push_str(&format!(
        "/// Why no PTX was built, if none was.\npub const PTX_BUILD_ERROR: Option<&str> = {};\n",
        match &error {
            Some(e) => format!("Some({e:?})"),
            None => "None".to_string(),
        }
    ));
    consts.push_str(&format!(
        "/// Whether the PTX build was skipped on purpose (`SPECKV_SKIP_PTX=1`).\npub const PTX_SKIPPED: bool = {skip};\n"
    ));
    consts.push_str(&format!(
        "/// `rustc --version` of the toolchain that built the PTX.\npub const PTX_TOOLCHAIN: &str = {version:?};\n"
    ));
    fs::write(out_dir.join("ptx.rs"), consts).expect("write ptx.rs");
}

/// The kernel toolchain, ready to build: its name for `+<name>`, `rustc --version`, sysroot.
struct Toolchain {
    name: String,
    version: String,
}

/// The channel pinned in `rust-toolchain.toml` (one `channel = "…"` line).
fn pinned_channel(toolchain_dir: &Path) -> Result<String, String> {
    let path = toolchain_dir.join("rust-toolchain.toml");
    let text = fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .find(|v| !v.is_empty())
        .ok_or_else(|| format!("{} has no `channel = \"…\"` line", path.display()))
}

/// `rustc +name --print sysroot`, when that toolchain is installed.
fn sysroot(name: &str) -> Option<PathBuf> {
    let out = clean_command("rustc")
        .arg(format!("+{name}"))
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

/// Makes sure the kernel toolchain exists with `rust-src`, installing what is missing through
/// rustup, and tells cargo to re-run this script when its components change.
fn prepare_toolchain(toolchain_dir: &Path) -> Result<Toolchain, String> {
    let (name, pinned) = match env::var("SPECKV_NIGHTLY") {
        Ok(n) if !n.is_empty() => (n, false),
        _ => (pinned_channel(toolchain_dir)?, true),
    };
    let ready = |root: &Option<PathBuf>| root.as_deref().map(has_rust_src).unwrap_or(false);
    let mut root = sysroot(&name);
    if !ready(&root) {
        // `toolchain install` adds missing components to an installed toolchain too; a toolchain
        // named by SPECKV_NIGHTLY may be a linked one, which only `component add` can extend.
        let mut cmd = clean_command("rustup");
        if pinned || root.is_none() {
            cmd.args(["toolchain", "install", &name, "--profile", "minimal"])
                .args(["--component", "rust-src", "--no-self-update"]);
        } else {
            cmd.args(["component", "add", "rust-src", "--toolchain", &name]);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("could not run rustup to install {name} with rust-src: {e}"))?;
        root = sysroot(&name);
        if !out.status.success() || !ready(&root) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
            return Err(format!(
                "the kernel toolchain {name} with rust-src could not be installed by rustup:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    let root = root.expect("checked above");
    // Re-run when a component is added or removed, or the toolchain is reinstalled.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lib/rustlib/components").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lib/rustlib/multirust-channel-manifest.toml")
            .display()
    );
    let version = clean_command("rustc")
        .arg(format!("+{name}"))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(Toolchain { name, version })
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
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
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

fn build_arch(
    manifest_dir: &Path,
    toolchain_dir: &Path,
    target_dir: &Path,
    tc: &Toolchain,
    arch: &str,
    dest: &Path,
) -> Result<String, String> {
    // rustc writes the PTX straight to `dest` (`--emit=asm=PATH`): each architecture has its own
    // file, so nothing depends on which artifact cargo considers newest.
    let run = || {
        clean_command("cargo")
            .current_dir(toolchain_dir)
            .arg(format!("+{}", tc.name))
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
            .map_err(|e| format!("could not run `cargo +{}`: {e}", tc.name))
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
            "`cargo +{} rustc --target nvptx64-nvidia-cuda` failed for {arch}:\n{}",
            tc.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let ptx = fs::read_to_string(dest).map_err(|e| format!("reading {}: {e}", dest.display()))?;
    check_ptx(&ptx, arch)?;
    Ok(ptx)
}

/// The PTX must be self-contained (a reference to an external function — a panic path into an
/// un-inlined `core` function — would fail at module load) and define exactly the listed entry
/// points.
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
    for entry in ENTRY_POINTS {
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(format!("PTX for {arch} lacks the entry point {entry}"));
        }
    }
    for line in ptx.lines() {
        if let Some(rest) = line.split(".entry ").nth(1) {
            let name = rest.split('(').next().unwrap_or("").trim();
            if !ENTRY_POINTS.contains(&name) {
                return Err(format!(
                    "PTX for {arch} defines the entry point {name}, which kernels/src/entries.rs \
                     does not list"
                ));
            }
        }
    }
    Ok(())
}

//! Helpers the benches share: the project's Python venv (numpy peer) and .npy files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python (created by scripts/venv on first use), or None with a message.
pub fn venv_python() -> Option<PathBuf> {
    let out = Command::new(root().join("scripts/venv")).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "numpy peer skipped: scripts/venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A python with PyTorch and a CUDA device (the GPU peer), if this machine has one.
pub fn torch_python() -> Option<PathBuf> {
    for py in ["python3", "python"] {
        let ok = Command::new(py)
            .args([
                "-c",
                "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(PathBuf::from(py));
        }
    }
    None
}

/// Writes a C-order .npy with dtype `descr` ("<f2", "<f4", "<i4") and `shape`.
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + bytes.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    std::fs::write(path, out)
}

/// Runs a peer script and returns its `seconds_per_call`.
pub fn peer_seconds(python: &Path, script: &str, args: &[&str]) -> Option<f64> {
    let out = Command::new(python)
        .arg(root().join("scripts").join(script))
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "peer {script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["seconds_per_call"].as_f64()
}

/// Writes a bench's side-by-side results to target/bench/NAME.json and says where.
pub fn write_json(name: &str, json: &[serde_json::Value]) {
    let path = root().join("target/bench").join(format!("{name}.json"));
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&root()));
    if std::fs::write(
        &path,
        serde_json::to_string_pretty(json).unwrap_or_default(),
    )
    .is_ok()
    {
        println!("\nwritten: {}", path.display());
    }
}

/// The benches' criterion settings: 10 samples, 1 s of measurement (the side-by-side tables after
/// criterion measure again with their own budgets).
pub fn criterion_config(warm_up_ms: u64) -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(warm_up_ms))
        .measurement_time(std::time::Duration::from_secs(1))
        .configure_from_args()
}

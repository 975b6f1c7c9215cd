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

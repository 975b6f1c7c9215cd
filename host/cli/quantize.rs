//! `speckv quantize`: a float32 .npy matrix to FP16, INT8 or NF4 safetensors.

use std::path::PathBuf;

use speckv::weights::quant::{self, Format, QMatrix};

use crate::args::json_out;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    format: Format,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// NF4 only: quantise the absmax values to 8 bits (blocks of 256).
    #[arg(long)]
    double_quant: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let (out, inp, w) = speckv::weights::io::read_npy_matrix(&a.input)?;
    let q = QMatrix::quantize(&w, out, inp, a.format, a.double_quant)?;
    q.save(&a.output)?;
    let err = quant::relative_rms_error(&w, &q);
    let summary = serde_json::json!({
        "format": a.format.name(), "shape": [out, inp], "bytes": q.bytes(),
        "bits_per_weight": a.format.bits_per_weight(out, inp), "relative_rms_error": err,
        "double_quant": a.double_quant, "output": a.output.display().to_string(),
    });
    if a.json {
        return json_out(&summary);
    }
    println!(
        "{} {out}×{inp}: {} bytes ({:.2} bits/weight), relative RMS error {err:.3e} → {}",
        a.format.name(),
        q.bytes(),
        a.format.bits_per_weight(out, inp),
        a.output.display()
    );
    Ok(())
}

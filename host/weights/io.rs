//! Weight files: the safetensors layout `speckv quantize` writes and reads (tensors `weight` plus
//! `scale` or `absmax`, metadata format / shape / blocksize), and float32 .npy input.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::error::{Error, Result};
use speckv_kernels::params::NF4_BLOCK;

use crate::weights::quant::{double_dequantize, DoubleQuant, Format, QMatrix, DOUBLE_QUANT_BLOCK};

impl QMatrix {
    /// Writes the safetensors file of `speckv quantize`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (out, inp) = self.shape();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), self.format().name().to_string());
        meta.insert("shape".to_string(), format!("[{out}, {inp}]"));
        let st = |e: safetensors::SafeTensorError| Error::Other(format!("safetensors: {e}"));
        let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
        match self {
            QMatrix::Fp16 { w, .. } => {
                meta.insert("blocksize".to_string(), "none".to_string());
                tensors.push((
                    "weight".into(),
                    TensorView::new(StDtype::F16, vec![out, inp], bytemuck::cast_slice(w))
                        .map_err(st)?,
                ));
            }
            QMatrix::Int8 { q, scale, .. } => {
                meta.insert(
                    "blocksize".to_string(),
                    format!("{inp} (one scale per row)"),
                );
                tensors.push((
                    "weight".into(),
                    TensorView::new(StDtype::I8, vec![out, inp], bytemuck::cast_slice(q))
                        .map_err(st)?,
                ));
                tensors.push((
                    "scale".into(),
                    TensorView::new(StDtype::F32, vec![out], bytemuck::cast_slice(scale))
                        .map_err(st)?,
                ));
            }
            QMatrix::Nf4 {
                packed,
                absmax,
                double,
                ..
            } => {
                meta.insert("blocksize".to_string(), NF4_BLOCK.to_string());
                meta.insert(
                    "quant_layout".to_string(),
                    "bitsandbytes nf4: element 2i in the high nibble of byte i".to_string(),
                );
                tensors.push((
                    "weight".into(),
                    TensorView::new(StDtype::U8, vec![packed.len()], packed).map_err(st)?,
                ));
                match double {
                    None => tensors.push((
                        "absmax".into(),
                        TensorView::new(
                            StDtype::F32,
                            vec![absmax.len()],
                            bytemuck::cast_slice(absmax),
                        )
                        .map_err(st)?,
                    )),
                    Some(d) => {
                        meta.insert(
                            "double_quant".to_string(),
                            format!(
                                "absmax 8-bit linear, blocks of {DOUBLE_QUANT_BLOCK}, offset {}",
                                d.offset
                            ),
                        );
                        meta.insert("absmax_offset".to_string(), d.offset.to_string());
                        tensors.push((
                            "absmax_q".into(),
                            TensorView::new(StDtype::U8, vec![d.codes.len()], &d.codes)
                                .map_err(st)?,
                        ));
                        tensors.push((
                            "absmax_scale".into(),
                            TensorView::new(
                                StDtype::F32,
                                vec![d.scales.len()],
                                bytemuck::cast_slice(&d.scales),
                            )
                            .map_err(st)?,
                        ));
                    }
                }
            }
        }
        safetensors::serialize_to_file(tensors, &Some(meta), path).map_err(st)
    }

    /// Reads a file written by [`QMatrix::save`].
    pub fn load(path: &Path) -> Result<QMatrix> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        let bad = |m: String| Error::Other(format!("{}: {m}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let format = Format::parse(md.get("format").map(String::as_str).unwrap_or(""))
            .map_err(|e| bad(e.to_string()))?;
        let shape: Vec<usize> = md
            .get("shape")
            .and_then(|s| serde_json::from_str(s).ok())
            .filter(|v: &Vec<usize>| v.len() == 2)
            .ok_or_else(|| bad("metadata `shape` missing or not [out, in]".to_string()))?;
        let (out, inp) = (shape[0], shape[1]);
        let n = out
            .checked_mul(inp)
            .ok_or_else(|| bad("shape too large".into()))?;
        let get = |name: &str, dtype: StDtype, len: usize| -> Result<Vec<u8>> {
            let t = st
                .tensor(name)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            if t.dtype() != dtype || t.data().len() != len * dtype.size() {
                return Err(bad(format!(
                    "tensor {name}: expected {len} × {dtype:?}, found {:?} {:?}",
                    t.shape(),
                    t.dtype()
                )));
            }
            Ok(t.data().to_vec())
        };
        Ok(match format {
            Format::Fp16 => QMatrix::Fp16 {
                out,
                inp,
                w: bytemuck::pod_collect_to_vec(&get("weight", StDtype::F16, n)?),
            },
            Format::Int8 => QMatrix::Int8 {
                out,
                inp,
                q: bytemuck::pod_collect_to_vec(&get("weight", StDtype::I8, n)?),
                scale: bytemuck::pod_collect_to_vec(&get("scale", StDtype::F32, out)?),
            },
            Format::Nf4 => {
                if n % NF4_BLOCK != 0 {
                    return Err(bad(format!(
                        "nf4 shape {out}×{inp} is not a whole number of {NF4_BLOCK}-blocks"
                    )));
                }
                let blocks = n / NF4_BLOCK;
                let packed = get("weight", StDtype::U8, n / 2)?;
                let (absmax, double) = if st.tensor("absmax").is_ok() {
                    (
                        bytemuck::pod_collect_to_vec(&get("absmax", StDtype::F32, blocks)?),
                        None,
                    )
                } else {
                    let codes = get("absmax_q", StDtype::U8, blocks)?;
                    let scales: Vec<f32> = bytemuck::pod_collect_to_vec(&get(
                        "absmax_scale",
                        StDtype::F32,
                        blocks.div_ceil(DOUBLE_QUANT_BLOCK),
                    )?);
                    let offset: f32 = md
                        .get("absmax_offset")
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("absmax_offset missing".into()))?;
                    let d = DoubleQuant {
                        codes,
                        scales,
                        offset,
                    };
                    (double_dequantize(&d), Some(d))
                };
                QMatrix::Nf4 {
                    out,
                    inp,
                    packed,
                    absmax,
                    double,
                }
            }
        })
    }
}

/// Reads a 2-D float32 .npy (C order) as (out, in, data).
pub fn read_npy_matrix(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let io = |source: std::io::Error| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(io)?;
    let shape: Vec<u64> = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(Error::Other(format!(
            "{}: expected a 2-D matrix, found shape {shape:?}",
            path.display()
        )));
    }
    if npy.order() != npyz::Order::C {
        return Err(Error::Other(format!(
            "{}: Fortran-order arrays are not supported; save with C order",
            path.display()
        )));
    }
    let is_f32 = matches!(npy.dtype(), npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4);
    if !is_f32 {
        return Err(Error::Other(format!(
            "{}: expected float32, found {:?}",
            path.display(),
            npy.dtype()
        )));
    }
    let data: Vec<f32> = npy.into_vec().map_err(io)?;
    Ok((shape[0] as usize, shape[1] as usize, data))
}

//! A model's weights on the device: uploaded from a loaded model, or made on the device at a
//! model's shapes for timing.

use std::collections::HashMap;

use cudarc::driver::CudaSlice;

use super::super::{DeviceView, Lin, Norm, Shape};
use crate::backend::cuda::{CudaBackend, DeviceMatrix};
use crate::error::Result;
use crate::model::Config;
use crate::weights::quant::Format;

/// A model's weights on the device.
pub struct DeviceWeights {
    pub cfg: Config,
    pub shape: Shape,
    pub eps: f32,
    pub active: Vec<bool>,
    pub(super) mats: HashMap<Lin, DeviceMatrix>,
    pub(super) norms: HashMap<Norm, CudaSlice<f32>>,
    pub(super) biases: Vec<Option<CudaSlice<f32>>>,
    pub(super) table: CudaSlice<u16>,
    /// The rotary angles (the CPU pass's own table), and the most positions a decode state on
    /// these weights may hold: each state uploads the (cos, sin) pairs of its own capacity.
    pub(super) rope: crate::model::RopeTable,
    pub(super) rope_positions: usize,
}

fn norms_of(shape: &Shape) -> Vec<Norm> {
    let mut v: Vec<Norm> = (0..shape.layers)
        .flat_map(|l| [Norm::Attn(l), Norm::Ffn(l)])
        .collect();
    v.push(Norm::Out);
    v
}

impl DeviceWeights {
    /// Uploads a loaded model (a speckv regime) for decode states of up to `positions` positions
    /// (each state uploads the rotary pairs of its own capacity).
    pub fn upload(cuda: &CudaBackend, view: &DeviceView<'_>, positions: usize) -> Result<Self> {
        let shape = view.shape;
        let mut mats = HashMap::new();
        for w in shape.linears() {
            mats.insert(w, cuda.upload_matrix(view.matrix(w)?)?);
        }
        let st = cuda.stream();
        let mut norms = HashMap::new();
        for n in norms_of(&shape) {
            norms.insert(n, st.clone_htod(view.norm(n)?)?);
        }
        let mut biases = Vec::new();
        for l in 0..shape.layers {
            biases.push(match view.bias(l) {
                Some(b) => Some(st.clone_htod(b)?),
                None => None,
            });
        }
        Ok(DeviceWeights {
            cfg: view.model.cfg.clone(),
            shape,
            eps: view.eps(),
            active: view.active().to_vec(),
            mats,
            norms,
            biases,
            table: st.clone_htod(view.embed_table())?,
            rope: view.model.rope.clone(),
            rope_positions: positions,
        })
    }

    /// Weights made on the device at the shapes of `cfg` in `format` (every matrix a fixed byte
    /// pattern, norms 1, no biases, a zero embedding table): what a step costs at a model's
    /// shapes, without its weights.
    pub fn synthetic(
        cuda: &CudaBackend,
        cfg: &Config,
        format: Format,
        positions: usize,
    ) -> Result<Self> {
        let shape = Shape::of(cfg)?;
        let mut mats = HashMap::new();
        for w in shape.linears() {
            let (o, i) = shape.dims(w);
            mats.insert(w, cuda.synthetic_matrix(format, o, i)?);
        }
        let st = cuda.stream();
        let mut norms = HashMap::new();
        for n in norms_of(&shape) {
            norms.insert(n, st.clone_htod(&vec![1f32; shape.hidden])?);
        }
        Ok(DeviceWeights {
            cfg: cfg.clone(),
            shape,
            eps: cfg.rms_eps,
            active: vec![true; shape.layers],
            mats,
            norms,
            biases: (0..shape.layers).map(|_| None).collect(),
            table: st.alloc_zeros::<u16>(shape.vocab * shape.hidden)?,
            rope: crate::model::RopeTable::new(cfg.head_dim, cfg.rope_base, cfg.context),
            rope_positions: positions,
        })
    }

    /// Bytes of the linear layers and the LM head: what one step must stream.
    pub fn matrix_bytes(&self) -> usize {
        self.mats.values().map(|m| m.bytes()).sum()
    }
}

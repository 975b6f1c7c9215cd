//! The forward pass as the GPU runs it: a program of kernel launches (`embed`, `rms_norm`, the
//! GEMV of every projection — the attention output and down projections adding themselves into the
//! residual stream — `qkv_rope`, `attention`, `silu_mul`, the LM head) over activation buffers and
//! a KV cache that live on the device, the cache length in device memory. The program is one list
//! shared by every executor — the emulator's ([`emulated`]) and CUDA's — so what the tests check on
//! the CPU is the sequence of launches the GPU runs.
//!
//! A decode step of one row fuses each norm into the GEMV that reads it (v3 / v4's `_norm`
//! entries) and the SwiGLU gate into the down projection's read (`_silu`): 85 fewer launches of
//! one to nine blocks for a 28-layer model. Larger steps keep them as launches of their own; both
//! programs compute the same bits (the fused reads are `rms_norm`'s and `silu_mul`'s arithmetic).
//!
//! The model's linear layers must be in a speckv regime (FP16, INT8 or NF4): GGUF's own blocks
//! have CPU kernels only.

pub mod cuda;
pub mod emulated;
mod seq;

use half::f16;

use super::{Embed, Model, Proj};
use crate::backend::forward::{check_multiple, Heads};
use crate::error::{Error, Result};
use crate::weights::cpu::Linear;
use crate::weights::quant::QMatrix;

pub use cuda::{CudaForward, DeviceWeights};
pub use emulated::EmulatedForward;
pub(crate) use seq::{check_vocab, forward_chunks, resident_chunks, SeqState};

/// An activation buffer of the step (`[m, width]` f32, m ≤ 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    /// The residual stream (the attention output and down projections add into it).
    X,
    /// Its normalised copy, the input of the projections (unused by a fused program).
    Xn,
    Qkv,
    Q,
    /// Attention output, by position.
    Att,
    /// Fused gate / up projection.
    Gu,
    /// silu(gate) · up.
    Ffn,
    Logits,
}

impl Act {
    pub const ALL: [Act; 8] = [
        Act::X,
        Act::Xn,
        Act::Qkv,
        Act::Q,
        Act::Att,
        Act::Gu,
        Act::Ffn,
        Act::Logits,
    ];
    /// Columns of the buffer for a model of this shape.
    pub fn width(self, s: &Shape) -> usize {
        match self {
            Act::X | Act::Xn => s.hidden,
            Act::Qkv => s.heads.qkv_width(),
            Act::Q | Act::Att => s.heads.q_width(),
            Act::Gu => 2 * s.ffn,
            Act::Ffn => s.ffn,
            Act::Logits => s.vocab,
        }
    }
}

/// A linear layer of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lin {
    Qkv(usize),
    O(usize),
    GateUp(usize),
    Down(usize),
    LmHead,
}

/// A norm's gains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Norm {
    Attn(usize),
    Ffn(usize),
    Out,
}

/// One kernel launch of the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Token rows → X.
    Embed,
    /// X → Xn.
    RmsNorm { norm: Norm },
    /// y = x · Wᵀ, or y += x · Wᵀ when `accumulate` (a projection into the residual stream X).
    Gemv {
        w: Lin,
        x: Act,
        y: Act,
        accumulate: bool,
    },
    /// y = rms_norm(X) · Wᵀ in one launch: the norm fused into the GEMV's read of X.
    NormGemv { norm: Norm, w: Lin, y: Act },
    /// y (+)= (silu(gate) · up of Gu) · Wᵀ in one launch: the gate fused into the GEMV's read.
    SiluGemv { w: Lin, y: Act, accumulate: bool },
    /// Qkv (+ bias) → Q, and the layer's cache rows.
    QkvRope { layer: usize },
    /// Q over the layer's cache → Att.
    Attention { layer: usize },
    /// Gu → Ffn.
    SiluMul,
}

/// A GEMV launch of the program, whatever it fuses: its matrix, what it reads (x, or X through
/// a norm, or Gu through the gate) and writes, and whether it adds into y.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvOp {
    pub w: Lin,
    pub x: Act,
    pub y: Act,
    pub norm: Option<Norm>,
    pub silu: bool,
    pub accumulate: bool,
}

impl Op {
    /// The GEMV this op launches, if it is one.
    pub fn gemv(self) -> Option<GemvOp> {
        let plain = |w, x, y, accumulate| GemvOp {
            w,
            x,
            y,
            norm: None,
            silu: false,
            accumulate,
        };
        match self {
            Op::Gemv {
                w,
                x,
                y,
                accumulate,
            } => Some(plain(w, x, y, accumulate)),
            Op::NormGemv { norm, w, y } => Some(GemvOp {
                norm: Some(norm),
                ..plain(w, Act::X, y, false)
            }),
            Op::SiluGemv { w, y, accumulate } => Some(GemvOp {
                silu: true,
                ..plain(w, Act::Gu, y, accumulate)
            }),
            _ => None,
        }
    }
}

/// Which launches a step's program fuses into the GEMV after them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fuse {
    /// Each `rms_norm` into the GEMV that reads its output (`_norm` entries).
    pub norm: bool,
    /// Each `silu_mul` into the down projection (`_silu` entries).
    pub silu: bool,
}

impl Fuse {
    /// Nothing fused: every norm and gate its own launch.
    pub const NONE: Fuse = Fuse {
        norm: false,
        silu: false,
    };
    /// Everything a step allows fused (the executors' default).
    pub const ALL: Fuse = Fuse {
        norm: true,
        silu: true,
    };

    /// What a step of `rows` rows of this shape can fuse: the reads the v4 plans of its GEMVs
    /// have (v3 / v4 at one row with K a multiple of 64). The plans' choice of kernel depends on M
    /// and K only, not on the format or the SM count, so one answer holds for every regime.
    pub fn for_step(shape: &Shape, rows: usize) -> Fuse {
        let has = |w: Lin, read: crate::plan::XRead| {
            let (o, i) = shape.dims(w);
            let (v, f) = (
                crate::plan::GemvVersion::V4,
                crate::weights::quant::Format::Int8,
            );
            crate::plan::plan_fused(v, f, o, i, rows, 1, read, None).is_ok()
        };
        use crate::plan::XRead;
        Fuse {
            norm: [Lin::Qkv(0), Lin::GateUp(0), Lin::LmHead]
                .iter()
                .all(|&w| has(w, XRead::Norm)),
            silu: has(Lin::Down(0), XRead::Silu),
        }
    }

    /// An index for tables of programs (0..4).
    pub fn index(self) -> usize {
        self.norm as usize + 2 * self.silu as usize
    }
}

/// The launches of one forward chunk through the `active` layers, with the LM head when `logits`,
/// fusing what `fuse` says (see [`Fuse::for_step`]).
pub fn program(active: &[bool], logits: bool, fuse: Fuse) -> Vec<Op> {
    let normed = |norm: Norm, w: Lin, y: Act| {
        if fuse.norm {
            vec![Op::NormGemv { norm, w, y }]
        } else {
            vec![
                Op::RmsNorm { norm },
                Op::Gemv {
                    w,
                    x: Act::Xn,
                    y,
                    accumulate: false,
                },
            ]
        }
    };
    let mut ops = vec![Op::Embed];
    for (l, _) in active.iter().enumerate().filter(|(_, &a)| a) {
        ops.extend(normed(Norm::Attn(l), Lin::Qkv(l), Act::Qkv));
        ops.extend([
            Op::QkvRope { layer: l },
            Op::Attention { layer: l },
            Op::Gemv {
                w: Lin::O(l),
                x: Act::Att,
                y: Act::X,
                accumulate: true,
            },
        ]);
        ops.extend(normed(Norm::Ffn(l), Lin::GateUp(l), Act::Gu));
        if fuse.silu {
            ops.push(Op::SiluGemv {
                w: Lin::Down(l),
                y: Act::X,
                accumulate: true,
            });
        } else {
            ops.extend([
                Op::SiluMul,
                Op::Gemv {
                    w: Lin::Down(l),
                    x: Act::Ffn,
                    y: Act::X,
                    accumulate: true,
                },
            ]);
        }
    }
    if logits {
        ops.extend(normed(Norm::Out, Lin::LmHead, Act::Logits));
    }
    ops
}

/// The model's dimensions as the kernels see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub heads: Heads,
    /// qwen2's rotary halves (true) or llama's adjacent pairs.
    pub neox: bool,
}

/// A model's weights as the device forward pass reads them.
pub struct DeviceView<'m> {
    pub model: &'m Model,
    pub shape: Shape,
}

impl Shape {
    /// The shape of a model with these hyper-parameters, if the device kernels take it.
    pub fn of(c: &super::Config) -> Result<Shape> {
        let heads = Heads {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        heads.check()?;
        if heads.q_width() != c.hidden {
            return Err(Error::Unsupported(format!(
                "{} heads of {} differ from the hidden size {}",
                c.heads, c.head_dim, c.hidden
            )));
        }
        check_multiple("hidden", c.hidden, 8)?;
        check_multiple("ffn", c.ffn, 4)?;
        if c.layers == 0 || c.vocab == 0 {
            return Err(Error::Empty {
                what: "layers or vocabulary",
            });
        }
        Ok(Shape {
            layers: c.layers,
            hidden: c.hidden,
            ffn: c.ffn,
            vocab: c.vocab,
            heads,
            neox: c.arch == "qwen2",
        })
    }

    /// Rows × columns of a linear layer.
    pub fn dims(&self, w: Lin) -> (usize, usize) {
        match w {
            Lin::Qkv(_) => (self.heads.qkv_width(), self.hidden),
            Lin::O(_) => (self.hidden, self.heads.q_width()),
            Lin::GateUp(_) => (2 * self.ffn, self.hidden),
            Lin::Down(_) => (self.hidden, self.ffn),
            Lin::LmHead => (self.vocab, self.hidden),
        }
    }

    /// Every linear layer, in program order.
    pub fn linears(&self) -> Vec<Lin> {
        let mut v = Vec::new();
        for l in 0..self.layers {
            v.extend([Lin::Qkv(l), Lin::O(l), Lin::GateUp(l), Lin::Down(l)]);
        }
        v.push(Lin::LmHead);
        v
    }
}

impl<'m> DeviceView<'m> {
    /// Checks that every part of `model` has a device kernel.
    pub fn new(model: &'m Model) -> Result<DeviceView<'m>> {
        let shape = Shape::of(&model.cfg)?;
        if !matches!(model.embed, Embed::F16(_)) {
            return Err(Error::Unsupported(
                "the device forward pass needs a speckv regime (fp16, int8 or nf4): the gguf \
                 regime's blocks have CPU kernels only"
                    .to_string(),
            ));
        }
        let v = DeviceView { model, shape };
        for w in shape.linears() {
            let q = v.matrix(w)?;
            if q.shape() != shape.dims(w) {
                return Err(Error::BadModel(format!(
                    "{w:?} is {:?}, the configuration says {:?}",
                    q.shape(),
                    shape.dims(w)
                )));
            }
        }
        Ok(v)
    }

    /// The matrix of a linear layer (an error for GGUF blocks or split projections).
    pub fn matrix(&self, w: Lin) -> Result<&'m QMatrix> {
        let m = self.model;
        let lin = |l: &'m Linear| match l {
            Linear::Regime(q) => Ok(q),
            Linear::Blocks(_) => Err(Error::Unsupported(format!(
                "{w:?} is stored as GGUF blocks, which have CPU kernels only"
            ))),
        };
        let proj = |p: &'m Proj| match p {
            Proj::Fused(l) => lin(l),
            Proj::Split(_) => Err(Error::Unsupported(format!(
                "{w:?} is split by block type, which the device pass does not take"
            ))),
        };
        let layer = |i: usize| {
            m.layers
                .get(i)
                .ok_or_else(|| Error::Other(format!("layer {i} of {}", m.layers.len())))
        };
        match w {
            Lin::Qkv(i) => proj(&layer(i)?.qkv),
            Lin::O(i) => lin(&layer(i)?.o),
            Lin::GateUp(i) => proj(&layer(i)?.gate_up),
            Lin::Down(i) => lin(&layer(i)?.down),
            Lin::LmHead => lin(&m.lm_head),
        }
    }

    /// A norm's gains.
    pub fn norm(&self, n: Norm) -> Result<&'m [f32]> {
        let m = self.model;
        let layer = |i: usize| {
            m.layers
                .get(i)
                .ok_or_else(|| Error::Other(format!("layer {i} of {}", m.layers.len())))
        };
        Ok(match n {
            Norm::Attn(i) => &layer(i)?.attn_norm,
            Norm::Ffn(i) => &layer(i)?.ffn_norm,
            Norm::Out => &m.out_norm,
        })
    }

    /// The fused q/k/v bias of a layer (qwen2), if any.
    pub fn bias(&self, layer: usize) -> Option<&'m [f32]> {
        self.model
            .layers
            .get(layer)
            .and_then(|l| l.qkv_bias.as_deref())
    }

    /// The f16 embedding table's bits `[vocab, hidden]`.
    pub fn embed_table(&self) -> &'m [u16] {
        match &self.model.embed {
            Embed::F16(e) => bytemuck::cast_slice::<f16, u16>(e),
            Embed::Blocks(_) => &[],
        }
    }

    /// The rotary table (cos, sin) of positions `0..positions`, the CPU pass's own values.
    pub fn rope_table(&self, positions: usize) -> Vec<[f32; 2]> {
        self.model.rope.pairs(positions)
    }

    pub fn eps(&self) -> f32 {
        self.model.cfg.rms_eps
    }

    /// Which layers run.
    pub fn active(&self) -> &'m [bool] {
        &self.model.active
    }
}

/// The launch of every op of one forward step of `m` positions of each of `seqs` sequences (LM
/// head included) at `shape` with the linear layers in `format`, planned for `sm_count` SMs: what
/// the CUDA executor launches, for `speckv plan --kernel step`. Every kernel's rows are the batch's
/// `seqs · m`.
pub fn step_plan(
    shape: &Shape,
    format: crate::weights::quant::Format,
    m: usize,
    seqs: usize,
    sm_count: u32,
) -> Result<Vec<(Op, crate::plan::LaunchPlan)>> {
    use crate::plan;
    let rows = seqs * m;
    crate::backend::forward::check_batch(rows, &vec![0; seqs], m)?;
    let m32 = rows as u32;
    let h = shape.heads;
    let mut out = Vec::new();
    let fuse = Fuse::for_step(shape, rows);
    let read = |w: Lin, read: plan::XRead| {
        let (o, i) = shape.dims(w);
        let v4 = plan::GemvVersion::V4;
        plan::plan_fused(v4, format, o, i, rows, sm_count, read, None).map(|p| p.0)
    };
    for op in program(&vec![true; shape.layers], true, fuse) {
        let lp = match op {
            Op::Embed => plan::embed(m32, sm_count),
            Op::RmsNorm { .. } => plan::rms_norm(m32, plan::RMS_NORM_BLOCK, sm_count),
            Op::Gemv { w, .. } => read(w, plan::XRead::Plain)?,
            Op::NormGemv { w, .. } => read(w, plan::XRead::Norm)?,
            Op::SiluGemv { w, .. } => read(w, plan::XRead::Silu)?,
            Op::QkvRope { .. } => plan::qkv_rope(
                m32,
                h.heads as u32,
                h.kv_heads as u32,
                h.head_dim as u32,
                plan::QKV_ROPE_BLOCK,
                sm_count,
            ),
            Op::Attention { .. } => {
                plan::attention_v2(
                    m32,
                    h.heads as u32,
                    h.head_dim as u32,
                    plan::ATTENTION_BLOCK,
                    sm_count,
                )
                .ok_or_else(|| Error::Unsupported(format!("head size {}", h.head_dim)))?
                .0
            }
            Op::SiluMul => plan::silu_mul(m32, shape.ffn as u32, plan::SILU_MUL_BLOCK, sm_count),
        };
        out.push((op, lp));
    }
    Ok(out)
}

/// Hyper-parameters of the models speckv measures, from their GGUF metadata (committed as JSON
/// under `assets/shapes/`, so a machine without the weights — the GPU machine — has them).
pub fn named_shape(name: &str) -> Result<super::Config> {
    let text = match name {
        "qwen2.5-coder-1.5b" => include_str!("../../../assets/shapes/qwen2.5-coder-1.5b.json"),
        "qwen2.5-coder-0.5b" => include_str!("../../../assets/shapes/qwen2.5-coder-0.5b.json"),
        _ => {
            return Err(Error::Unknown {
                what: "model shape",
                value: name.to_string(),
                expected: "qwen2.5-coder-1.5b, qwen2.5-coder-0.5b",
            })
        }
    };
    serde_json::from_str(text).map_err(|e| Error::Other(format!("shape {name}: {e}")))
}

//! Where the real-model path's forward passes run: the CPU, a CUDA GPU (speckv's kernels in the
//! launch program of [`crate::model::device`]), or — to check that path without a GPU — the
//! emulator of the CUDA execution model running the same program.
//!
//! On a device pass the steps finish where the logits are: the draft's statistics (and `auto`'s
//! stopping rule) and verification run on the device, and only their small results come back; a
//! draft phase whose γ is chosen up front is enqueued at once ([`crate::model::Pass::draft_run`]).

use crate::backend::cuda::CudaBackend;
use crate::backend::emulate::Emulator;
use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::model::device::{CudaForward, DeviceView, DeviceWeights, EmulatedForward};
use crate::model::{BatchPass, CpuPass, Model, Pass};

/// Environment variable that makes `--backend cuda` run the device program on the emulator (for
/// tests: the same passes, without a GPU).
pub const EMULATE_ENV: &str = "SPECKV_CUDA_EMULATE";

/// Block size of the emulated launches (the device's own plans use the CUDA block sizes).
const EMULATOR_BLOCK: u32 = 128;

/// Where the passes of a decode run.
pub enum Device {
    Cpu,
    Cuda(Box<CudaDevice>),
    Emulator(Emulator),
}

/// A GPU with the pair's weights uploaded.
pub struct CudaDevice {
    pub cuda: CudaBackend,
    pub target: DeviceWeights,
    /// None: a self-speculative draft on the target's weights.
    pub draft: Option<DeviceWeights>,
}

/// A boxed pass of a decode.
pub type BoxPass<'a> = Box<dyn Pass + Send + 'a>;

/// A boxed batched state of a decode.
pub type BoxBatch<'a> = Box<dyn BatchPass + Send + 'a>;

impl Device {
    /// `cpu` and `auto` → the CPU (the CUDA forward pass has not yet run on a GPU, so it is not
    /// chosen unasked); `cuda` → the first GPU with both models uploaded, or the emulator when
    /// `SPECKV_CUDA_EMULATE=1`.
    pub fn open(kind: BackendKind, target: &Model, draft: Option<&Model>) -> Result<Device> {
        if kind != BackendKind::Cuda {
            return Ok(Device::Cpu);
        }
        // Both models' parts are checked for device kernels before any GPU work.
        let tview = DeviceView::new(target)?;
        let dview = draft.map(DeviceView::new).transpose()?;
        if std::env::var(EMULATE_ENV).is_ok_and(|v| v == "1") {
            return Ok(Device::Emulator(Emulator::new(EMULATOR_BLOCK)));
        }
        let cuda = CudaBackend::new(0)?;
        let target = DeviceWeights::upload(&cuda, &tview, target.cfg.context)?;
        let draft = match (&dview, draft) {
            (Some(v), Some(d)) => Some(DeviceWeights::upload(&cuda, v, d.cfg.context)?),
            _ => None,
        };
        Ok(Device::Cuda(Box::new(CudaDevice {
            cuda,
            target,
            draft,
        })))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Emulator(_) => "emulator",
        }
    }

    /// Fresh target and draft passes holding `positions`: the draft is `draft`, or the target
    /// running only the layers of `mask`. A device pass is a batched state of one sequence.
    pub fn passes<'a>(
        &'a self,
        target: &'a Model,
        draft: Option<&'a Model>,
        mask: &'a [bool],
        positions: usize,
    ) -> Result<(BoxPass<'a>, BoxPass<'a>)> {
        let (t, d) = self.batch_passes(target, draft, mask, positions, 1)?;
        Ok((t, d))
    }

    /// Fresh batched target and draft states of `seqs` sequences holding `positions` each (see
    /// [`Device::passes`]).
    pub fn batch_passes<'a>(
        &'a self,
        target: &'a Model,
        draft: Option<&'a Model>,
        mask: &'a [bool],
        positions: usize,
        seqs: usize,
    ) -> Result<(BoxBatch<'a>, BoxBatch<'a>)> {
        fits(positions, target)?;
        let dm = draft.unwrap_or(target);
        let dcap = positions.min(dm.cfg.context);
        let layers = draft.is_none().then(|| mask.to_vec());
        match self {
            Device::Cpu => {
                let t = CpuPass::new_batch(target, None, seqs)?;
                let d = match draft {
                    Some(m) => CpuPass::new_batch(m, None, seqs)?,
                    None => CpuPass::new_batch(target, Some(mask), seqs)?,
                };
                Ok((Box::new(t), Box::new(d)))
            }
            Device::Emulator(e) => {
                let sms = crate::plan::H200_SMS;
                let t = EmulatedForward::new_batch(target, *e, sms, positions, seqs)?;
                let mut d = EmulatedForward::new_batch(dm, *e, sms, dcap, seqs)?;
                if let Some(m) = layers {
                    d.set_active_layers(m)?;
                }
                Ok((Box::new(t), Box::new(d)))
            }
            Device::Cuda(c) => {
                let t = CudaForward::new_batch(&c.cuda, &c.target, positions, seqs)?;
                let dw = c.draft.as_ref().unwrap_or(&c.target);
                let mut d = CudaForward::new_batch(&c.cuda, dw, dcap, seqs)?;
                if let Some(m) = layers {
                    d.set_active_layers(m)?;
                }
                Ok((Box::new(t), Box::new(d)))
            }
        }
    }
}

/// A decode of `positions` fits the target's context.
fn fits(positions: usize, target: &Model) -> Result<()> {
    if positions > target.cfg.context {
        return Err(Error::Other(format!(
            "{positions} positions exceed the target's context of {}",
            target.cfg.context
        )));
    }
    Ok(())
}

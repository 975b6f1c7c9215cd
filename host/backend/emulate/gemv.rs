//! The GEMV on the emulator: v1, and v2 / v3 / v4 by their plans (with the forward pass's fusions).

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::gemv::{self as gemv_kernel, Fp16, Int8, Nf4};

use super::Emulator;
use crate::backend::forward::AlignedF32;
use crate::error::{Error, Result};
use crate::plan::{plan_fused, GemvVersion};
use crate::stats::check_block;
use crate::weights::gemv::{check as check_gemv, params as gemv_params, raw, Fusion, MAX_M};
use crate::weights::quant::QMatrix;

impl Emulator {
    /// y `[m, out]` = x `[m, in]` · Wᵀ (one warp per output row).
    pub fn gemv(&self, w: &QMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
        check_gemv(w, x, m)?;
        check_block(self.block)?;
        let (out, _) = w.shape();
        let (wb, scales) = raw(w);
        let tile = gemv_kernel::tile_for(m as u32)
            .ok_or_else(|| Error::Other(format!("M = {m} above {MAX_M}")))?;
        let name = format!("gemv_{}_m{tile}", w.format().name());
        let rows_per_block = self.block / 32;
        emu::launch_schedules(
            &name,
            |seed| {
                let mut y = vec![0f32; m * out];
                let sp = scales.map(|s| s.as_ptr()).unwrap_or(std::ptr::null());
                let p = gemv_params(w, m, wb.as_ptr(), sp, x.as_ptr(), y.as_mut_ptr());
                let mut l = Launch::new(
                    name.as_str(),
                    (out as u32).div_ceil(rows_per_block),
                    self.block,
                    0,
                )
                .input("weight", wb)
                .input("x", x)
                .output("y", &mut y)
                .schedule(seed)
                .math(self.math);
                if let Some(s) = scales {
                    l = l.input("scales", s);
                }
                macro_rules! go {
                    ($fmt:ty) => {
                        match tile {
                            1 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 1>(&p)),
                            2 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 2>(&p)),
                            4 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 4>(&p)),
                            8 => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 8>(&p)),
                            _ => emu::launch_checked(&l, || gemv_kernel::gemv::<$fmt, 16>(&p)),
                        }
                    };
                }
                // SAFETY: `check_gemv` matched x to the matrix, y has m·out slots, the weight
                // bytes and scales come from a QMatrix whose invariants (lengths from its shape)
                // hold, and the sanitizer checks every access against these buffers.
                unsafe {
                    match w {
                        QMatrix::Fp16 { .. } => go!(Fp16),
                        QMatrix::Int8 { .. } => go!(Int8),
                        QMatrix::Nf4 { .. } => go!(Nf4),
                    }
                }?;
                Ok(y)
            },
            |y| bytemuck::cast_slice::<f32, u8>(y).to_vec(),
        )
        .map_err(Error::from)
    }
}

impl Emulator {
    /// y `[m, out]` = x `[m, in]` · Wᵀ by the v2 kernels, planned for `sm_count` SMs (tensor cores
    /// for M ≥ 2 when K is a multiple of 64, CUDA cores otherwise; K split across blocks).
    pub fn gemv_v2(&self, w: &QMatrix, x: &[f32], m: usize, sm_count: u32) -> Result<Vec<f32>> {
        self.gemv_planned(w, x, m, sm_count, GemvVersion::V2)
    }

    /// y `[m, out]` = x `[m, in]` · Wᵀ by the v3 plan: the streaming kernel at M = 1 when K is a
    /// multiple of 64, v2's kernels otherwise (what the device forward pass launches).
    pub fn gemv_v3(&self, w: &QMatrix, x: &[f32], m: usize, sm_count: u32) -> Result<Vec<f32>> {
        self.gemv_planned(w, x, m, sm_count, GemvVersion::V3)
    }

    /// y `[m, out]` = x `[m, in]` · Wᵀ by the v4 plan: INT8 and NF4 at M = 1 by integer dot
    /// products on 8-bit x, v3's plan otherwise (what the device forward pass launches).
    pub fn gemv_v4(&self, w: &QMatrix, x: &[f32], m: usize, sm_count: u32) -> Result<Vec<f32>> {
        self.gemv_planned(w, x, m, sm_count, GemvVersion::V4)
    }

    fn gemv_planned(
        &self,
        w: &QMatrix,
        x: &[f32],
        m: usize,
        sm_count: u32,
        version: GemvVersion,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0f32; m * w.shape().0];
        self.gemv_into(w, x, &mut y, m, sm_count, version, Fusion::NONE)?;
        Ok(y)
    }

    /// y `[m, out]` = x · Wᵀ (or y + x · Wᵀ, and x normalised first, as `fusion` says) by
    /// `version`'s plan: what the device forward pass launches for each projection.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_into(
        &self,
        w: &QMatrix,
        x: &[f32],
        y: &mut [f32],
        m: usize,
        sm_count: u32,
        version: GemvVersion,
        fusion: Fusion<&[f32]>,
    ) -> Result<()> {
        use speckv_kernels::gemv::PathV2;
        let (out, inp) = w.shape();
        let read = fusion.read()?;
        if x.len() != m * fusion.x_width(inp) {
            return Err(Error::Length {
                what: "x",
                got: x.len(),
                expected: m * fusion.x_width(inp),
            });
        }
        check_gemv(w, &x[..m * inp], m)?; // M's range (x's width is checked above)
        if y.len() != m * out {
            return Err(Error::Length {
                what: "y",
                got: y.len(),
                expected: m * out,
            });
        }
        let (wb, scales) = raw(w);
        if !(wb.as_ptr() as usize).is_multiple_of(16) {
            return Err(Error::Other(
                "weights must be 16-byte aligned for v2".to_string(),
            ));
        }
        let norm_len = fusion.norm.map(|(g, eps)| (g.len(), eps));
        let (f, sms) = (w.format(), sm_count);
        let (lp, plan) = plan_fused(version, f, out, inp, m, sms, read, norm_len)?;
        if plan.path == PathV2::Integer && w.format() == crate::weights::quant::Format::Fp16 {
            return Err(Error::Other(
                "gemv v4: FP16 has no integer kernel".to_string(),
            ));
        }
        // v3 and v4 read x and the gains in 16-byte loads: a slice that is not 16-byte aligned is
        // copied into one that is (a device buffer is always aligned).
        let copy = |v: &[f32]| {
            (!(v.as_ptr() as usize).is_multiple_of(16)).then(|| AlignedF32::from_slice(v))
        };
        let x_copy = copy(x);
        let x = x_copy.as_ref().map_or(x, |a| a.as_slice());
        let g_copy = fusion.norm.and_then(|(g, _)| copy(g));
        let norm = fusion
            .norm
            .map(|(g, eps)| (g_copy.as_ref().map_or(g, |a| a.as_slice()), eps));
        let y0: &[f32] = y;
        let result = emu::launch_schedules(
            &lp.entry,
            |seed| {
                let mut y = y0.to_vec();
                let mut ws = vec![0u32; plan.workspace_bytes.div_ceil(4).max(4)];
                let sp = scales.map(|s| s.as_ptr()).unwrap_or(std::ptr::null());
                let mut base = gemv_params(w, m, wb.as_ptr(), sp, x.as_ptr(), y.as_mut_ptr());
                base.flags = fusion.flags();
                let p2 = speckv_kernels::params::GemvV2Params {
                    base,
                    workspace: ws.as_mut_ptr() as *mut u8,
                    ksplits: plan.ksplits,
                    kt: plan.kt,
                    norm: norm.map_or(std::ptr::null(), |(g, _)| g.as_ptr()),
                    eps: norm.map_or(0.0, |(_, e)| e),
                    _pad: 0,
                };
                let mut l =
                    Launch::new(lp.entry.as_str(), plan.grid, plan.block, plan.shared_bytes)
                        .input("weight", wb)
                        .input("x", x)
                        .output("y", &mut y)
                        .output("workspace", &mut ws)
                        .schedule(seed)
                        .math(self.math);
                if let Some(s) = scales {
                    l = l.input("scales", s);
                }
                if let Some((g, _)) = norm {
                    l = l.input("norm", g);
                }
                use crate::plan::XRead;
                use speckv_kernels::gemv::{X_NORM, X_PLAIN, X_SILU};
                macro_rules! cores {
                    ($fmt:ty) => {
                        match plan.path {
                            PathV2::Cores { mt: 1 } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_v2::<$fmt, 1>(&p2))
                            }
                            PathV2::Cores { mt: 2 } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_v2::<$fmt, 2>(&p2))
                            }
                            PathV2::Cores { mt: 4 } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_v2::<$fmt, 4>(&p2))
                            }
                            PathV2::Cores { mt: 8 } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_v2::<$fmt, 8>(&p2))
                            }
                            PathV2::Cores { .. } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_v2::<$fmt, 16>(&p2))
                            }
                            PathV2::Tensor { nt: 1 } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_tc::<$fmt, 1>(&p2))
                            }
                            PathV2::Tensor { .. } => {
                                emu::launch_checked(&l, || gemv_kernel::gemv_tc::<$fmt, 2>(&p2))
                            }
                            PathV2::Stream => emu::launch_checked(&l, || match read {
                                XRead::Plain => gemv_kernel::gemv_v3::<$fmt, X_PLAIN>(&p2),
                                XRead::Norm => gemv_kernel::gemv_v3::<$fmt, X_NORM>(&p2),
                                XRead::Silu => gemv_kernel::gemv_v3::<$fmt, X_SILU>(&p2),
                            }),
                            // INT8 and NF4 only (FP16 refused above).
                            PathV2::Integer => emu::launch_checked(&l, || match read {
                                XRead::Plain => gemv_kernel::gemv_v4::<$fmt, X_PLAIN>(&p2),
                                XRead::Norm => gemv_kernel::gemv_v4::<$fmt, X_NORM>(&p2),
                                XRead::Silu => gemv_kernel::gemv_v4::<$fmt, X_SILU>(&p2),
                            }),
                        }
                    };
                }
                // SAFETY: `check_gemv` matched x to the matrix, y has m·out slots, the weights are
                // a QMatrix's (lengths from its shape, 16-byte aligned), the workspace is sized and
                // zeroed for the plan, and the sanitizer checks every access against these buffers.
                unsafe {
                    match w {
                        QMatrix::Fp16 { .. } => cores!(Fp16),
                        QMatrix::Int8 { .. } => cores!(Int8),
                        QMatrix::Nf4 { .. } => cores!(Nf4),
                    }
                }?;
                if plan.ksplits > 1 && ws[..plan.partials_offset / 4].iter().any(|&c| c != 0) {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: "gemv v2 left its counters non-zero".to_string(),
                    });
                }
                Ok(y)
            },
            |y| bytemuck::cast_slice::<f32, u8>(y).to_vec(),
        )
        .map_err(Error::from)?;
        y.copy_from_slice(&result);
        Ok(())
    }
}

//! `verify` v1 and v2 on the emulator.

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::params::RowStats;
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};
use speckv_kernels::verify as verify_kernel;

use super::Emulator;
use crate::error::{Error, Result};
use crate::stats::{check_block, LogitsData};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};

impl Emulator {
    /// `verify` on validated input.
    pub fn verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate()?;
        self.verify_unchecked_values(v)
    }

    /// `verify` with only the shapes validated, so γ_b and draft tokens reach the kernel as a
    /// device-side controller could write them (the kernel flags bad ones per sequence).
    pub fn verify_unchecked_values(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate_shapes()?;
        check_block(self.block)?;
        let name = format!("verify_{}", v.target.dtype().name());
        emu::launch_schedules(
            &name,
            |seed| {
                let mut out = VerifyOutput::new(v.batch, v.gamma_max);
                let (draft, draft_t) = match v.draft {
                    DraftDist::Logits { data, temperature } => (data.bytes(), Some(temperature)),
                    DraftDist::Probs(p) => (bytemuck::cast_slice::<f32, u8>(p), None),
                };
                let params = v.params(VerifyPtrs {
                    target: v.target.bytes().as_ptr(),
                    draft: draft.as_ptr(),
                    draft_tokens: v.draft_tokens.as_ptr(),
                    gammas: v.gammas.as_ptr(),
                    target_temperature: v.target_temperature.as_ptr(),
                    draft_temperature: draft_t.map(|t| t.as_ptr()).unwrap_or(std::ptr::null()),
                    accepted: out.accepted.as_mut_ptr(),
                    emitted: out.emitted.as_mut_ptr(),
                    emitted_count: out.emitted_count.as_mut_ptr(),
                    ratios: out.ratios.as_mut_ptr(),
                    counterfactual: out.counterfactual.as_mut_ptr(),
                    seq_flags: out.flags.as_mut_ptr(),
                });
                let mut l = Launch::new(
                    name.as_str(),
                    v.batch as u32,
                    self.block,
                    verify_kernel::shared_bytes(self.block),
                )
                .input("target_logits", v.target.bytes())
                .input("draft", draft)
                .input("draft_tokens", v.draft_tokens)
                .input("gammas", v.gammas)
                .input("target_temperature", v.target_temperature)
                .output("accepted", &mut out.accepted)
                .output("emitted", &mut out.emitted)
                .output("emitted_count", &mut out.emitted_count)
                .output("ratios", &mut out.ratios)
                .output("counterfactual", &mut out.counterfactual)
                .output("seq_flags", &mut out.flags)
                .schedule(seed)
                .math(self.math);
                if let Some(t) = draft_t {
                    l = l.input("draft_temperature", t);
                }
                // SAFETY: `validate_shapes` checked every input length against the shapes the
                // kernel reads (token ids and γ are checked by the kernel itself before use), the
                // outputs are sized by `VerifyOutput::new` for the same shapes, and the sanitizer
                // checks every access against the registered buffers.
                unsafe {
                    match v.target {
                        LogitsData::F32(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<F32>(&params))
                        }
                        LogitsData::F16(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<F16>(&params))
                        }
                        LogitsData::Bf16(_) => {
                            emu::launch_checked(&l, || verify_kernel::verify::<Bf16>(&params))
                        }
                    }
                }?;
                Ok(out)
            },
            verify_fingerprint,
        )
        .map_err(Error::from)
    }

    /// Verification by the v2 kernels, planned for a GPU of `sm_count` SMs: in logits mode the
    /// draft rows' statistics first (`softmax_stats_v2` at each sequence's draft temperature, the
    /// log-sum-exp v2 reads q(x) from), then `verify_v2_rows` and `verify_v2_sample`.
    pub fn verify_v2(&self, v: &VerifyBatch<'_>, sm_count: u32) -> Result<VerifyOutput> {
        v.validate()?;
        self.verify_v2_unchecked_values(v, sm_count)
    }

    /// [`Emulator::verify_v2`] with only the shapes validated (γ, tokens and temperatures reach
    /// the kernels as a device could write them).
    pub fn verify_v2_unchecked_values(
        &self,
        v: &VerifyBatch<'_>,
        sm_count: u32,
    ) -> Result<VerifyOutput> {
        v.validate_shapes()?;
        let dtype = v.target.dtype();
        let plan = speckv_kernels::verify::plan_v2(
            v.batch as u32,
            v.gamma_max as u32,
            v.vocab as u32,
            dtype.size(),
            sm_count,
        );
        let name = format!("verify_v2_{}", dtype.name());
        emu::launch_schedules(
            &name,
            |seed| {
                // The draft rows' statistics (logits mode), as an engine's drafting left them.
                let draft_stats: Option<Vec<RowStats>> = match v.draft {
                    DraftDist::Logits { data, temperature } if v.gamma_max > 0 => {
                        Some(self.draft_row_stats(data, temperature, v, sm_count, seed)?)
                    }
                    _ => None,
                };
                let mut out = VerifyOutput::new(v.batch, v.gamma_max);
                let mut ws = vec![0u8; plan.workspace_bytes.max(16)];
                let (draft, draft_t) = match v.draft {
                    DraftDist::Logits { data, temperature } => (data.bytes(), Some(temperature)),
                    DraftDist::Probs(p) => (bytemuck::cast_slice::<f32, u8>(p), None),
                };
                let base = v.params(VerifyPtrs {
                    target: v.target.bytes().as_ptr(),
                    draft: draft.as_ptr(),
                    draft_tokens: v.draft_tokens.as_ptr(),
                    gammas: v.gammas.as_ptr(),
                    target_temperature: v.target_temperature.as_ptr(),
                    draft_temperature: draft_t.map(|t| t.as_ptr()).unwrap_or(std::ptr::null()),
                    accepted: out.accepted.as_mut_ptr(),
                    emitted: out.emitted.as_mut_ptr(),
                    emitted_count: out.emitted_count.as_mut_ptr(),
                    ratios: out.ratios.as_mut_ptr(),
                    counterfactual: out.counterfactual.as_mut_ptr(),
                    seq_flags: out.flags.as_mut_ptr(),
                });
                let p2 = speckv_kernels::params::VerifyV2Params {
                    base,
                    draft_stats: draft_stats
                        .as_ref()
                        .map(|d| d.as_ptr())
                        .unwrap_or(std::ptr::null()),
                    workspace: ws.as_mut_ptr(),
                    row_splits: plan.row_splits,
                    row_chunk_vecs: plan.row_chunk_vecs,
                    sample_splits: plan.sample_splits,
                    sample_chunk_vecs: plan.sample_chunk_vecs,
                };
                for (phase, grid, block) in [
                    ("rows", plan.row_grid, plan.row_block),
                    ("sample", plan.sample_grid, plan.sample_block),
                ] {
                    let mut l = Launch::new(
                        format!("verify_v2_{phase}_{}", dtype.name()),
                        grid,
                        block,
                        plan.shared_bytes,
                    )
                    .input("target_logits", v.target.bytes())
                    .input("draft", draft)
                    .input("draft_tokens", v.draft_tokens)
                    .input("gammas", v.gammas)
                    .input("target_temperature", v.target_temperature)
                    .output("accepted", &mut out.accepted)
                    .output("emitted", &mut out.emitted)
                    .output("emitted_count", &mut out.emitted_count)
                    .output("ratios", &mut out.ratios)
                    .output("counterfactual", &mut out.counterfactual)
                    .output("seq_flags", &mut out.flags)
                    .output("workspace", &mut ws)
                    .schedule(seed)
                    .math(self.math);
                    if let Some(t) = draft_t {
                        l = l.input("draft_temperature", t);
                    }
                    if let Some(d) = draft_stats.as_ref() {
                        l = l.input("draft_stats", d);
                    }
                    // SAFETY: `validate_shapes` checked every input length against the shapes
                    // the kernels read, the outputs are sized for them, the workspace for the
                    // plan (zeroed), and the sanitizer checks every access against these buffers.
                    unsafe {
                        match (v.target, phase) {
                            (LogitsData::F32(_), "rows") => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_rows::<F32>(&p2)
                            }),
                            (LogitsData::F16(_), "rows") => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_rows::<F16>(&p2)
                            }),
                            (LogitsData::Bf16(_), "rows") => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_rows::<Bf16>(&p2)
                            }),
                            (LogitsData::F32(_), _) => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_sample::<F32>(&p2)
                            }),
                            (LogitsData::F16(_), _) => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_sample::<F16>(&p2)
                            }),
                            (LogitsData::Bf16(_), _) => emu::launch_checked(&l, || {
                                verify_kernel::verify_v2_sample::<Bf16>(&p2)
                            }),
                        }
                    }?;
                }
                let counters = speckv_kernels::verify::Layout::new(
                    v.batch as u32,
                    v.gamma_max as u32,
                    plan.row_splits,
                    plan.sample_splits,
                )
                .counter_bytes();
                if ws[..counters].iter().any(|&x| x != 0) {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: "verify v2 left its counters non-zero".to_string(),
                    });
                }
                Ok(out)
            },
            verify_fingerprint,
        )
        .map_err(Error::from)
    }

    /// The statistics of every draft row `[batch, γmax]` at its sequence's draft temperature
    /// (`softmax_stats_v2` with per-row temperatures), for v2 verification's q(x).
    fn draft_row_stats(
        &self,
        data: LogitsData<'_>,
        temperature: &[f32],
        v: &VerifyBatch<'_>,
        sm_count: u32,
        seed: u64,
    ) -> std::result::Result<Vec<RowStats>, emu::EmuError> {
        let rows = v.batch * v.gamma_max;
        let plan = speckv_kernels::softmax_stats::plan_v2(
            rows as u32,
            v.vocab as u32,
            data.dtype().size(),
            sm_count,
        );
        let mut out = vec![RowStats::default(); rows];
        let mut partials =
            vec![speckv_kernels::params::StatsState::EMPTY; rows * plan.splits as usize];
        let mut counters = vec![0u32; rows];
        let params = speckv_kernels::params::SoftmaxStatsV2Params {
            logits: data.bytes().as_ptr(),
            out: out.as_mut_ptr(),
            accum: std::ptr::null_mut(),
            partials: partials.as_mut_ptr(),
            counters: counters.as_mut_ptr(),
            decision: std::ptr::null(),
            seed: 0,
            step: 0,
            rows: rows as u32,
            vocab: v.vocab as u32,
            row_stride: v.draft_stride as u32,
            temperature: 1.0,
            flags: 0,
            splits: plan.splits,
            chunk_vecs: plan.chunk_vecs,
            temperature_group: v.gamma_max as u32,
            temperatures: temperature.as_ptr(),
            stop: std::ptr::null(),
        };
        let name = format!("softmax_stats_v2_{}", data.dtype().name());
        let l = Launch::new(name.as_str(), plan.grid, plan.block, plan.shared_bytes)
            .input("draft_logits", data.bytes())
            .input("draft_temperature", temperature)
            .output("out", &mut out)
            .output("partials", &mut partials)
            .output("counters", &mut counters)
            .schedule(seed)
            .math(self.math);
        // SAFETY: `validate_shapes` checked the draft rows against `batch × γmax` rows at the draft
        // stride, one temperature per sequence; the scratch is sized for the plan.
        unsafe {
            match data {
                LogitsData::F32(_) => {
                    emu::launch_checked(&l, || kernel::softmax_stats_v2::<F32>(&params))
                }
                LogitsData::F16(_) => {
                    emu::launch_checked(&l, || kernel::softmax_stats_v2::<F16>(&params))
                }
                LogitsData::Bf16(_) => {
                    emu::launch_checked(&l, || kernel::softmax_stats_v2::<Bf16>(&params))
                }
            }
        }?;
        Ok(out)
    }
}

fn verify_fingerprint(o: &VerifyOutput) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(bytemuck::cast_slice(&o.accepted));
    v.extend_from_slice(bytemuck::cast_slice(&o.emitted));
    v.extend_from_slice(bytemuck::cast_slice(&o.emitted_count));
    v.extend_from_slice(bytemuck::cast_slice(&o.ratios));
    v.extend_from_slice(bytemuck::cast_slice(&o.counterfactual));
    v.extend_from_slice(bytemuck::cast_slice(&o.flags));
    v
}

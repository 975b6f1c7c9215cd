//! Launches the kernels' own source on the CPU emulator of the CUDA execution model
//! ([`speckv_kernels::emu`]) with host buffers: the path `cargo test` uses to check every kernel
//! without a GPU. Slow by design (one coroutine per GPU thread); use the CPU backend for speed.
//!
//! Every launch runs with the sanitizer on (its buffers registered with their lengths and
//! directions), under several seeded schedules ([`emu::schedule_seeds`], `SPECKV_EMU_SCHEDULES`),
//! whose outputs must agree bit for bit; [`Emulator::math`] selects exact or GPU-approximate
//! `ex2` / `lg2` / `rcp`.

use speckv_kernels::emu::{self, Launch, Math};
use speckv_kernels::gamma_mlp as gamma_kernel;
use speckv_kernels::gemv::{self as gemv_kernel, Fp16, Int8, Nf4};
use speckv_kernels::params::{FeatureAccum, MlpWeights, RowStats};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};
use speckv_kernels::verify as verify_kernel;

use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};
use crate::stats::{check_accum, check_block, stats_params, Logits, LogitsData, StatsOptions};
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyPtrs};
use crate::weights::gemv::{check as check_gemv, params as gemv_params, raw, MAX_M};
use crate::weights::quant::QMatrix;

/// The emulator as a backend: a block size and a math mode for every launch.
#[derive(Clone, Copy, Debug)]
pub struct Emulator {
    pub block: u32,
    pub math: Math,
}

impl Emulator {
    /// `block` threads per block, exact math.
    pub fn new(block: u32) -> Emulator {
        Emulator {
            block,
            math: Math::Exact,
        }
    }

    /// `ex2` / `lg2` / `rcp` as the GPU's `.approx.ftz` instructions compute them.
    pub fn gpu_math(mut self, seed: u64) -> Emulator {
        self.math = Math::GpuApprox { seed };
        self
    }

    /// `softmax_stats`; `accum` is updated as the CUDA kernel would update it.
    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        opts.validate()?;
        self.softmax_stats_unchecked_options(logits, opts, accum)
    }

    /// `softmax_stats` with the options not validated, as a launch from another host (an engine
    /// loading the PTX, the C ABI's CUDA path) could make it: the kernel flags a bad temperature.
    pub fn softmax_stats_unchecked_options(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        check_block(self.block)?;
        check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
        let rows = logits.rows();
        let initial: Option<Vec<FeatureAccum>> = accum.as_ref().map(|a| a.to_vec());
        let dtype = logits.data().dtype();
        let name = format!("softmax_stats_{}", dtype.name());
        let (out, acc) = emu::launch_schedules(
            &name,
            |seed| {
                let mut out = vec![RowStats::default(); rows];
                let mut acc = initial.clone();
                let accum_ptr = acc
                    .as_mut()
                    .map(|a| a.as_mut_ptr())
                    .unwrap_or(std::ptr::null_mut());
                let params = stats_params(
                    logits,
                    opts,
                    logits.data().bytes().as_ptr(),
                    out.as_mut_ptr(),
                    accum_ptr,
                );
                let mut l = Launch::new(
                    name.as_str(),
                    rows as u32,
                    self.block,
                    kernel::shared_bytes(self.block),
                )
                .input("logits", logits.data().bytes())
                .output("out", &mut out)
                .schedule(seed)
                .math(self.math);
                if let Some(a) = acc.as_mut() {
                    l = l.output("accum", a);
                }
                // SAFETY: the registered buffers are the kernel's whole world: `Logits::new`
                // checked that the logits cover every row the kernel reads, `out` has one slot per
                // row and the accumulators (if any) too (`check_accum`); the sanitizer checks
                // every access against them.
                unsafe {
                    match logits.data() {
                        LogitsData::F32(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<F32>(&params))
                        }
                        LogitsData::F16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<F16>(&params))
                        }
                        LogitsData::Bf16(_) => {
                            emu::launch_checked(&l, || kernel::softmax_stats::<Bf16>(&params))
                        }
                    }
                }?;
                Ok((out, acc))
            },
            |(out, acc)| {
                let mut v = bytemuck::cast_slice::<RowStats, u8>(out).to_vec();
                if let Some(a) = acc {
                    v.extend_from_slice(bytemuck::cast_slice(a));
                }
                v
            },
        )?;
        if let (Some(dst), Some(src)) = (accum, acc) {
            dst.copy_from_slice(&src);
        }
        Ok(out)
    }

    /// `softmax_stats_v2` with the plan for a GPU of `sm_count` SMs (the emulator's grid is the
    /// GPU's); with `decision`, the γ decision fused into each row's final merge (`STATS_DECIDE`),
    /// returning (γ, predicted tokens, `GAMMA_*` flags) per row as `gamma_mlp` would.
    pub fn softmax_stats_v2(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
        sm_count: u32,
        decision: Option<Decision<'_>>,
    ) -> Result<StatsV2Output> {
        opts.validate()?;
        let (_, plan) = crate::plan::softmax_stats_v2(
            logits.rows() as u32,
            logits.vocab() as u32,
            logits.data().dtype(),
            sm_count,
        );
        self.softmax_stats_v2_planned(logits, opts, accum, &plan, decision)
    }

    /// `softmax_stats_v2` with an explicit plan (any split count, chunk and block size).
    pub fn softmax_stats_v2_planned(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
        plan: &speckv_kernels::softmax_stats::PlanV2,
        decision: Option<Decision<'_>>,
    ) -> Result<StatsV2Output> {
        check_block(plan.block)?;
        check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
        if decision.is_some()
            && (opts.accumulate == crate::stats::Accumulate::No || accum.is_none())
        {
            return Err(Error::Other(
                "a fused γ decision needs accumulators (accumulate add or reset)".to_string(),
            ));
        }
        let rows = logits.rows();
        let splits = plan.splits.max(1) as usize;
        if plan.grid as usize != rows * splits || plan.chunk_vecs == 0 {
            return Err(Error::Other(format!(
                "inconsistent v2 plan {plan:?} for {rows} rows"
            )));
        }
        let initial: Option<Vec<FeatureAccum>> = accum.as_ref().map(|a| a.to_vec());
        let dtype = logits.data().dtype();
        let name = format!("softmax_stats_v2_{}", dtype.name());
        let cost = decision.and_then(|d| d.controller.cost_table());
        let out = emu::launch_schedules(
            &name,
            |seed| {
                let mut r = StatsV2Output {
                    stats: vec![RowStats::default(); rows],
                    accum: initial.clone(),
                    gammas: decision.map(|_| vec![0i32; rows]),
                    expected: decision.map(|_| vec![0f32; rows]),
                    gamma_flags: decision.map(|_| vec![0u32; rows]),
                };
                let mut partials = vec![speckv_kernels::params::StatsState::EMPTY; rows * splits];
                let mut counters = vec![0u32; rows];
                let accum_ptr = r
                    .accum
                    .as_mut()
                    .map(|a| a.as_mut_ptr())
                    .unwrap_or(std::ptr::null_mut());
                let gp = decision.map(|d| {
                    d.controller.params(
                        rows,
                        d.compression_code,
                        d.fallback,
                        GammaPtrs {
                            weights: d.weights,
                            accum: accum_ptr,
                            compression: std::ptr::null(),
                            cost: cost
                                .as_ref()
                                .map(|c| c.as_ptr())
                                .unwrap_or(std::ptr::null()),
                            gammas_out: r
                                .gammas
                                .as_mut()
                                .map(|g| g.as_mut_ptr())
                                .unwrap_or(std::ptr::null_mut()),
                            expected_out: r
                                .expected
                                .as_mut()
                                .map(|g| g.as_mut_ptr())
                                .unwrap_or(std::ptr::null_mut()),
                            flags_out: r
                                .gamma_flags
                                .as_mut()
                                .map(|g| g.as_mut_ptr())
                                .unwrap_or(std::ptr::null_mut()),
                        },
                    )
                });
                let base = stats_params(
                    logits,
                    opts,
                    logits.data().bytes().as_ptr(),
                    r.stats.as_mut_ptr(),
                    accum_ptr,
                );
                let params = speckv_kernels::params::SoftmaxStatsV2Params {
                    logits: base.logits,
                    out: base.out,
                    accum: base.accum,
                    partials: partials.as_mut_ptr(),
                    counters: counters.as_mut_ptr(),
                    decision: gp
                        .as_ref()
                        .map(|g| g as *const _)
                        .unwrap_or(std::ptr::null()),
                    seed: base.seed,
                    step: base.step,
                    rows: base.rows,
                    vocab: base.vocab,
                    row_stride: base.row_stride,
                    temperature: base.temperature,
                    flags: base.flags
                        | if decision.is_some() {
                            speckv_kernels::params::STATS_DECIDE
                        } else {
                            0
                        },
                    splits: plan.splits,
                    chunk_vecs: plan.chunk_vecs,
                    temperature_group: 1,
                    temperatures: std::ptr::null(),
                };
                let mut l = Launch::new(name.as_str(), plan.grid, plan.block, plan.shared_bytes)
                    .input("logits", logits.data().bytes())
                    .output("out", &mut r.stats)
                    .output("partials", &mut partials)
                    .output("counters", &mut counters)
                    .schedule(seed)
                    .math(self.math);
                if let Some(a) = r.accum.as_mut() {
                    l = l.output("accum", a);
                }
                if let (Some(g), Some(d)) = (gp.as_ref(), decision) {
                    l = l
                        .input("decision", std::slice::from_ref(g))
                        .input("weights", std::slice::from_ref(d.weights))
                        .output("gammas_out", r.gammas.as_mut().unwrap_or(&mut Vec::new()))
                        .output(
                            "expected_out",
                            r.expected.as_mut().unwrap_or(&mut Vec::new()),
                        )
                        .output(
                            "flags_out",
                            r.gamma_flags.as_mut().unwrap_or(&mut Vec::new()),
                        );
                    if let Some(c) = cost.as_ref() {
                        l = l.input("cost", c);
                    }
                }
                // SAFETY: the registered buffers are the kernel's whole world: the logits cover
                // every row (`Logits::new`), the outputs, accumulators and scratch have the
                // shapes the plan needs, the counters start at zero, and the sanitizer checks
                // every access against them.
                unsafe {
                    match logits.data() {
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
                if counters.iter().any(|&c| c != 0) {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: format!("arrival counters not reset: {counters:?}"),
                    });
                }
                Ok(r)
            },
            |r| {
                let mut v = bytemuck::cast_slice::<RowStats, u8>(&r.stats).to_vec();
                if let Some(a) = &r.accum {
                    v.extend_from_slice(bytemuck::cast_slice(a));
                }
                for x in [
                    &r.gammas,
                    &r.gamma_flags
                        .as_ref()
                        .map(|f| f.iter().map(|&u| u as i32).collect()),
                ]
                .into_iter()
                .flatten()
                {
                    v.extend_from_slice(bytemuck::cast_slice(x));
                }
                if let Some(e) = &r.expected {
                    v.extend_from_slice(bytemuck::cast_slice(e));
                }
                v
            },
        )?;
        if let (Some(dst), Some(src)) = (accum, out.accum.as_ref()) {
            dst.copy_from_slice(src);
        }
        Ok(out)
    }

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

    /// `gamma_mlp`: every sequence's γ for its next step from its accumulator. Returns (γ,
    /// predicted tokens per step, `GAMMA_*` flags) per sequence.
    pub fn gamma_mlp(
        &self,
        controller: &Controller,
        weights: &MlpWeights,
        accum: &[FeatureAccum],
        compression_code: f32,
        fallback: i32,
    ) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
        if accum.is_empty() {
            return Err(Error::Empty { what: "batch" });
        }
        if self.block == 0 || self.block > 1024 {
            return Err(Error::BadBlockSize(self.block));
        }
        let n = accum.len();
        let cost = controller.cost_table();
        emu::launch_schedules(
            "gamma_mlp_f32",
            |seed| {
                let mut gammas = vec![0i32; n];
                let mut expected = vec![0f32; n];
                let mut flags = vec![0u32; n];
                let params = controller.params(
                    n,
                    compression_code,
                    fallback,
                    GammaPtrs {
                        weights,
                        accum: accum.as_ptr(),
                        compression: std::ptr::null(),
                        cost: cost
                            .as_ref()
                            .map(|c| c.as_ptr())
                            .unwrap_or(std::ptr::null()),
                        gammas_out: gammas.as_mut_ptr(),
                        expected_out: expected.as_mut_ptr(),
                        flags_out: flags.as_mut_ptr(),
                    },
                );
                let mut l = Launch::new(
                    "gamma_mlp_f32",
                    (n as u32).div_ceil(self.block),
                    self.block,
                    0,
                )
                .input("weights", std::slice::from_ref(weights))
                .input("accum", accum)
                .output("gammas_out", &mut gammas)
                .output("expected_out", &mut expected)
                .output("flags_out", &mut flags)
                .schedule(seed)
                .math(self.math);
                if let Some(c) = cost.as_ref() {
                    l = l.input("cost", c);
                }
                // SAFETY: the weights are one struct, accumulators and outputs have `n` elements,
                // the cost table (if any) one entry per candidate, `Controller::new` checked the
                // candidates, and the sanitizer checks every access against these buffers.
                unsafe { emu::launch_checked(&l, || gamma_kernel::gamma_mlp(&params)) }?;
                Ok((gammas, expected, flags))
            },
            |(g, e, f)| {
                let mut v = bytemuck::cast_slice::<i32, u8>(g).to_vec();
                v.extend_from_slice(bytemuck::cast_slice(e));
                v.extend_from_slice(bytemuck::cast_slice(f));
                v
            },
        )
        .map_err(Error::from)
    }

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

/// The γ decision fused into `softmax_stats_v2` (`STATS_DECIDE`).
#[derive(Clone, Copy)]
pub struct Decision<'a> {
    pub controller: &'a Controller,
    pub weights: &'a MlpWeights,
    pub compression_code: f32,
    pub fallback: i32,
}

/// What `softmax_stats_v2` produced: the rows' statistics, the accumulators after the launch, and
/// with a fused decision the γ, predicted tokens and flags per row.
#[derive(Clone, Debug)]
pub struct StatsV2Output {
    pub stats: Vec<RowStats>,
    pub accum: Option<Vec<FeatureAccum>>,
    pub gammas: Option<Vec<i32>>,
    pub expected: Option<Vec<f32>>,
    pub gamma_flags: Option<Vec<u32>>,
}

impl Emulator {
    /// y `[m, out]` = x `[m, in]` · Wᵀ by the v2 kernels, planned for `sm_count` SMs (tensor cores
    /// for M ≥ 2 when K is a multiple of 64, CUDA cores otherwise; K split across blocks).
    pub fn gemv_v2(&self, w: &QMatrix, x: &[f32], m: usize, sm_count: u32) -> Result<Vec<f32>> {
        use speckv_kernels::gemv::PathV2;
        check_gemv(w, x, m)?;
        let (out, inp) = w.shape();
        let (wb, scales) = raw(w);
        if (wb.as_ptr() as usize) % 16 != 0 {
            return Err(Error::Other(
                "weights must be 16-byte aligned for v2".to_string(),
            ));
        }
        let (lp, plan) =
            crate::plan::gemv_v2(w.format(), out as u32, inp as u32, m as u32, sm_count);
        emu::launch_schedules(
            &lp.entry,
            |seed| {
                let mut y = vec![0f32; m * out];
                let mut ws = vec![0u32; plan.workspace_bytes.div_ceil(4).max(4)];
                let sp = scales.map(|s| s.as_ptr()).unwrap_or(std::ptr::null());
                let base = gemv_params(w, m, wb.as_ptr(), sp, x.as_ptr(), y.as_mut_ptr());
                let p2 = speckv_kernels::params::GemvV2Params {
                    base,
                    workspace: ws.as_mut_ptr() as *mut u8,
                    ksplits: plan.ksplits,
                    kt: plan.kt,
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
        .map_err(Error::from)
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

/// Runs `softmax_stats` on the emulator with `block` threads per row (exact math).
pub fn softmax_stats(
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
    block: u32,
) -> Result<Vec<RowStats>> {
    Emulator::new(block).softmax_stats(logits, opts, accum)
}

/// Runs `verify` on the emulator with `block` threads per sequence (exact math).
pub fn verify(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify(v)
}

/// Runs `verify` with only the shapes validated (see [`Emulator::verify_unchecked_values`]).
pub fn verify_unchecked_values(v: &VerifyBatch<'_>, block: u32) -> Result<VerifyOutput> {
    Emulator::new(block).verify_unchecked_values(v)
}

/// Runs `gamma_mlp` on the emulator (see [`Emulator::gamma_mlp`]).
pub fn gamma_mlp(
    controller: &Controller,
    weights: &MlpWeights,
    accum: &[FeatureAccum],
    compression_code: f32,
    fallback: i32,
    block: u32,
) -> Result<(Vec<i32>, Vec<f32>, Vec<u32>)> {
    Emulator::new(block).gamma_mlp(controller, weights, accum, compression_code, fallback)
}

/// Runs the GEMV on the emulator with `block` threads per block (see [`Emulator::gemv`]).
pub fn gemv(w: &QMatrix, x: &[f32], m: usize, block: u32) -> Result<Vec<f32>> {
    Emulator::new(block).gemv(w, x, m)
}

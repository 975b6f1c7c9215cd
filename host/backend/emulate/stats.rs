//! `softmax_stats` v1 and v2 (with the fused γ decision) on the emulator.

use speckv_kernels::emu::{self, Launch};
use speckv_kernels::params::{
    FeatureAccum, LockstepScratch, MlpWeights, RowStats, StopParams, StopState, STATS_STOP,
    STOP_TIMES,
};
use speckv_kernels::softmax_stats::{self as kernel, Bf16, F16, F32};

use super::stop::Stop;
use super::Emulator;
use crate::controller::{Controller, GammaPtrs};
use crate::error::{Error, Result};
use crate::stats::{check_accum, check_block, stats_params, Logits, LogitsData, StatsOptions};

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
    /// With [`Stop`]: each sequence's state after the launch (γ_b is in `gammas`) and how many
    /// sequences stopped in it.
    pub stop_state: Option<Vec<StopState>>,
    pub stopped_count: Option<u32>,
    /// With [`Stop`]: `rows × STOP_TIMES` hazards, each kept draft's at `row · STOP_TIMES + j`
    /// (NaN where nothing was written).
    pub hazards: Option<Vec<f32>>,
}

impl Emulator {
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
        self.softmax_stats_v2_fused(logits, opts, accum, plan, decision, None)
    }

    /// `softmax_stats_v2` with per-token stopping in its epilogue (`STATS_STOP`): one row per
    /// sequence, its draft just computed. `out.gammas` holds γ_b, `out.stop_state` the states to
    /// pass to the next draft's launch.
    pub fn softmax_stats_v2_stop(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum],
        plan: &speckv_kernels::softmax_stats::PlanV2,
        stop: Stop<'_>,
    ) -> Result<StatsV2Output> {
        stop.check(logits.rows(), opts)?;
        self.softmax_stats_v2_fused(logits, opts, Some(accum), plan, None, Some(stop))
    }

    fn softmax_stats_v2_fused(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
        plan: &speckv_kernels::softmax_stats::PlanV2,
        decision: Option<Decision<'_>>,
        stop: Option<Stop<'_>>,
    ) -> Result<StatsV2Output> {
        check_block(plan.block)?;
        check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
        if (decision.is_some() || stop.is_some())
            && (opts.accumulate == crate::stats::Accumulate::No || accum.is_none())
        {
            return Err(Error::Other(
                "a fused γ decision or stopping rule needs accumulators (accumulate add or reset)"
                    .to_string(),
            ));
        }
        if decision.is_some() && stop.is_some() {
            return Err(Error::Other(
                "a launch either decides γ or stops per token, not both".to_string(),
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
                    stop_state: stop.map(|s| s.state.to_vec()),
                    stopped_count: stop.map(|_| 0),
                    hazards: stop.map(|_| vec![f32::NAN; rows * STOP_TIMES]),
                };
                if let Some(st) = stop {
                    r.gammas = Some(st.state.iter().map(|x| x.kept as i32).collect());
                }
                let mut stopped = [0u32];
                let mut lockstep = [bytemuck::Zeroable::zeroed(); 1];
                let lockstep: &mut [LockstepScratch] = &mut lockstep;
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
                let sp = stop.map(|st| StopParams {
                    weights: st.weights,
                    state: r
                        .stop_state
                        .as_mut()
                        .map(|v| v.as_mut_ptr())
                        .unwrap_or(std::ptr::null_mut()),
                    gammas_out: r
                        .gammas
                        .as_mut()
                        .map(|g| g.as_mut_ptr())
                        .unwrap_or(std::ptr::null_mut()),
                    stopped_count: stopped.as_mut_ptr(),
                    hazards_out: r
                        .hazards
                        .as_mut()
                        .map(|h| h.as_mut_ptr())
                        .unwrap_or(std::ptr::null_mut()),
                    costs: st.costs,
                    gamma_max: st.gamma_max,
                    compression_code: st.compression_code,
                    odds_scale: st.odds_scale,
                    lockstep: if st.lockstep {
                        lockstep.as_mut_ptr()
                    } else {
                        std::ptr::null_mut()
                    },
                    odds_scales: st
                        .odds_scales
                        .map(|k| k.as_ptr())
                        .unwrap_or(std::ptr::null()),
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
                        }
                        | if stop.is_some() { STATS_STOP } else { 0 },
                    splits: plan.splits,
                    chunk_vecs: plan.chunk_vecs,
                    temperature_group: 1,
                    temperatures: std::ptr::null(),
                    stop: sp
                        .as_ref()
                        .map(|x| x as *const _)
                        .unwrap_or(std::ptr::null()),
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
                if let (Some(x), Some(st)) = (sp.as_ref(), stop) {
                    l = l
                        .input("stop", std::slice::from_ref(x))
                        .input("weights", std::slice::from_ref(st.weights))
                        .output(
                            "stop_state",
                            r.stop_state.as_mut().unwrap_or(&mut Vec::new()),
                        )
                        .output("gammas_out", r.gammas.as_mut().unwrap_or(&mut Vec::new()))
                        .output("stopped_count", &mut stopped)
                        .output("hazards_out", r.hazards.as_mut().unwrap_or(&mut Vec::new()));
                    if st.lockstep {
                        l = l.output("lockstep", &mut *lockstep);
                    }
                    if let Some(k) = st.odds_scales {
                        l = l.input("odds_scales", k);
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
                if stop.is_some() {
                    r.stopped_count = Some(stopped[0]);
                }
                if lockstep[0].arrived != 0 {
                    return Err(emu::EmuError::KernelPanic {
                        block: 0,
                        message: format!("lockstep arrivals not reset: {}", lockstep[0].arrived),
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
                if let Some(x) = &r.stop_state {
                    v.extend_from_slice(bytemuck::cast_slice(x));
                }
                if let Some(h) = &r.hazards {
                    v.extend_from_slice(bytemuck::cast_slice(h));
                }
                v.extend_from_slice(&r.stopped_count.unwrap_or(u32::MAX).to_le_bytes());
                v
            },
        )?;
        if let (Some(dst), Some(src)) = (accum, out.accum.as_ref()) {
            dst.copy_from_slice(src);
        }
        Ok(out)
    }
}

//! Per-token stopping through the C ABI: the `auto` policy's stopping rule fused into the
//! draft's statistics pass (`softmax_stats_v2` with `STATS_STOP` on CUDA, its CPU twin on the
//! CPU). After each drafted token every sequence keeps or discards it and drafts on or stops, from
//! the hazard model's P(accept) and the step's costs; its γ_b lands where `speckv_verify` reads
//! it, and a counter says how many sequences stopped. The host reads nothing per token.

use std::ffi::{c_char, c_void, CStr};
use std::path::Path;

use speckv::backend::emulate::Stop;
use speckv::backend::external::DeviceBuffer;
use speckv::controller::hazard::{
    Calibration, HazardModel, OnlineCost, CALIBRATION_RATE, ONLINE_COST_ALPHA,
};
use speckv::controller::CostModel;
use speckv::stats::Accumulate;
use speckv_kernels::params::{
    MlpWeights, StepCosts, StopParams, StopState, LOCKSTEP_MAX_ROWS, STOP_TIMES,
};

use super::{
    aligned, aligned_to, ctx_ref, fail, file_status, guard, non_null, Device, IntoStatus,
    SpeckvContext, SpeckvStatsArgs, SpeckvStatus, StatsCall,
};

/// Entries of `SpeckvStepCosts.verify`: γ = 0..=15.
pub const SPECKV_STOP_TIMES: usize = 16;
/// The most drafts per step the stopping rule takes (`SPECKV_STOP_TIMES − 1`).
pub const SPECKV_STOP_MAX_GAMMA: u32 = 15;

const _: () = assert!(SPECKV_STOP_TIMES == STOP_TIMES);
const _: () = assert!(SPECKV_STOP_MAX_GAMMA as usize == STOP_TIMES - 1);

/// One sequence's place in its speculation step (the kernels' `StopState`, 16 bytes): the chance
/// every kept draft is accepted, the step's expected tokens so far, drafts kept (γ_b) and whether
/// it has stopped. Zero-initialised memory is fine: a step's first draft (accumulate RESET) starts
/// every sequence afresh.
pub type SpeckvStopState = StopState;

/// A step's costs as the stopping rule weighs them (the kernels' `StepCosts`): one draft pass, and
/// the verification of γ drafts for γ = 0..=gamma_max (later entries unused). Any time unit: only
/// ratios enter the decision. `speckv_step_costs` fills it from a cost model.
pub type SpeckvStepCosts = StepCosts;

/// The stopping rule's inputs for one drafted position of a batch: `rows` sequences, one logits
/// row each (the `SpeckvStatsArgs` of the same call).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SpeckvStopArgs {
    /// `[rows]` states, read and written. A call with accumulate RESET (the step's first draft)
    /// starts every sequence afresh whatever its state holds; later calls (accumulate ADD) go on
    /// from it. A sequence that has stopped is left alone: its accumulator, state and γ_b stay.
    pub state: *mut SpeckvStopState,
    /// `[rows]` γ_b, written after every decision of a sequence still drafting: the drafts kept
    /// so far — `speckv_verify`'s `gammas`.
    pub gammas_out: *mut i32,
    /// One counter, or null: each sequence that stops in this call adds one (zero it before a
    /// step's first draft; it reaches `rows` when every sequence has stopped).
    pub stopped_count: *mut u32,
    /// `[rows × SPECKV_STOP_TIMES]`, or null: the hazard each kept draft was decided with, draft j
    /// of sequence b at `b · SPECKV_STOP_TIMES + j` (nothing written for a discarded draft) — what
    /// `speckv_calibrate` reads once the step is verified.
    pub hazards_out: *mut f32,
    pub costs: SpeckvStepCosts,
    /// Most drafts per step, 1..=SPECKV_STOP_MAX_GAMMA: a sequence stops at γmax.
    pub gamma_max: u32,
    /// The target's compression, a feature of the hazard model: 0 fp16, 1 int8, 2 nf4.
    pub compression_code: f32,
    /// Online calibration: the model's odds h / (1 − h) are multiplied by this (1: the model as
    /// trained); finite and > 0. Ignored when `odds_scales` is given.
    pub odds_scale: f32,
    /// 0: every sequence decides alone, as if it drafted by itself. 1: the sequences draft in
    /// lockstep — one batched draft pass for all, one batched verification of the longest γ — and
    /// decide together: after each draft every sequence keeps it or none does, and all draft on
    /// or all stop, by the expected tokens summed over the batch (`generate`'s batched `auto`).
    /// At most `SPECKV_LOCKSTEP_MAX_ROWS` rows; on CUDA through a scratch the context owns.
    pub lockstep: u32,
    /// `[rows]` odds scales, one per sequence (each sequence's own calibration, kept by
    /// `speckv_calibrate_each`), or null: `odds_scale` for every sequence. The sequences of a
    /// batch are different prompts whose drafts the target accepts at different rates. Host
    /// memory on a CPU context, where each is checked finite and > 0; device memory on CUDA, not
    /// read by the host (keep them finite and > 0, as `speckv_calibrate_each` leaves them).
    pub odds_scales: *const f32,
}

/// The most sequences one lockstep call decides for (`SpeckvStopArgs.lockstep`).
pub const SPECKV_LOCKSTEP_MAX_ROWS: usize = 16;

const _: () = assert!(SPECKV_LOCKSTEP_MAX_ROWS == LOCKSTEP_MAX_ROWS);

/// The hazard model a context holds, and its weights on the device.
pub(crate) struct LoadedHazard {
    weights: MlpWeights,
    device: Option<DeviceBuffer>,
}

pub(crate) fn c_path(p: *const c_char) -> Option<String> {
    // SAFETY: null or a NUL-terminated string (contract).
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Loads the hazard model of the per-token stopping rule: JSON from `speckv train --hazard`, or
/// null for the model shipped with speckv (trained on the Qwen2.5-Coder 0.5B → 1.5B traces). On
/// CUDA its weights are uploaded here, once.
#[no_mangle]
pub unsafe extern "C" fn speckv_load_hazard(
    ctx: *mut SpeckvContext,
    hazard_path: *const c_char,
) -> SpeckvStatus {
    guard(|| {
        non_null(ctx, "context")?;
        // SAFETY: a live context (contract), exclusively used by this call.
        let c = unsafe { &mut *ctx };
        let model = match c_path(hazard_path) {
            Some(p) => file_status(HazardModel::load(Path::new(&p)))?,
            None => HazardModel::default_model().st()?,
        };
        let weights = model.weights();
        let device = match &c.device {
            Device::Cpu(_) => None,
            Device::Cuda { cuda, .. } => Some(cuda.upload(bytemuck::bytes_of(&weights)).st()?),
        };
        c.hazard = Some(LoadedHazard { weights, device });
        Ok(())
    })
}

/// The step costs of a cost model (`speckv profile`'s `steps.cost.json`; null: the assumed one —
/// a draft pass 1/3 of a target pass, verification 2 % dearer a drafted position) for γmax
/// `gamma_max` (1..=SPECKV_STOP_MAX_GAMMA) into `*out`: verify[γ] for γ ≤ γmax, +inf beyond.
#[no_mangle]
pub unsafe extern "C" fn speckv_step_costs(
    cost_json: *const c_char,
    gamma_max: u32,
    out: *mut SpeckvStepCosts,
) -> SpeckvStatus {
    guard(|| {
        non_null(out, "out")?;
        aligned(out, "out")?;
        check_gamma_max(gamma_max)?;
        let model = match c_path(cost_json) {
            Some(p) => file_status(CostModel::load(Path::new(&p)))?,
            None => CostModel::assumed(),
        };
        let costs = OnlineCost::new(model, ONLINE_COST_ALPHA).step_costs(gamma_max as usize);
        // SAFETY: non-null, aligned, writable (contract).
        unsafe { *out = costs };
        Ok(())
    })
}

pub(crate) fn check_gamma_max(gamma_max: u32) -> Result<(), (SpeckvStatus, String)> {
    if gamma_max == 0 || gamma_max > SPECKV_STOP_MAX_GAMMA {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!("gamma_max must be 1..={SPECKV_STOP_MAX_GAMMA}, got {gamma_max}"),
        );
    }
    Ok(())
}

/// The checks of a `SpeckvStopArgs` that need no device: pointers, γmax, the compression code, the
/// calibration and costs the rule can weigh.
fn check_stop(s: &SpeckvStopArgs) -> Result<(), (SpeckvStatus, String)> {
    non_null(s.state, "stop.state")?;
    non_null(s.gammas_out, "stop.gammas_out")?;
    aligned(s.state, "stop.state")?;
    aligned(s.gammas_out, "stop.gammas_out")?;
    aligned(s.stopped_count, "stop.stopped_count")?;
    aligned(s.hazards_out, "stop.hazards_out")?;
    aligned(s.odds_scales, "stop.odds_scales")?;
    check_gamma_max(s.gamma_max)?;
    if s.lockstep > 1 {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!(
                "stop.lockstep must be 0 (each sequence alone) or 1 (the batch together), got {}",
                s.lockstep
            ),
        );
    }
    if !s.compression_code.is_finite() {
        return fail(
            SpeckvStatus::InvalidArgument,
            "stop.compression_code must be finite (0 fp16, 1 int8, 2 nf4)",
        );
    }
    if s.odds_scales.is_null() && !(s.odds_scale.is_finite() && s.odds_scale > 0.0) {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!(
                "stop.odds_scale must be finite and > 0 (1: the model as trained), got {}",
                s.odds_scale
            ),
        );
    }
    if !(s.costs.draft.is_finite() && s.costs.draft >= 0.0) {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!(
                "stop.costs.draft must be finite and ≥ 0, got {}",
                s.costs.draft
            ),
        );
    }
    let used = &s.costs.verify[..=s.gamma_max as usize];
    if let Some((g, v)) = used
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v > 0.0))
    {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!(
                "stop.costs.verify[{g}] must be finite and > 0 for γ ≤ gamma_max {}, got {v}",
                s.gamma_max
            ),
        );
    }
    Ok(())
}

/// Softmax statistics of every row (as `speckv_softmax_stats`: one row per sequence, its draft
/// just computed) with the per-token stopping rule after each: the sequence keeps or discards the
/// draft and drafts on or stops, γ_b written to `stop->gammas_out`. Accumulation is required
/// (RESET for a step's first draft, ADD after). Needs `speckv_load_hazard`. CPU: synchronous;
/// CUDA: every pointer in both argument structs a device pointer, asynchronous on the context's
/// stream — the rule's parameters are copied to the device only when they differ from the last
/// call's (the costs change per step, not per draft).
#[no_mangle]
pub unsafe extern "C" fn speckv_softmax_stats_stop(
    ctx: *const SpeckvContext,
    args: *const SpeckvStatsArgs,
    stop: *const SpeckvStopArgs,
) -> SpeckvStatus {
    guard(|| {
        let c = ctx_ref(ctx)?;
        let call = StatsCall::check(args)?;
        non_null(stop, "stop")?;
        // SAFETY: non-null, readable (contract).
        let s = unsafe { *stop };
        check_stop(&s)?;
        if call.opts.accumulate == Accumulate::No {
            return fail(
                SpeckvStatus::InvalidArgument,
                "per-token stopping needs accumulators: accumulate RESET (a step's first draft) \
                 or ADD",
            );
        }
        let Some(h) = &c.hazard else {
            return fail(
                SpeckvStatus::NoHazardModel,
                "no hazard model: call speckv_load_hazard first",
            );
        };
        let rows = call.rows;
        if s.lockstep != 0 && rows > SPECKV_LOCKSTEP_MAX_ROWS {
            return fail(
                SpeckvStatus::InvalidArgument,
                format!(
                    "{rows} rows in lockstep: one call decides for at most \
                     {SPECKV_LOCKSTEP_MAX_ROWS} sequences"
                ),
            );
        }
        match &c.device {
            Device::Cpu(cpu) => {
                let l = call.logits()?;
                // SAFETY: `rows` accumulators, states and γ_b, and `rows` odds scales where
                // given (contract), used only during this call.
                let (accum, states, gammas, scales) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(call.args.accum, rows),
                        std::slice::from_raw_parts_mut(s.state, rows),
                        std::slice::from_raw_parts_mut(s.gammas_out, rows),
                        (!s.odds_scales.is_null())
                            .then(|| std::slice::from_raw_parts(s.odds_scales, rows)),
                    )
                };
                let rule = Stop {
                    weights: &h.weights,
                    state: states,
                    costs: s.costs,
                    gamma_max: s.gamma_max,
                    compression_code: s.compression_code,
                    odds_scale: s.odds_scale,
                    odds_scales: scales,
                    lockstep: s.lockstep != 0,
                };
                let r = cpu.softmax_stats_stop(&l, &call.opts, accum, rule).st()?;
                let reset = call.opts.accumulate == Accumulate::Reset;
                let (after, kept) = (
                    r.stop_state.unwrap_or_default(),
                    r.gammas.unwrap_or_default(),
                );
                for b in 0..rows {
                    // As the kernel: a sequence already stopped has nothing written.
                    if reset || states[b].stopped == 0 {
                        gammas[b] = kept[b];
                    }
                }
                states.copy_from_slice(&after);
                // SAFETY: `rows` writable outputs (contract).
                unsafe { std::ptr::copy_nonoverlapping(r.stats.as_ptr(), call.args.out, rows) };
                if !s.hazards_out.is_null() {
                    let h = r.hazards.unwrap_or_default();
                    for (i, &x) in h.iter().enumerate().filter(|(_, x)| !x.is_nan()) {
                        // SAFETY: `rows × SPECKV_STOP_TIMES` writable values when non-null
                        // (contract); `i` is inside (`h` has that length).
                        unsafe { *s.hazards_out.add(i) = x };
                    }
                }
                if !s.stopped_count.is_null() {
                    // SAFETY: one writable counter when non-null (contract).
                    unsafe {
                        *s.stopped_count =
                            (*s.stopped_count).wrapping_add(r.stopped_count.unwrap_or(0))
                    };
                }
                Ok(())
            }
            Device::Cuda { cuda, stream } => {
                let Some(w) = &h.device else {
                    return fail(SpeckvStatus::Internal, "hazard weights not on the device");
                };
                let p = call.cuda_params()?;
                let sp = StopParams {
                    weights: w.ptr() as *const MlpWeights,
                    state: s.state,
                    gammas_out: s.gammas_out,
                    stopped_count: s.stopped_count,
                    hazards_out: s.hazards_out,
                    costs: s.costs,
                    gamma_max: s.gamma_max,
                    compression_code: s.compression_code,
                    odds_scale: s.odds_scale,
                    lockstep: std::ptr::null_mut(), // the context's scratch, when asked
                    odds_scales: s.odds_scales,
                };
                // SAFETY: device buffers of the stated shapes (contract); the weights were
                // uploaded by `speckv_load_hazard` and live as long as the context.
                unsafe { cuda.softmax_stats_stop(call.dt, &p, &sp, s.lockstep != 0, *stream) }.st()
            }
        }
    })
}

/// The online calibration of the hazard model, once a step is verified (host memory): the odds
/// scale `*odds_scale` (what `SpeckvStopArgs.odds_scale` takes; 1 to start) moves towards the
/// acceptance seen, by the rule `speckv generate --policy auto` calibrates with — a stochastic
/// gradient step on the log-likelihood of each verified draft's outcome (accepted or the first
/// rejected) given the hazard it was kept with (`hazards`, `[batch × SPECKV_STOP_TIMES]` as
/// `SpeckvStopArgs.hazards_out` wrote them), learning rate 0.1, the scale kept within
/// [1/20, 20]. One scale for the batch; `speckv_calibrate_each` keeps one per sequence. `gammas`
/// (γ_b) and `accepted` are `speckv_verify`'s inputs and output; accepted must be within
/// 0..=γ_b.
#[no_mangle]
pub unsafe extern "C" fn speckv_calibrate(
    odds_scale: *mut f32,
    hazards: *const f32,
    gammas: *const i32,
    accepted: *const i32,
    batch: u32,
) -> SpeckvStatus {
    guard(|| {
        non_null(odds_scale, "odds_scale")?;
        aligned(odds_scale, "odds_scale")?;
        // SAFETY: non-null, aligned, one readable value (contract).
        let k = check_scale(unsafe { *odds_scale }, "odds_scale")?;
        let mut cal = Calibration::at(CALIBRATION_RATE, k);
        // SAFETY: the buffers' lengths are this call's contract.
        for (kept, acc) in unsafe { verified(hazards, gammas, accepted, batch) }? {
            cal.observe(&kept, acc);
        }
        // SAFETY: non-null, aligned, writable (contract).
        unsafe { *odds_scale = cal.odds_scale() };
        Ok(())
    })
}

/// `speckv_calibrate` for each sequence on its own: `odds_scales[b]` (`batch` values, host
/// memory; what `SpeckvStopArgs.odds_scales` takes — copy them to the device on CUDA; 1 to start)
/// moves by sequence b's verified drafts only. Each must be finite and > 0; nothing is written
/// unless every input is valid.
#[no_mangle]
pub unsafe extern "C" fn speckv_calibrate_each(
    odds_scales: *mut f32,
    hazards: *const f32,
    gammas: *const i32,
    accepted: *const i32,
    batch: u32,
) -> SpeckvStatus {
    guard(|| {
        non_null(odds_scales, "odds_scales")?;
        aligned(odds_scales, "odds_scales")?;
        // SAFETY: the buffers' lengths are this call's contract.
        let steps = unsafe { verified(hazards, gammas, accepted, batch) }?;
        // SAFETY: non-null, aligned, `batch` readable and writable values (contract), used only
        // during this call.
        let scales = unsafe { std::slice::from_raw_parts_mut(odds_scales, batch as usize) };
        let mut after = Vec::with_capacity(scales.len());
        for (b, (&k, (kept, acc))) in scales.iter().zip(steps).enumerate() {
            let k = check_scale(k, &format!("odds_scales[{b}]"))?;
            let mut cal = Calibration::at(CALIBRATION_RATE, k);
            cal.observe(&kept, acc);
            after.push(cal.odds_scale());
        }
        scales.copy_from_slice(&after);
        Ok(())
    })
}

fn check_scale(k: f32, what: &str) -> Result<f32, (SpeckvStatus, String)> {
    if !(k.is_finite() && k > 0.0) {
        return fail(
            SpeckvStatus::InvalidArgument,
            format!("{what} must be finite and > 0, got {k}"),
        );
    }
    Ok(k)
}

/// One sequence's verified drafts: the hazards its kept drafts were decided with, and how many the
/// target accepted.
type Verified = (Vec<f64>, usize);

/// A verified step's drafts, per sequence (host memory, checked).
///
/// # Safety
/// Each pointer is null (refused) or readable for `batch` values (`hazards`: `batch ×
/// SPECKV_STOP_TIMES`) for the duration of the call.
unsafe fn verified(
    hazards: *const f32,
    gammas: *const i32,
    accepted: *const i32,
    batch: u32,
) -> Result<Vec<Verified>, (SpeckvStatus, String)> {
    for (p, what) in [
        (hazards as *const c_void, "hazards"),
        (gammas as *const c_void, "gammas"),
        (accepted as *const c_void, "accepted"),
    ] {
        non_null(p, what)?;
        aligned_to(p, 4, what)?;
    }
    let n = batch as usize;
    // SAFETY: non-null and aligned (checked above), readable for these lengths (the caller's
    // contract).
    let (h, g, a) = unsafe {
        (
            std::slice::from_raw_parts(hazards, n * SPECKV_STOP_TIMES),
            std::slice::from_raw_parts(gammas, n),
            std::slice::from_raw_parts(accepted, n),
        )
    };
    let mut out = Vec::with_capacity(n);
    for (b, (&gamma, &acc)) in g.iter().zip(a).enumerate() {
        if !(0..=SPECKV_STOP_MAX_GAMMA as i32).contains(&gamma) || !(0..=gamma).contains(&acc) {
            return fail(
                SpeckvStatus::InvalidArgument,
                format!(
                    "sequence {b}: gamma {gamma} must be 0..={SPECKV_STOP_MAX_GAMMA} and \
                     accepted {acc} 0..=gamma"
                ),
            );
        }
        let row = &h[b * SPECKV_STOP_TIMES..b * SPECKV_STOP_TIMES + gamma as usize];
        out.push((row.iter().map(|&x| x as f64).collect(), acc as usize));
    }
    Ok(out)
}

//! Per-token stopping, the decision `softmax_stats_v2` fuses into its epilogue with `STATS_STOP`:
//! after each drafted token, draft on or stop, from what is known at that moment. The host's
//! `controller::hazard::StopRule` runs these same functions, so the CPU and the GPU make the same
//! decisions on the same inputs, bit for bit.
//!
//! The hazard model (the 16-unit MLP's shape, [`MlpWeights`]) predicts
//! h_j = P(draft j is accepted | drafts 0..j−1 were) from six inputs: this draft's entropy and
//! confidence, the step's mean entropy and minimum confidence over drafts 0..=j (the sequence's
//! [`FeatureAccum`] just after this row), the compression code and j. With A_j = h_0 ⋯ h_j, a step
//! that verifies γ drafts emits 1 + A_0 + … + A_{γ−1} tokens on average. Its cost is its draft
//! passes plus the verification of γ drafts ([`StepCosts`], measured while decoding by the host).
//! Once draft j is computed its pass is spent, so [`decide`] chooses between discarding it,
//! keeping it and stopping, and drafting on, by expected tokens per unit cost.
//!
//! How a draft loop on the device learns it may end: each sequence's [`StopState`] records
//! `stopped`, its γ_b is written to `gammas_out` after every decision (where `verify` reads it),
//! and every sequence that stops adds one to `stopped_count` once per step. A loop that enqueues
//! its γmax draft passes ahead (or replays them as a CUDA graph) lets the passes of stopped
//! sequences fall through: their rows' statistics are still written, but neither their
//! accumulator nor their state changes. The host reads nothing per token; it reads
//! `stopped_count` (host-mapped or copied with the step's results) to learn, per step, how many
//! sequences ended early.

use core::ptr::{addr_of, addr_of_mut};

use crate::gamma_mlp::{predict, DeviceMlp, MlpSource};
use crate::gpu;
use crate::params::{
    FeatureAccum, LockstepScratch, MlpWeights, SoftmaxStatsV2Params, StepCosts, StopParams,
    StopState, STOP_TIMES,
};

/// The hazard a non-finite feature or prediction gets: fail closed, stop.
pub const HAZARD_FLOOR: f32 = 0.001;
/// The largest hazard used (a prediction of certainty would never stop).
pub const HAZARD_CEIL: f32 = 0.999;

/// What the rule saw and decided for one draft.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StopDecision {
    /// The hazard model's inputs.
    pub features: [f32; 6],
    pub hazard: f32,
    /// Keep this draft (verify it).
    pub keep: bool,
    /// Draft the next token (implies `keep`).
    pub more: bool,
}

/// The hazard model's inputs for the draft at position `position` whose row is the last one
/// pushed into `accum`.
#[inline(always)]
pub fn features(
    entropy: f32,
    confidence: f32,
    accum: &FeatureAccum,
    code: f32,
    position: u32,
) -> [f32; 6] {
    // An empty or flagged accumulator gives a NaN mean: the hazard fails closed.
    let mean = if accum.count == 0 || accum.flags != 0 {
        f32::NAN
    } else {
        accum.entropy_sum / accum.count as f32
    };
    [
        entropy,
        confidence,
        mean,
        accum.confidence_min,
        code,
        position as f32,
    ]
}

/// h = P(accept | prefix accepted), within [`HAZARD_FLOOR`, `HAZARD_CEIL`], with the model's odds
/// multiplied by `odds_scale` (online calibration; 1 leaves the model as trained);
/// [`HAZARD_FLOOR`] when a feature, a weight, the scale or the prediction is not finite.
#[inline(always)]
pub fn hazard<W: MlpSource>(w: W, x: &[f32; 6], odds_scale: f32) -> f32 {
    let h = predict(w, x);
    if h.is_nan() {
        return HAZARD_FLOOR;
    }
    let h = h.clamp(HAZARD_FLOOR, HAZARD_CEIL);
    // h' = k·h / (1 − h + k·h): odds k·h / (1 − h). No exp, so the CPU and the GPU agree exactly.
    let kh = odds_scale * h;
    let c = kh / (1.0 - h + kh);
    if c.is_nan() {
        HAZARD_FLOOR
    } else {
        c.clamp(HAZARD_FLOOR, HAZARD_CEIL)
    }
}

/// The decision for draft j (the state's `kept`), just computed — its `entropy` and `confidence`
/// already pushed into `accum` — under one draft pass costing `draft` and the verification of γ
/// drafts costing `verify(γ)`. The j + 1 draft passes made so far are spent whatever happens, so the
/// rule compares
/// - discarding draft j: γ = j, (j + 1)·draft + verify(j);
/// - keeping it and drafting no more: γ = j + 1, (j + 1)·draft + verify(j + 1);
/// - drafting on to some γ in j + 2..=γmax: γ·draft + verify(γ), the hazards after j taken equal to
///   h_j,
///
/// by expected tokens per unit cost (1 + A_0 + … + A_{γ−1}, A_i = h_0 ⋯ h_i), and updates `s`: a
/// kept draft is counted; the sequence stops unless drafting on wins and room is left.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decide<W: MlpSource, V: Fn(u32) -> f32>(
    w: W,
    s: &mut StopState,
    accum: &FeatureAccum,
    entropy: f32,
    confidence: f32,
    code: f32,
    odds_scale: f32,
    gamma_max: u32,
    draft: f32,
    verify: V,
) -> StopDecision {
    let j = s.kept;
    let x = features(entropy, confidence, accum, code, j);
    let h = hazard(w, &x, odds_scale);
    let mut a = s.survive * h;
    let (keep, more) = compare(
        j,
        gamma_max,
        draft,
        verify,
        s.expected,
        s.expected + a,
        || {
            a *= h;
            a
        },
    );
    if keep {
        s.survive *= h;
        s.expected += s.survive;
        s.kept += 1;
    }
    if !more || s.kept >= gamma_max {
        s.stopped = 1;
    }
    StopDecision {
        features: x,
        hazard: h,
        keep,
        more: more && s.kept < gamma_max,
    }
}

/// The comparison of [`decide`] after draft j (its three choices, by expected tokens per unit
/// cost), shared with the host's rule for a batch (`controller::batch_auto`): `expected` is the
/// step's expected tokens without draft j, `tokens` with it, and each call of `gain` gives the
/// tokens one more draft adds (the sequence's A, or a batch's sum of them). Returns (keep draft
/// j, draft on).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn compare<V: Fn(u32) -> f32, G: FnMut() -> f32>(
    j: u32,
    gamma_max: u32,
    draft: f32,
    verify: V,
    expected: f32,
    mut tokens: f32,
    mut gain: G,
) -> (bool, bool) {
    let spent = (j + 1) as f32 * draft;
    let discard = expected / (spent + verify(j));
    let stop_after = tokens / (spent + verify(j + 1));
    let stop_best = if stop_after > discard {
        stop_after
    } else {
        discard
    };
    let mut more = false;
    let mut g = j + 2;
    while g <= gamma_max {
        tokens += gain();
        // A NaN or infinite cost compares false: no more drafts.
        if tokens / (g as f32 * draft + verify(g)) > stop_best {
            more = true;
            break;
        }
        g += 1;
    }
    // Drafting on keeps this draft; stopping keeps it when that beats discarding it. A NaN rate
    // (non-finite cost) discards: fail closed.
    (j < gamma_max && (more || stop_after > discard), more)
}

/// The decision after draft pass j of `n` sequences drafting in lockstep — one batched draft pass
/// drafts for all of them, one batched verification checks the longest γ — for the batch: discard
/// draft j everywhere, keep it and stop, or draft on. While the batch drafts on, a sequence's extra
/// draft costs nothing, so this is [`decide`]'s [`compare`] with the expected tokens summed over
/// the sequences, each with its own hazard, and the costs those of batched passes. `state(i)` and
/// `hazard(i)` give sequence i's; they are read again for each candidate γ rather than held in an
/// array (a GPU thread would index one from local memory). Sums run in f32 from 0 in sequence
/// order and a sequence's A after k more drafts is multiplied up from `survive · h` one factor at a
/// time, so one sequence gets [`decide`]'s comparison exactly. Returns (keep draft j, draft on);
/// apply it to every sequence with [`apply_lockstep`].
#[inline(always)]
pub fn compare_lockstep<S: Fn(u32) -> StopState, H: Fn(u32) -> f32, V: Fn(u32) -> f32>(
    n: u32,
    state: S,
    hazard: H,
    j: u32,
    gamma_max: u32,
    draft: f32,
    verify: V,
) -> (bool, bool) {
    let (mut expected, mut tokens) = (0f32, 0f32);
    for i in 0..n {
        let s = state(i);
        expected += s.expected;
        tokens += s.expected + s.survive * hazard(i);
    }
    let mut further = 0u32;
    compare(j, gamma_max, draft, verify, expected, tokens, || {
        further += 1;
        let mut sum = 0f32;
        for i in 0..n {
            let h = hazard(i);
            let mut a = state(i).survive * h;
            for _ in 0..further {
                a *= h;
            }
            sum += a;
        }
        sum
    })
}

/// A sequence's state after its batch's lockstep decision at draft j ([`compare_lockstep`]): the
/// draft counted when kept (with the sequence's own hazard `h`), stopped unless the batch drafts
/// on with room left.
#[inline(always)]
pub fn apply_lockstep(s: &mut StopState, h: f32, j: u32, gamma_max: u32, keep: bool, more: bool) {
    if keep {
        s.survive *= h;
        s.expected += s.survive;
    }
    s.kept = j + keep as u32;
    if !more || s.kept >= gamma_max {
        s.stopped = 1;
    }
}

/// The epilogue of `softmax_stats_v2` with `STATS_STOP` for `row` (its sequence), after the row's
/// statistics (`entropy`, `confidence`, `row_flags`) are known: updates the accumulator and the
/// stop state, writes γ_b (and the hazard of a kept draft when `hazards_out` is set). A stopped
/// sequence's accumulator and state are left as they are.
///
/// The parameters are read field by field from device memory, and the step times by index through
/// a pointer: a copy of the struct would be indexed dynamically and live in local memory.
///
/// # Safety
/// `p.accum` points to `rows` accumulators; `sp` to the launch's `StopParams`, which no thread
/// writes, with `rows`-long `state` and `gammas_out`, `hazards_out` null or `rows × STOP_TIMES`
/// long, `odds_scales` null or `rows` long, and `weights` one `MlpWeights` no thread writes.
#[inline(always)]
pub unsafe fn epilogue(
    p: &SoftmaxStatsV2Params,
    sp: *const StopParams,
    row: u32,
    entropy: f32,
    confidence: f32,
    row_flags: u32,
    reset: bool,
) {
    let lockstep = gpu::ld_nc(addr_of!((*sp).lockstep), 0);
    if !lockstep.is_null() {
        return epilogue_lockstep(p, sp, lockstep, row, entropy, confidence, row_flags, reset);
    }
    let r = row as usize;
    let state = gpu::ld_nc(addr_of!((*sp).state), 0);
    let mut s = if reset {
        StopState::START
    } else {
        gpu::ld(state, r)
    };
    if s.stopped != 0 {
        return;
    }
    let a = accumulate_row(p.accum, r, reset, entropy, confidence, row_flags);
    let gmax = gamma_max_of(sp);
    let verify = addr_of!((*sp).costs.verify) as *const f32;
    let j = s.kept;
    let d = decide(
        DeviceMlp(gpu::ld_nc(addr_of!((*sp).weights), 0)),
        &mut s,
        &a,
        entropy,
        confidence,
        gpu::ld_nc(addr_of!((*sp).compression_code), 0),
        odds_scale_of(sp, r),
        gmax,
        gpu::ld_nc(addr_of!((*sp).costs.draft), 0),
        // γ ≤ gmax < STOP_TIMES: inside the table.
        |g| gpu::ld_nc(verify, g as usize),
    );
    let hazards = gpu::ld_nc(addr_of!((*sp).hazards_out), 0);
    if d.keep && !hazards.is_null() {
        // j < γmax < STOP_TIMES when a draft is kept: inside the row's slots.
        gpu::st(hazards, r * STOP_TIMES + j as usize, d.hazard);
    }
    gpu::st(state, r, s);
    gpu::st(gpu::ld_nc(addr_of!((*sp).gammas_out), 0), r, s.kept as i32);
    let count = gpu::ld_nc(addr_of!((*sp).stopped_count), 0);
    if s.stopped != 0 && !count.is_null() {
        gpu::atomic_add_u32(count, 1);
    }
}

/// Row `r`'s accumulator after this row's statistics (started afresh when `reset`), stored and
/// returned.
///
/// # Safety
/// `accum` points to at least `r + 1` accumulators that no other thread touches at `r`.
#[inline(always)]
pub unsafe fn accumulate_row(
    accum: *mut FeatureAccum,
    r: usize,
    reset: bool,
    entropy: f32,
    confidence: f32,
    row_flags: u32,
) -> FeatureAccum {
    let mut a = if reset {
        FeatureAccum::EMPTY
    } else {
        gpu::ld(accum, r)
    };
    a.push(entropy, confidence, row_flags);
    gpu::st(accum, r, a);
    a
}

/// The launch's γmax, at most `STOP_TIMES − 1` (the last entry of the cost table).
///
/// # Safety
/// `sp` points to a `StopParams` no thread writes.
#[inline(always)]
unsafe fn gamma_max_of(sp: *const StopParams) -> u32 {
    let gamma_max = gpu::ld_nc(addr_of!((*sp).gamma_max), 0);
    if gamma_max < STOP_TIMES as u32 {
        gamma_max
    } else {
        STOP_TIMES as u32 - 1
    }
}

/// Row `r`'s odds scale: its own when the launch has per-sequence scales, else the launch's.
///
/// # Safety
/// `sp` points to a `StopParams` no thread writes, whose `odds_scales` is null or `rows` long
/// with `r < rows`.
#[inline(always)]
unsafe fn odds_scale_of(sp: *const StopParams, r: usize) -> f32 {
    let scales = gpu::ld_nc(addr_of!((*sp).odds_scales), 0);
    if scales.is_null() {
        gpu::ld_nc(addr_of!((*sp).odds_scale), 0)
    } else {
        gpu::ld_nc(scales, r)
    }
}

/// [`epilogue`] for sequences in lockstep (`StopParams::lockstep` set): the row's accumulator is
/// updated and its hazard published in the scratch; the last row to arrive decides for the launch
/// ([`compare_lockstep`] over every row in row order), writes every row's state, γ_b and (for a
/// kept draft) hazard, counts the stopped sequences, and zeroes the arrival count for the next
/// launch. A launch whose sequences have stopped (the batch stopped at an earlier draft) only
/// writes statistics: no accumulator, state or γ_b changes.
///
/// # Safety
/// As [`epilogue`], and `scratch` is one [`LockstepScratch`] whose count is zero at the launch, not
/// shared with a concurrent launch; `p.rows ≤ LOCKSTEP_MAX_ROWS`; the states are all stopped or
/// none, and all at the same draft (as this epilogue leaves them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue_lockstep(
    p: &SoftmaxStatsV2Params,
    sp: *const StopParams,
    scratch: *mut LockstepScratch,
    row: u32,
    entropy: f32,
    confidence: f32,
    row_flags: u32,
    reset: bool,
) {
    let state = gpu::ld_nc(addr_of!((*sp).state), 0);
    // No row's state is written before the last arrival, so every row may read any row's.
    let before = |i: u32| {
        if reset {
            StopState::START
        } else {
            gpu::ld(state, i as usize)
        }
    };
    let s = before(row);
    let hazards = addr_of_mut!((*scratch).hazards) as *mut f32;
    let mut h = f32::NAN;
    if s.stopped == 0 {
        let a = accumulate_row(p.accum, row as usize, reset, entropy, confidence, row_flags);
        let x = features(
            entropy,
            confidence,
            &a,
            gpu::ld_nc(addr_of!((*sp).compression_code), 0),
            s.kept,
        );
        h = hazard(
            DeviceMlp(gpu::ld_nc(addr_of!((*sp).weights), 0)),
            &x,
            odds_scale_of(sp, row as usize),
        );
    }
    // Publish, then arrive: the last row sees every hazard (the fences order the stores before
    // the count, and the count before its loads).
    gpu::st(hazards, row as usize, h);
    gpu::threadfence();
    let arrived = addr_of_mut!((*scratch).arrived);
    if gpu::atomic_add_u32(arrived, 1) + 1 != p.rows {
        return;
    }
    gpu::st(arrived, 0, 0u32); // every row has arrived: zero for the next launch (stream order)
    gpu::threadfence();
    let n = p.rows;
    for i in 0..n {
        if before(i).stopped != 0 {
            return; // the batch stopped at an earlier draft
        }
    }
    let gmax = gamma_max_of(sp);
    let verify = addr_of!((*sp).costs.verify) as *const f32;
    let j = before(0).kept;
    let (keep, more) = compare_lockstep(
        n,
        before,
        |i| gpu::ld(hazards, i as usize),
        j,
        gmax,
        gpu::ld_nc(addr_of!((*sp).costs.draft), 0),
        // γ ≤ gmax < STOP_TIMES: inside the table.
        |g| gpu::ld_nc(verify, g as usize),
    );
    let hazards_out = gpu::ld_nc(addr_of!((*sp).hazards_out), 0);
    let gammas_out = gpu::ld_nc(addr_of!((*sp).gammas_out), 0);
    let mut stopped = 0;
    for i in 0..n {
        let mut si = before(i);
        let hi = gpu::ld(hazards, i as usize);
        apply_lockstep(&mut si, hi, j, gmax, keep, more);
        if keep && !hazards_out.is_null() {
            // j < γmax < STOP_TIMES when a draft is kept: inside the row's slots.
            gpu::st(hazards_out, i as usize * STOP_TIMES + j as usize, hi);
        }
        gpu::st(state, i as usize, si);
        gpu::st(gammas_out, i as usize, si.kept as i32);
        stopped += si.stopped;
    }
    let count = gpu::ld_nc(addr_of!((*sp).stopped_count), 0);
    if stopped != 0 && !count.is_null() {
        gpu::atomic_add_u32(count, stopped);
    }
}

/// The same decision on the host, with the weights in host memory: what
/// `controller::hazard::StopRule` runs.
#[cfg(not(target_arch = "nvptx64"))]
#[allow(clippy::too_many_arguments)]
pub fn decide_host(
    w: &MlpWeights,
    s: &mut StopState,
    accum: &FeatureAccum,
    entropy: f32,
    confidence: f32,
    code: f32,
    odds_scale: f32,
    gamma_max: u32,
    costs: &StepCosts,
) -> StopDecision {
    let gmax = gamma_max.min(STOP_TIMES as u32 - 1);
    decide(
        w,
        s,
        accum,
        entropy,
        confidence,
        code,
        odds_scale,
        gmax,
        costs.draft,
        |g| costs.verify.get(g as usize).copied().unwrap_or(f32::NAN),
    )
}

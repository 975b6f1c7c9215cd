//! The step costs `generate --policy auto` weighs, kept while an engine decodes: moving averages of
//! the draft's time per pass and of the verification time at each γ, on a prior cost model whose
//! shape fills in the γ not measured yet (`controller::hazard::OnlineCost`). For a batch drafting
//! and verifying in lockstep the prior is scaled to the batch's rows and the verification costs are
//! read off the line through those measured, as `generate`'s batched rule does
//! (`controller::batch_auto`). The engine times its own passes and feeds them in after each step;
//! `speckv_online_cost_step_costs` gives the next step's `SpeckvStopArgs.costs`.

use std::ffi::c_char;
use std::path::Path;

use speckv::controller::batch_auto::{batch_online_cost, batch_step_costs, MAX_SEQS};
use speckv::controller::hazard::OnlineCost;
use speckv::controller::CostModel;

use super::stop::{c_path, check_gamma_max, SpeckvStepCosts, SPECKV_STOP_MAX_GAMMA};
use super::{aligned, fail, file_status, guard, non_null, SpeckvStatus};

/// The most sequences one online cost model covers (a batched step holds 16 rows).
pub const SPECKV_ONLINE_COST_MAX_SEQS: usize = 16;

const _: () = assert!(SPECKV_ONLINE_COST_MAX_SEQS == MAX_SEQS);

/// Step costs measured while decoding (opaque): create, observe each step, read the rule's costs.
pub struct SpeckvOnlineCost {
    cost: OnlineCost,
    /// Sequences a step.
    seqs: usize,
}

/// Creates an online cost model in `*out` for `seqs` sequences a step (1..=16) from a prior:
/// `cost_json` (`speckv profile`'s `steps.cost.json`, one sequence's costs) or null for the
/// assumed one (a draft pass 1/3 of a target pass, verification 2 % dearer a drafted position).
/// Several sequences: the prior is scaled to the batch's rows (a verification of γ drafts each is
/// `seqs · (γ + 1)` rows). Moving averages weigh a new measurement 0.2.
#[no_mangle]
pub unsafe extern "C" fn speckv_online_cost_create(
    cost_json: *const c_char,
    seqs: u32,
    out: *mut *mut SpeckvOnlineCost,
) -> SpeckvStatus {
    guard(|| {
        non_null(out, "out")?;
        if seqs == 0 || seqs as usize > SPECKV_ONLINE_COST_MAX_SEQS {
            return fail(
                SpeckvStatus::InvalidArgument,
                format!("seqs must be 1..={SPECKV_ONLINE_COST_MAX_SEQS}, got {seqs}"),
            );
        }
        let prior = match c_path(cost_json) {
            Some(p) => file_status(CostModel::load(Path::new(&p)))?,
            None => CostModel::assumed(),
        };
        let c = Box::new(SpeckvOnlineCost {
            cost: batch_online_cost(&prior, seqs as usize),
            seqs: seqs as usize,
        });
        // SAFETY: `out` is non-null and writable (contract).
        unsafe { *out = Box::into_raw(c) };
        Ok(())
    })
}

/// Frees an online cost model (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn speckv_online_cost_destroy(cost: *mut SpeckvOnlineCost) {
    if !cost.is_null() {
        // SAFETY: created by `Box::into_raw` in `speckv_online_cost_create`, destroyed once
        // (contract).
        drop(unsafe { Box::from_raw(cost) });
    }
}

/// One step's measurement, after its verification: `draft_passes` draft passes (0 for a plain
/// step) took `draft_seconds` together, and the verification of `gamma` drafts per sequence (the
/// step's longest γ; 0 for a plain step) took `verify_seconds`. Times in seconds, finite and ≥ 0;
/// a time of 0 is not a measurement and leaves its average as it was.
#[no_mangle]
pub unsafe extern "C" fn speckv_online_cost_observe(
    cost: *mut SpeckvOnlineCost,
    draft_passes: u32,
    draft_seconds: f64,
    gamma: u32,
    verify_seconds: f64,
) -> SpeckvStatus {
    guard(|| {
        non_null(cost, "cost")?;
        if gamma > SPECKV_STOP_MAX_GAMMA {
            return fail(
                SpeckvStatus::InvalidArgument,
                format!("gamma must be 0..={SPECKV_STOP_MAX_GAMMA}, got {gamma}"),
            );
        }
        for (t, what) in [
            (draft_seconds, "draft_seconds"),
            (verify_seconds, "verify_seconds"),
        ] {
            if !(t.is_finite() && t >= 0.0) {
                return fail(
                    SpeckvStatus::InvalidArgument,
                    format!("{what} must be finite and ≥ 0, got {t}"),
                );
            }
        }
        if draft_passes == 0 && draft_seconds > 0.0 {
            return fail(
                SpeckvStatus::InvalidArgument,
                format!("draft_seconds {draft_seconds} with no draft pass"),
            );
        }
        // SAFETY: a live model from `speckv_online_cost_create`, used by this call only (contract).
        let c = unsafe { &mut *cost };
        c.cost.observe(
            draft_passes as usize,
            draft_seconds,
            gamma as usize,
            verify_seconds,
        );
        Ok(())
    })
}

/// The costs the stopping rule weighs next step, for γmax `gamma_max` (1..=15), into `*out`
/// (`SpeckvStopArgs.costs`): the draft pass and the verification at γ = 0..=γmax as measured,
/// the γ not measured yet filled in from the prior's shape (several sequences: on the line through
/// the measured γ once two are), +inf beyond γmax.
#[no_mangle]
pub unsafe extern "C" fn speckv_online_cost_step_costs(
    cost: *const SpeckvOnlineCost,
    gamma_max: u32,
    out: *mut SpeckvStepCosts,
) -> SpeckvStatus {
    guard(|| {
        non_null(cost, "cost")?;
        non_null(out, "out")?;
        aligned(out, "out")?;
        check_gamma_max(gamma_max)?;
        // SAFETY: a live model from `speckv_online_cost_create` (contract).
        let c = unsafe { &*cost };
        let costs = batch_step_costs(&c.cost, c.seqs, gamma_max as usize);
        // SAFETY: non-null, aligned, writable (contract).
        unsafe { *out = costs };
        Ok(())
    })
}

//! The online step costs through the C ABI (`speckv_online_cost_*`): the costs `generate`'s `auto`
//! weighs after the same measurements — `BatchAuto`'s, for one sequence and for a batch — bit for
//! bit; plain steps first keep the draft's cost in the measured units; and misuse is refused.

use std::ffi::CString;
use std::ptr::{null, null_mut};

use speckv::controller::batch_auto::BatchAuto;
use speckv::controller::hazard::{DraftTime, HazardModel};
use speckv::controller::CostModel;
use speckv_c::*;
use speckv_kernels::params::StepCosts;

mod common;
use common::last_error;

fn create(cost_json: Option<&CString>, seqs: u32) -> *mut SpeckvOnlineCost {
    let mut c = null_mut();
    // SAFETY: a NUL-terminated path or null, and a valid out-pointer.
    let s = unsafe {
        speckv_online_cost_create(cost_json.map_or(null(), |p| p.as_ptr()), seqs, &mut c)
    };
    assert_eq!(s, SpeckvStatus::Ok, "{}", last_error());
    c
}

fn step_costs(c: *const SpeckvOnlineCost, gamma_max: u32) -> StepCosts {
    let mut out = StepCosts {
        draft: 0.0,
        verify: [0.0; SPECKV_STOP_TIMES],
    };
    // SAFETY: a live model and a valid out-pointer.
    let s = unsafe { speckv_online_cost_step_costs(c, gamma_max, &mut out) };
    assert_eq!(s, SpeckvStatus::Ok, "{}", last_error());
    out
}

fn bits(c: &StepCosts) -> Vec<u32> {
    std::iter::once(c.draft.to_bits())
        .chain(c.verify.iter().map(|v| v.to_bits()))
        .collect()
}

/// A run's measurements: (draft passes, their seconds, the verified γ, its seconds); a plain step
/// first, then speculative steps at several γ, one γ seen twice.
const STEPS: [(u32, f64, u32, f64); 5] = [
    (0, 0.0, 0, 0.061),
    (3, 0.024, 3, 0.072),
    (2, 0.015, 1, 0.066),
    (5, 0.041, 5, 0.080),
    (3, 0.022, 3, 0.070),
];

#[test]
fn the_c_abi_weighs_the_costs_generate_weighs() {
    let p = std::env::temp_dir().join(format!("speckv-capi-{}-oc.json", std::process::id()));
    std::fs::write(
        &p,
        r#"{"draft_ms_per_token": 9.0, "verify_ms": [30.0, 31.0, 32.5, 33.0, 35.0, 36.0, 38.0, 39.0, 41.0, 42.0, 44.0, 45.0, 47.0, 48.0, 50.0, 52.0], "source": "test"}"#,
    )
    .unwrap();
    let path = CString::new(p.to_str().unwrap()).unwrap();
    let model = HazardModel::default_model().unwrap();
    for (file, prior) in [
        (None, CostModel::assumed()),
        (Some(&path), CostModel::load(&p).unwrap()),
    ] {
        for seqs in [1u32, 4] {
            let c = create(file, seqs);
            let mut auto = BatchAuto::new(&model, &prior, seqs as usize).unwrap();
            let at =
                |i: usize| format!("{} prior, {seqs} sequences, after {i} steps", prior.source);
            for gmax in [1, 6, 15] {
                let want = if seqs > 1 {
                    auto.cost.step_costs_linear(gmax as usize)
                } else {
                    auto.cost.step_costs(gmax as usize)
                };
                assert_eq!(bits(&step_costs(c, gmax)), bits(&want), "{}", at(0));
            }
            for (i, &(passes, draft_s, gamma, verify_s)) in STEPS.iter().enumerate() {
                // SAFETY: a live model.
                let s = unsafe { speckv_online_cost_observe(c, passes, draft_s, gamma, verify_s) };
                assert_eq!(s, SpeckvStatus::Ok, "{}", last_error());
                let draft = DraftTime::steady(passes as usize, draft_s);
                auto.end_step(&draft, gamma as usize, verify_s, std::iter::empty());
                for gmax in [1, 6, 15] {
                    let want = if seqs > 1 {
                        auto.cost.step_costs_linear(gmax as usize)
                    } else {
                        auto.cost.step_costs(gmax as usize)
                    };
                    let got = step_costs(c, gmax);
                    assert_eq!(bits(&got), bits(&want), "{}, γmax {gmax}", at(i + 1));
                    assert!(got.verify[gmax as usize + 1..]
                        .iter()
                        .all(|v| v.is_infinite()));
                }
            }
            // SAFETY: created above, destroyed once.
            unsafe { speckv_online_cost_destroy(c) };
        }
    }
}

/// A plain step first: the draft's prior time is scaled as the prior's one-pass verification
/// compares with the measured one — the assumed prior's 1/3 of a target pass becomes a third of
/// the 0.06 s measured — not left in the prior's units beside measured seconds.
#[test]
fn a_plain_step_first_keeps_the_costs_in_one_unit() {
    let c = create(None, 1);
    // SAFETY: a live model.
    let s = unsafe { speckv_online_cost_observe(c, 0, 0.0, 0, 0.06) };
    assert_eq!(s, SpeckvStatus::Ok, "{}", last_error());
    let t = step_costs(c, 4);
    assert!((t.draft - 0.02).abs() < 1e-7, "{t:?}");
    assert_eq!(t.verify[0], 0.06);
    // The assumed shape: 2 % dearer a drafted position.
    assert!((t.verify[4] - 0.06 * 1.08).abs() < 1e-7, "{t:?}");
    // SAFETY: created above, destroyed once.
    unsafe { speckv_online_cost_destroy(c) };
}

#[test]
fn online_cost_misuse_is_reported() {
    let c = create(None, 2);
    // SAFETY (every call): a live model, valid out-pointers, or deliberately bad values.
    unsafe {
        let mut out = null_mut();
        for (seqs, want) in [(0u32, "seqs"), (17, "seqs")] {
            assert_eq!(
                speckv_online_cost_create(null(), seqs, &mut out),
                SpeckvStatus::InvalidArgument
            );
            assert!(last_error().contains(want), "{}", last_error());
        }
        assert!(out.is_null(), "nothing created on an error");
        assert_eq!(
            speckv_online_cost_create(null(), 1, null_mut()),
            SpeckvStatus::NullPointer
        );
        let missing = CString::new("/nonexistent/cost.json").unwrap();
        assert_eq!(
            speckv_online_cost_create(missing.as_ptr(), 1, &mut out),
            SpeckvStatus::Io
        );
        for (passes, d, g, v, want) in [
            (1, f64::NAN, 1, 0.1, "draft_seconds"),
            (1, 0.01, 1, -0.1, "verify_seconds"),
            (1, 0.01, 1, f64::INFINITY, "verify_seconds"),
            (1, 0.01, 16, 0.1, "gamma"),
            (0, 0.01, 0, 0.1, "no draft pass"),
        ] {
            assert_eq!(
                speckv_online_cost_observe(c, passes, d, g, v),
                SpeckvStatus::InvalidArgument
            );
            assert!(last_error().contains(want), "{want}: {}", last_error());
        }
        // A refused measurement changed nothing.
        let fresh = create(None, 2);
        assert_eq!(bits(&step_costs(c, 8)), bits(&step_costs(fresh, 8)));
        speckv_online_cost_destroy(fresh);
        assert_eq!(
            speckv_online_cost_observe(null_mut(), 1, 0.01, 1, 0.1),
            SpeckvStatus::NullPointer
        );
        let mut t = std::mem::zeroed::<StepCosts>();
        for g in [0, 16] {
            assert_eq!(
                speckv_online_cost_step_costs(c, g, &mut t),
                SpeckvStatus::InvalidArgument
            );
            assert!(last_error().contains("gamma_max"), "{}", last_error());
        }
        assert_eq!(
            speckv_online_cost_step_costs(c, 4, null_mut()),
            SpeckvStatus::NullPointer
        );
        assert_eq!(
            speckv_online_cost_step_costs(null(), 4, &mut t),
            SpeckvStatus::NullPointer
        );
        speckv_online_cost_destroy(c);
        speckv_online_cost_destroy(null_mut());
    }
}

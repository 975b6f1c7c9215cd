//! Misuse of the C ABI returns a status and a message, never a crash.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

use speckv_c::*;
use speckv_kernels::params::{FeatureAccum, RowStats};

mod common;
use common::{cpu, last_error};

fn stats_args(logits: &[f32], out: &mut [RowStats], rows: u32, vocab: u32) -> SpeckvStatsArgs {
    SpeckvStatsArgs {
        logits: logits.as_ptr() as *const c_void,
        dtype: SPECKV_DTYPE_F32,
        rows,
        vocab,
        row_stride: vocab,
        temperature: 1.0,
        sample: 0,
        seed: 0,
        step: 0,
        accumulate: SPECKV_ACCUMULATE_NO,
        accum: null_mut(),
        out: out.as_mut_ptr(),
    }
}

#[test]
fn stats_misuse_is_reported() {
    let ctx = cpu();
    let logits = vec![0.5f32; 2 * 8];
    let mut out = vec![RowStats::default(); 2];
    let good = stats_args(&logits, &mut out, 2, 8);
    // SAFETY (every call below): buffers of the stated shapes or deliberately null/bad values.
    unsafe {
        assert_eq!(speckv_softmax_stats(ctx, &good), SpeckvStatus::Ok);
        assert!((out[0].entropy - (8f32).ln()).abs() < 1e-5);
        assert_eq!(last_error(), "");

        assert_eq!(
            speckv_softmax_stats(null(), &good),
            SpeckvStatus::NullPointer
        );
        assert!(last_error().contains("context"), "{}", last_error());
        assert_eq!(speckv_softmax_stats(ctx, null()), SpeckvStatus::NullPointer);

        let mut a = good;
        a.logits = null();
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::NullPointer);
        assert!(last_error().contains("logits"));

        let mut a = good;
        a.dtype = 9;
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::BadDtype);
        assert!(last_error().contains("dtype 9"));

        let mut a = good;
        a.row_stride = 4; // smaller than vocab
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::BadShape);

        let mut a = good;
        a.rows = 0;
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::BadShape);

        let mut a = good;
        a.temperature = f32::NAN;
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::InvalidArgument);

        let mut a = good;
        a.accumulate = 7;
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::InvalidArgument);

        let mut a = good;
        a.accumulate = SPECKV_ACCUMULATE_RESET; // accum is null
        assert_eq!(speckv_softmax_stats(ctx, &a), SpeckvStatus::NullPointer);
        assert!(last_error().contains("accum"));

        speckv_context_destroy(ctx);
        speckv_context_destroy(null_mut()); // ignored
    }
}

#[test]
fn stream_controller_and_verify_misuse_is_reported() {
    let ctx = cpu();
    // SAFETY (every call below): valid buffers or deliberately bad values.
    unsafe {
        // A CPU context has no stream.
        let fake = 0x1000usize as *mut c_void;
        assert_eq!(
            speckv_context_set_stream(ctx, fake),
            SpeckvStatus::WrongStream
        );
        assert_eq!(speckv_context_set_stream(ctx, null_mut()), SpeckvStatus::Ok);
        let mut dev = 9;
        assert_eq!(speckv_context_device(ctx, &mut dev), SpeckvStatus::Ok);
        assert_eq!(dev, SPECKV_DEVICE_CPU);

        // Decision before a controller is loaded.
        let accum = [FeatureAccum::EMPTY; 2];
        let mut g = [0i32; 2];
        assert_eq!(
            speckv_decide_gamma(
                ctx,
                accum.as_ptr(),
                2,
                0.0,
                4,
                g.as_mut_ptr(),
                null_mut(),
                null_mut()
            ),
            SpeckvStatus::NoController
        );
        // Loading: a missing file, bad candidates.
        let missing = CString::new("/nonexistent/controller.json").unwrap();
        let cands = [2u32, 4];
        assert_eq!(
            speckv_load_controller(ctx, missing.as_ptr(), cands.as_ptr(), 2, null()),
            SpeckvStatus::Io
        );
        // A file that is not a controller: not read as one (the same status).
        let garbage =
            std::env::temp_dir().join(format!("speckv-misuse-{}.json", std::process::id()));
        std::fs::write(&garbage, "{\"w1\": \"no\"}").unwrap();
        let garbage = CString::new(garbage.to_str().unwrap()).unwrap();
        assert_eq!(
            speckv_load_controller(ctx, garbage.as_ptr(), cands.as_ptr(), 2, null()),
            SpeckvStatus::Io
        );
        let path = CString::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/controller.json"
        ))
        .unwrap();
        assert_eq!(
            speckv_load_controller(ctx, path.as_ptr(), cands.as_ptr(), 0, null()),
            SpeckvStatus::InvalidArgument
        );
        let zero = [0u32, 4];
        assert_ne!(
            speckv_load_controller(ctx, path.as_ptr(), zero.as_ptr(), 2, null()),
            SpeckvStatus::Ok
        );
        assert_eq!(
            speckv_load_controller(ctx, path.as_ptr(), cands.as_ptr(), 2, null()),
            SpeckvStatus::Ok
        );
        // Empty accumulators get the fallback.
        assert_eq!(
            speckv_decide_gamma(
                ctx,
                accum.as_ptr(),
                2,
                0.0,
                3,
                g.as_mut_ptr(),
                null_mut(),
                null_mut()
            ),
            SpeckvStatus::Ok
        );
        assert_eq!(g, [3, 3]);
        assert_eq!(
            speckv_decide_gamma(
                ctx,
                accum.as_ptr(),
                0,
                0.0,
                3,
                g.as_mut_ptr(),
                null_mut(),
                null_mut()
            ),
            SpeckvStatus::BadShape
        );

        // Verification: γ above γmax, a token outside the vocabulary, a stride below vocab.
        let (b, gm, v) = (1usize, 2usize, 4usize);
        let target = vec![0f32; b * (gm + 1) * v];
        let probs = vec![0.25f32; b * gm * v];
        let mut tokens = [1i32, 2];
        let mut gammas = [3i32];
        let temps = [1.0f32];
        let (mut acc, mut em, mut cnt, mut fl) = ([0i32; 1], [0i32; 3], [0i32; 1], [0u32; 1]);
        let mut args = SpeckvVerifyArgs {
            target_logits: target.as_ptr() as *const c_void,
            dtype: SPECKV_DTYPE_F32,
            target_stride: v as u32,
            draft: probs.as_ptr() as *const c_void,
            draft_kind: SPECKV_DRAFT_PROBS,
            draft_stride: v as u32,
            draft_temperature: null(),
            draft_tokens: tokens.as_ptr(),
            gammas: gammas.as_ptr(),
            target_temperature: temps.as_ptr(),
            batch: b as u32,
            gamma_max: gm as u32,
            vocab: v as u32,
            seed: 1,
            step: 0,
            accepted: acc.as_mut_ptr(),
            emitted: em.as_mut_ptr(),
            emitted_count: cnt.as_mut_ptr(),
            ratios: null_mut(),
            counterfactual: null_mut(),
            flags: fl.as_mut_ptr(),
        };
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::InvalidArgument);
        assert!(last_error().contains("γ = 3"), "{}", last_error());
        gammas[0] = 2;
        tokens[1] = 99;
        args.gammas = gammas.as_ptr();
        args.draft_tokens = tokens.as_ptr();
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::InvalidArgument);
        assert!(last_error().contains("99"));
        tokens[1] = 2;
        args.draft_tokens = tokens.as_ptr();
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::Ok);
        assert_eq!(cnt[0], acc[0] + 1); // emitted = accepted + 1
        args.draft_kind = SPECKV_DRAFT_LOGITS; // needs draft temperatures
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::NullPointer);
        args.draft_kind = 5;
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::InvalidArgument);
        args.draft_kind = SPECKV_DRAFT_PROBS;
        args.target_stride = 2;
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::BadShape);
        args.target_stride = v as u32;
        args.emitted = null_mut();
        assert_eq!(speckv_verify(ctx, &args), SpeckvStatus::NullPointer);
        speckv_context_destroy(ctx);
    }
}

#[test]
fn ptx_export_and_cuda_without_a_driver() {
    let arch = CString::new("sm_90").unwrap();
    let (mut p, mut n) = (null(), 0usize);
    // SAFETY: valid out-pointers and a NUL-terminated arch name.
    let s = unsafe { speckv_ptx(arch.as_ptr(), &mut p, &mut n) };
    if s == SpeckvStatus::Ok {
        // SAFETY: a static NUL-terminated string of length n.
        let text = unsafe { CStr::from_ptr(p) }.to_str().unwrap();
        assert_eq!(text.len(), n);
        assert!(text.contains(".entry verify_f32"));
    } else {
        assert_eq!(s, SpeckvStatus::NoCuda); // a build without nightly embeds no PTX
    }
    let bad = CString::new("sm_70").unwrap();
    // SAFETY: as above.
    assert_eq!(
        unsafe { speckv_ptx(bad.as_ptr(), &mut p, &mut n) },
        SpeckvStatus::InvalidArgument
    );
    if !speckv::backend::cuda::driver_present() {
        let mut ctx = null_mut();
        // SAFETY: a valid out-pointer; no driver, so no context is touched.
        let s = unsafe { speckv_context_create_cuda(null_mut(), null_mut(), &mut ctx) };
        assert_eq!(s, SpeckvStatus::NoCuda);
        assert!(ctx.is_null());
        assert!(last_error().contains("libcuda"));
    }
    // SAFETY: static strings.
    let v = unsafe { CStr::from_ptr(speckv_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// Described rows on the CPU: each row as the one-options pass gives it when its description says
/// the same (logits row r, stream r), accumulators too; then what a call is refused for.
#[test]
fn stats_rows_match_the_one_options_pass_and_misuse_is_reported() {
    let ctx = cpu();
    let (rows, vocab) = (3usize, 37usize);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 101) as f32 / 16.0 - 3.0)
        .collect();
    let mut want = vec![RowStats::default(); rows];
    let mut want_acc = vec![FeatureAccum::EMPTY; rows];
    let mut one = stats_args(&logits, &mut want, rows as u32, vocab as u32);
    (one.temperature, one.sample, one.seed, one.step) = (0.8, 1, 5, 2);
    one.accumulate = SPECKV_ACCUMULATE_ADD;
    one.accum = want_acc.as_mut_ptr();
    let order = [2u32, 0, 1];
    let desc: Vec<SpeckvStatsRow> = order
        .iter()
        .map(|&r| SpeckvStatsRow {
            seed: 5,
            step: 2,
            row: r,
            stream: r,
            temperature: 0.8,
            flags: SPECKV_STATS_SAMPLE | SPECKV_STATS_ACCUMULATE,
            accum_slot: r,
            _pad: 0,
        })
        .collect();
    let mut out = vec![RowStats::default(); rows];
    let mut acc = vec![FeatureAccum::EMPTY; rows];
    let args = |desc: &[SpeckvStatsRow], out: &mut [RowStats], acc: &mut [FeatureAccum]| {
        SpeckvStatsRowsArgs {
            logits: logits.as_ptr() as *const c_void,
            dtype: SPECKV_DTYPE_F32,
            logit_rows: rows as u32,
            vocab: vocab as u32,
            row_stride: vocab as u32,
            row_params: desc.as_ptr(),
            rows: desc.len() as u32,
            accum_slots: acc.len() as u32,
            accum: acc.as_mut_ptr(),
            out: out.as_mut_ptr(),
        }
    };
    // SAFETY (every call below): buffers of the stated shapes or deliberately null/bad values.
    unsafe {
        assert_eq!(speckv_softmax_stats(ctx, &one), SpeckvStatus::Ok);
        let good = args(&desc, &mut out, &mut acc);
        assert_eq!(speckv_softmax_stats_rows(ctx, &good), SpeckvStatus::Ok);
        for (k, &r) in order.iter().enumerate() {
            assert_eq!(
                out[k], want[r as usize],
                "described row {k} (logits row {r})"
            );
            assert!(out[k].sampled >= 0);
        }
        assert_eq!(acc, want_acc);

        let mut a = good;
        a.rows = 0;
        a.row_params = null();
        assert_eq!(
            speckv_softmax_stats_rows(ctx, &a),
            SpeckvStatus::Ok,
            "no rows, nothing"
        );
        let mut a = good;
        a.row_params = null();
        assert_eq!(
            speckv_softmax_stats_rows(ctx, &a),
            SpeckvStatus::NullPointer
        );
        assert!(last_error().contains("row_params"), "{}", last_error());
        let mut a = good;
        a.accum = null_mut();
        assert_eq!(
            speckv_softmax_stats_rows(ctx, &a),
            SpeckvStatus::InvalidArgument
        );
        assert!(
            last_error().contains("give both or neither"),
            "{}",
            last_error()
        );
        let mut a = good;
        a.dtype = 9;
        assert_eq!(speckv_softmax_stats_rows(ctx, &a), SpeckvStatus::BadDtype);
        let mut a = good;
        a.row_stride = 4;
        assert_eq!(speckv_softmax_stats_rows(ctx, &a), SpeckvStatus::BadShape);
        type Edit = fn(&mut SpeckvStatsRow);
        let bad: [(Edit, &str); 5] = [
            (|d| d.row = 3, "reads logits row 3 of 3"),
            (|d| d.accum_slot = 2, "share accumulator slot 2"),
            (|d| d.accum_slot = 7, "accumulates into slot 7 of 3"),
            (|d| d.flags |= 8, "flags 0xb"),
            (|d| d.temperature = -1.0, "temperature"),
        ];
        for (edit, message) in bad {
            let mut d = desc.clone();
            edit(&mut d[1]);
            let before = acc.clone();
            let a = args(&d, &mut out, &mut acc);
            assert_eq!(
                speckv_softmax_stats_rows(ctx, &a),
                SpeckvStatus::InvalidArgument
            );
            assert!(
                last_error().contains(message),
                "{message}: {}",
                last_error()
            );
            assert_eq!(acc, before, "{message}: a refused call changes nothing");
        }
        speckv_context_destroy(ctx);
    }
}

//! The C ABI on a caller's CUDA context and stream (what an engine does): device buffers allocated
//! by the caller (cudarc here), the C entry points launched on them, results equal to the same
//! calls on a CPU context. Skips with a message without a GPU.

use std::ffi::{c_void, CString};
use std::ptr::{null, null_mut};

use cudarc::driver::{CudaContext, DevicePtr, DevicePtrMut};
use speckv_c::*;
use speckv_kernels::params::{FeatureAccum, RowStats};

const B: usize = 3;
const G: usize = 4;
const V: usize = 1000;

fn logit(i: usize, salt: usize) -> f32 {
    ((i * 7919 + salt * 104_729) % 997) as f32 / 64.0 - 8.0
}

/// Whether a CUDA device is there: skip only without a driver or a device; any other CUDA error
/// fails the test.
fn have_device() -> bool {
    if !speckv::backend::cuda::driver_present() {
        eprintln!("skipped: no CUDA driver (C ABI CUDA path not exercised)");
        return false;
    }
    match CudaContext::device_count() {
        Ok(0) => {
            eprintln!("skipped: no CUDA device (C ABI CUDA path not exercised)");
            false
        }
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            eprintln!("skipped: no CUDA device ({e})");
            false
        }
        Err(e) => panic!("the CUDA driver failed: {e}"),
        Ok(_) => true,
    }
}

/// A CPU context and a context on `cu` launching on `stream`.
fn contexts(
    cu: &CudaContext,
    stream: &cudarc::driver::CudaStream,
) -> (*mut SpeckvContext, *mut SpeckvContext) {
    let (mut cpu, mut gpu) = (null_mut(), null_mut());
    // SAFETY: valid out-pointers; the handles are cudarc's live context and stream.
    unsafe {
        assert_eq!(speckv_context_create_cpu(&mut cpu), SpeckvStatus::Ok);
        let s = speckv_context_create_cuda(
            cu.cu_ctx() as *mut c_void,
            stream.cu_stream() as *mut c_void,
            &mut gpu,
        );
        assert_eq!(
            s,
            SpeckvStatus::Ok,
            "{:?}",
            std::ffi::CStr::from_ptr(speckv_last_error())
        );
    }
    (cpu, gpu)
}

#[test]
fn c_abi_on_a_caller_cuda_stream_matches_cpu() {
    if !have_device() {
        return;
    }
    let cu = CudaContext::new(0).unwrap();
    let stream = cu.new_stream().unwrap();
    let draft: Vec<f32> = (0..B * G * V).map(|i| logit(i, 1)).collect();
    let target: Vec<f32> = (0..B * (G + 1) * V)
        .map(|i| logit(i % (G * V), 1) + if i % 3 == 0 { 0.25 } else { 0.0 })
        .collect();
    let controller = std::env::temp_dir().join("speckv-capi-cuda-controller.json");
    std::fs::write(&controller, include_str!("../../assets/controller.json")).unwrap();
    let cpath = CString::new(controller.to_str().unwrap()).unwrap();
    let cands = [1u32, 2, 3, 4];

    // SAFETY (the whole test): every pointer passed is a live host or device buffer of the stated
    // shape, on this context and stream.
    unsafe {
        let (cpu, gpu) = contexts(&cu, &stream);
        for c in [cpu, gpu] {
            assert_eq!(
                speckv_load_controller(c, cpath.as_ptr(), cands.as_ptr(), 4, null()),
                SpeckvStatus::Ok
            );
        }

        // Statistics with accumulation, one position at a time, on both.
        let d_draft = stream.clone_htod(&draft).unwrap();
        let mut d_stats = stream.alloc_zeros::<u8>(B * 32).unwrap();
        let mut d_accum = stream.alloc_zeros::<u8>(B * 24).unwrap();
        let mut h_accum = [FeatureAccum::EMPTY; B];
        let mut tokens = vec![0i32; B * G];
        for j in 0..G {
            let mut h_stats = [RowStats::default(); B];
            let mut a = SpeckvStatsArgs {
                logits: draft[j * V..].as_ptr() as *const c_void,
                dtype: SPECKV_DTYPE_F32,
                rows: B as u32,
                vocab: V as u32,
                row_stride: (G * V) as u32,
                temperature: 0.8,
                sample: 1,
                seed: 5,
                step: j as u64,
                accumulate: if j == 0 {
                    SPECKV_ACCUMULATE_RESET
                } else {
                    SPECKV_ACCUMULATE_ADD
                },
                accum: h_accum.as_mut_ptr(),
                out: h_stats.as_mut_ptr(),
            };
            assert_eq!(speckv_softmax_stats(cpu, &a), SpeckvStatus::Ok);
            let (dl, _g0) = d_draft.device_ptr(&stream);
            let (ds, _g1) = d_stats.device_ptr_mut(&stream);
            let (da, _g2) = d_accum.device_ptr_mut(&stream);
            a.logits = (dl as usize + j * V * 4) as *const c_void;
            a.out = ds as *mut RowStats;
            a.accum = da as *mut FeatureAccum;
            assert_eq!(speckv_softmax_stats(gpu, &a), SpeckvStatus::Ok);
            drop((_g0, _g1, _g2));
            let got: Vec<u8> = stream.clone_dtoh(&d_stats).unwrap();
            let got: &[RowStats] = bytemuck::cast_slice(&got);
            for b in 0..B {
                assert_eq!(got[b].argmax, h_stats[b].argmax);
                assert_eq!(
                    got[b].sampled, h_stats[b].sampled,
                    "Gumbel-max is bit-identical"
                );
                assert!((got[b].entropy - h_stats[b].entropy).abs() < 1e-4);
                tokens[b * G + j] = h_stats[b].sampled;
            }
        }
        // Described rows (out of order, their own seeds, steps, streams, temperatures and
        // accumulators) in one pass, on both; then a row past the logits, flagged on the device.
        let n = 6usize;
        let mut desc: Vec<SpeckvStatsRow> = (0..n)
            .map(|k| SpeckvStatsRow {
                seed: 3 + k as u64,
                step: k as u64,
                row: ((k * 5) % (B * G)) as u32,
                stream: k as u32,
                temperature: if k % 3 == 0 { 0.0 } else { 0.7 },
                flags: SPECKV_STATS_SAMPLE
                    | SPECKV_STATS_ACCUMULATE
                    | if k % 2 == 0 {
                        SPECKV_STATS_ACCUM_RESET
                    } else {
                        0
                    },
                accum_slot: k as u32,
                _pad: 0,
            })
            .collect();
        let mut h_rows = vec![RowStats::default(); n];
        let mut h_racc = vec![FeatureAccum::EMPTY; n];
        let mut ra = SpeckvStatsRowsArgs {
            logits: draft.as_ptr() as *const c_void,
            dtype: SPECKV_DTYPE_F32,
            logit_rows: (B * G) as u32,
            vocab: V as u32,
            row_stride: V as u32,
            row_params: desc.as_ptr(),
            rows: n as u32,
            accum_slots: n as u32,
            accum: h_racc.as_mut_ptr(),
            out: h_rows.as_mut_ptr(),
        };
        assert_eq!(speckv_softmax_stats_rows(cpu, &ra), SpeckvStatus::Ok);
        desc[n - 1].row = (B * G) as u32; // past the logits: flagged on the device
        let d_desc = stream
            .clone_htod(bytemuck::cast_slice::<SpeckvStatsRow, u8>(&desc))
            .unwrap();
        let mut d_rows = stream.alloc_zeros::<u8>(n * 32).unwrap();
        let mut d_racc = stream
            .clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(
                &[FeatureAccum::EMPTY; 6],
            ))
            .unwrap();
        {
            let (dl, _g0) = d_draft.device_ptr(&stream);
            let (dd, _g1) = d_desc.device_ptr(&stream);
            let (ds, _g2) = d_rows.device_ptr_mut(&stream);
            let (da, _g3) = d_racc.device_ptr_mut(&stream);
            ra.logits = dl as *const c_void;
            ra.row_params = dd as *const SpeckvStatsRow;
            ra.out = ds as *mut RowStats;
            ra.accum = da as *mut FeatureAccum;
            assert_eq!(speckv_softmax_stats_rows(gpu, &ra), SpeckvStatus::Ok);
        }
        let got: Vec<u8> = stream.clone_dtoh(&d_rows).unwrap();
        let got: &[RowStats] = bytemuck::cast_slice(&got);
        let acc: Vec<u8> = stream.clone_dtoh(&d_racc).unwrap();
        let acc: &[FeatureAccum] = bytemuck::cast_slice(&acc);
        for k in 0..n - 1 {
            assert_eq!(
                (got[k].argmax, got[k].sampled, got[k].flags),
                (h_rows[k].argmax, h_rows[k].sampled, h_rows[k].flags),
                "described row {k}"
            );
            assert!((got[k].entropy - h_rows[k].entropy).abs() < 1e-4);
            assert_eq!(acc[k].count, h_racc[k].count);
            assert!((acc[k].entropy_sum - h_racc[k].entropy_sum).abs() < 1e-4);
        }
        assert_eq!(got[n - 1].flags, SPECKV_ROW_BAD_INDEX);
        assert_eq!(acc[n - 1].count, 0, "a flagged row accumulates nothing");

        // γ on the device from the device accumulators, and on the CPU.
        let mut h_g = [0i32; B];
        assert_eq!(
            speckv_decide_gamma(
                cpu,
                h_accum.as_ptr(),
                B as u32,
                0.0,
                4,
                h_g.as_mut_ptr(),
                null_mut(),
                null_mut()
            ),
            SpeckvStatus::Ok
        );
        let mut d_g = stream.alloc_zeros::<i32>(B).unwrap();
        {
            let (da, _g0) = d_accum.device_ptr(&stream);
            let (dg, _g1) = d_g.device_ptr_mut(&stream);
            assert_eq!(
                speckv_decide_gamma(
                    gpu,
                    da as *const FeatureAccum,
                    B as u32,
                    0.0,
                    4,
                    dg as *mut i32,
                    null_mut(),
                    null_mut()
                ),
                SpeckvStatus::Ok
            );
        }
        assert_eq!(stream.clone_dtoh(&d_g).unwrap(), h_g.to_vec());

        // Verification reading γ from device memory.
        let temps = [0.8f32; B];
        let (mut acc, mut em, mut cnt, mut cf, mut fl) = (
            vec![0i32; B],
            vec![0i32; B * (G + 1)],
            vec![0i32; B],
            vec![0i32; B * (G + 1)],
            vec![0u32; B],
        );
        let mut v = SpeckvVerifyArgs {
            target_logits: target.as_ptr() as *const c_void,
            dtype: SPECKV_DTYPE_F32,
            target_stride: V as u32,
            draft: draft.as_ptr() as *const c_void,
            draft_kind: SPECKV_DRAFT_LOGITS,
            draft_stride: V as u32,
            draft_temperature: temps.as_ptr(),
            draft_tokens: tokens.as_ptr(),
            gammas: h_g.as_ptr(),
            target_temperature: temps.as_ptr(),
            batch: B as u32,
            gamma_max: G as u32,
            vocab: V as u32,
            seed: 9,
            step: 3,
            accepted: acc.as_mut_ptr(),
            emitted: em.as_mut_ptr(),
            emitted_count: cnt.as_mut_ptr(),
            ratios: null_mut(),
            counterfactual: cf.as_mut_ptr(),
            flags: fl.as_mut_ptr(),
        };
        assert_eq!(speckv_verify(cpu, &v), SpeckvStatus::Ok);
        let d_t = stream.clone_htod(&target).unwrap();
        let d_tok = stream.clone_htod(&tokens).unwrap();
        let d_temp = stream.clone_htod(&temps).unwrap();
        let mut d_acc = stream.alloc_zeros::<i32>(B).unwrap();
        let mut d_em = stream.alloc_zeros::<i32>(B * (G + 1)).unwrap();
        let mut d_cnt = stream.alloc_zeros::<i32>(B).unwrap();
        let mut d_cf = stream.alloc_zeros::<i32>(B * (G + 1)).unwrap();
        let mut d_fl = stream.alloc_zeros::<u32>(B).unwrap();
        {
            let p = |x: u64| x as usize;
            let (t, _a) = d_t.device_ptr(&stream);
            let (dr, _b) = d_draft.device_ptr(&stream);
            let (tk, _c) = d_tok.device_ptr(&stream);
            let (tp, _d) = d_temp.device_ptr(&stream);
            let (g, _e) = d_g.device_ptr(&stream);
            let (a, _f) = d_acc.device_ptr_mut(&stream);
            let (e, _h) = d_em.device_ptr_mut(&stream);
            let (c, _i) = d_cnt.device_ptr_mut(&stream);
            let (f, _j) = d_cf.device_ptr_mut(&stream);
            let (l, _k) = d_fl.device_ptr_mut(&stream);
            v.target_logits = p(t) as *const c_void;
            v.draft = p(dr) as *const c_void;
            v.draft_tokens = p(tk) as *const i32;
            v.draft_temperature = p(tp) as *const f32;
            v.target_temperature = p(tp) as *const f32;
            v.gammas = p(g) as *const i32;
            v.accepted = p(a) as *mut i32;
            v.emitted = p(e) as *mut i32;
            v.emitted_count = p(c) as *mut i32;
            v.counterfactual = p(f) as *mut i32;
            v.flags = p(l) as *mut u32;
            assert_eq!(speckv_verify(gpu, &v), SpeckvStatus::Ok);
        }
        assert_eq!(stream.clone_dtoh(&d_acc).unwrap(), acc);
        assert_eq!(stream.clone_dtoh(&d_em).unwrap(), em);
        assert_eq!(stream.clone_dtoh(&d_cnt).unwrap(), cnt);
        assert_eq!(stream.clone_dtoh(&d_cf).unwrap(), cf);
        assert_eq!(stream.clone_dtoh(&d_fl).unwrap(), fl);
        // A CPU context still refuses a stream; the CUDA one accepts its own.
        assert_eq!(
            speckv_context_set_stream(cpu, stream.cu_stream() as *mut c_void),
            SpeckvStatus::WrongStream
        );
        assert_eq!(
            speckv_context_set_stream(gpu, stream.cu_stream() as *mut c_void),
            SpeckvStatus::Ok
        );
        speckv_context_destroy(gpu);
        speckv_context_destroy(cpu);
    }
}

/// Per-token stopping (`speckv_softmax_stats_stop`) on a caller's stream against a CPU context fed
/// the same logits, position by position: the same decisions and γ_b, a stopped sequence's γ_b left
/// unwritten on the device, the counter at the batch size once every sequence has stopped, the
/// expectations to rounding. The rule's parameters are copied once per step (the same costs for
/// every later position of it). Each sequence alone, then the batch in lockstep (every sequence
/// with the same γ); each with one odds scale and with one per sequence (on the device).
#[test]
fn c_abi_stops_on_a_caller_cuda_stream_as_on_the_cpu() {
    if !have_device() {
        return;
    }
    const R: usize = 8;
    const GMAX: u32 = 7;
    let cu = CudaContext::new(0).unwrap();
    let stream = cu.new_stream().unwrap();
    let x = |j: usize| -> Vec<f32> {
        (0..R * V)
            .map(|i| {
                let (b, k) = (i / V, i % V);
                // Sequence b confident (a clear winner) for its first b positions, flat after.
                let scale = if j < b { 4.0 } else { 0.5 };
                let spike = if k == (j * 13 + b) % V { 3.0 } else { 0.0 };
                scale * (logit(k, j * 31 + b) / 8.0 + spike)
            })
            .collect()
    };
    // SAFETY (the whole test): every pointer passed is a live host or device buffer of the stated
    // shape, on this context and stream.
    unsafe {
        let (cpu, gpu) = contexts(&cu, &stream);
        for c in [cpu, gpu] {
            assert_eq!(speckv_load_hazard(c, null()), SpeckvStatus::Ok);
        }
        let mut costs = std::mem::zeroed::<SpeckvStepCosts>();
        assert_eq!(
            speckv_step_costs(null(), GMAX, &mut costs),
            SpeckvStatus::Ok
        );
        // Each sequence alone, then the batch in lockstep (the context's scratch on the device);
        // one odds scale, then one per sequence.
        let h_scales: Vec<f32> = (0..R).map(|b| 0.25 * (1 << (b % 5)) as f32).collect();
        let d_scales = stream.clone_htod(&h_scales).unwrap();
        for (lockstep, per_seq) in [(0u32, false), (1, false), (0, true), (1, true)] {
            let mut h_accum = [FeatureAccum::EMPTY; R];
            let mut h_state = [std::mem::zeroed::<SpeckvStopState>(); R];
            let mut h_gammas = [0i32; R];
            let mut h_count = 0u32;
            let mut h_hazards = [f32::NAN; R * SPECKV_STOP_TIMES];
            let mut d_stats = stream.alloc_zeros::<u8>(R * 32).unwrap();
            let mut d_accum = stream.alloc_zeros::<u8>(R * 24).unwrap();
            let mut d_state = stream.alloc_zeros::<u8>(R * 16).unwrap();
            let mut d_gammas = stream.alloc_zeros::<i32>(R).unwrap();
            let mut d_count = stream.alloc_zeros::<u32>(1).unwrap();
            let mut d_hazards = stream.clone_htod(&h_hazards).unwrap();
            for j in 0..GMAX as usize {
                let logits = x(j);
                let d_logits = stream.clone_htod(&logits).unwrap();
                // The device's stopped sequences get a sentinel γ_b the call must not overwrite.
                let before: Vec<i32> = stream.clone_dtoh(&d_gammas).unwrap();
                let state_before: Vec<u8> = stream.clone_dtoh(&d_state).unwrap();
                let state_before: &[SpeckvStopState] = bytemuck::cast_slice(&state_before);
                let sentinel: Vec<i32> = (0..R)
                    .map(|b| {
                        if j > 0 && state_before[b].stopped != 0 {
                            -7
                        } else {
                            before[b]
                        }
                    })
                    .collect();
                stream.memcpy_htod(&sentinel, &mut d_gammas).unwrap();
                let mut h_stats = [RowStats::default(); R];
                let mut a = SpeckvStatsArgs {
                    logits: logits.as_ptr() as *const c_void,
                    dtype: SPECKV_DTYPE_F32,
                    rows: R as u32,
                    vocab: V as u32,
                    row_stride: V as u32,
                    temperature: 0.0,
                    sample: 0,
                    seed: 9,
                    step: j as u64,
                    accumulate: if j == 0 {
                        SPECKV_ACCUMULATE_RESET
                    } else {
                        SPECKV_ACCUMULATE_ADD
                    },
                    accum: h_accum.as_mut_ptr(),
                    out: h_stats.as_mut_ptr(),
                };
                let mut s = SpeckvStopArgs {
                    state: h_state.as_mut_ptr(),
                    gammas_out: h_gammas.as_mut_ptr(),
                    stopped_count: &mut h_count,
                    hazards_out: h_hazards.as_mut_ptr(),
                    costs,
                    gamma_max: GMAX,
                    compression_code: 0.0,
                    odds_scale: 1.0,
                    lockstep,
                    odds_scales: if per_seq { h_scales.as_ptr() } else { null() },
                };
                assert_eq!(speckv_softmax_stats_stop(cpu, &a, &s), SpeckvStatus::Ok);
                {
                    let (dl, _g0) = d_logits.device_ptr(&stream);
                    let (ds, _g1) = d_stats.device_ptr_mut(&stream);
                    let (da, _g2) = d_accum.device_ptr_mut(&stream);
                    let (dst, _g3) = d_state.device_ptr_mut(&stream);
                    let (dg, _g4) = d_gammas.device_ptr_mut(&stream);
                    let (dc, _g5) = d_count.device_ptr_mut(&stream);
                    let (dh, _g6) = d_hazards.device_ptr_mut(&stream);
                    let (dk, _g7) = d_scales.device_ptr(&stream);
                    a.logits = dl as *const c_void;
                    a.out = ds as *mut RowStats;
                    a.accum = da as *mut FeatureAccum;
                    s.state = dst as *mut SpeckvStopState;
                    s.gammas_out = dg as *mut i32;
                    s.stopped_count = dc as *mut u32;
                    s.hazards_out = dh as *mut f32;
                    if per_seq {
                        s.odds_scales = dk as *const f32;
                    }
                    assert_eq!(
                        speckv_softmax_stats_stop(gpu, &a, &s),
                        SpeckvStatus::Ok,
                        "{:?}",
                        std::ffi::CStr::from_ptr(speckv_last_error())
                    );
                }
                let g: Vec<i32> = stream.clone_dtoh(&d_gammas).unwrap();
                let st: Vec<u8> = stream.clone_dtoh(&d_state).unwrap();
                let st: &[SpeckvStopState] = bytemuck::cast_slice(&st);
                for b in 0..R {
                    let at = format!(
                        "lockstep {lockstep}, per-sequence scales {per_seq}, position {j}, \
                         sequence {b}"
                    );
                    if j > 0 && state_before[b].stopped != 0 {
                        assert_eq!(g[b], -7, "{at}: γ_b written after the stop");
                        continue;
                    }
                    assert_eq!(
                        (st[b].kept, st[b].stopped),
                        (h_state[b].kept, h_state[b].stopped),
                        "{at}"
                    );
                    assert_eq!(g[b], h_gammas[b], "{at}");
                    assert!((st[b].expected - h_state[b].expected).abs() < 1e-4, "{at}");
                }
                let hz: Vec<f32> = stream.clone_dtoh(&d_hazards).unwrap();
                for (i, (d, h)) in hz.iter().zip(&h_hazards).enumerate() {
                    assert!(
                        (d.is_nan() && h.is_nan()) || (d - h).abs() < 1e-4,
                        "position {j}, hazard slot {i}: {d} on the device, {h} on the CPU"
                    );
                }
                let count: Vec<u32> = stream.clone_dtoh(&d_count).unwrap();
                assert_eq!(count[0], h_count, "position {j}");
                // Put back the γ_b the sentinel hid.
                let fixed: Vec<i32> = (0..R)
                    .map(|b| if g[b] == -7 { h_gammas[b] } else { g[b] })
                    .collect();
                stream.memcpy_htod(&fixed, &mut d_gammas).unwrap();
            }
            assert_eq!(h_count, R as u32, "every sequence stopped once");
            // With per-sequence scales compared with the CPU above only; the modes' shapes:
            if per_seq {
                continue;
            }
            if lockstep == 0 {
                assert!(
                    h_gammas.iter().any(|&g| g > 0 && g < GMAX as i32),
                    "{h_gammas:?}"
                );
            } else {
                assert!(h_gammas.iter().all(|&g| g == h_gammas[0]), "{h_gammas:?}");
            }
        }
        speckv_context_destroy(gpu);
        speckv_context_destroy(cpu);
    }
}

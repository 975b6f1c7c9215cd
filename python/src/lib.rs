//! `speckv._speckv`: the C ABI (`speckv-capi`) for Python, pointer-level. Every method forwards to
//! the same `extern "C"` function a C caller uses, so the binding's results are the C API's; the
//! tensor handling (data pointers, shapes, strides, dtypes, devices) is in `speckv/__init__.py`.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use speckv_c::*;

create_exception!(
    _speckv,
    SpeckvError,
    PyException,
    "A speckv call failed (status and message)."
);

fn check(s: SpeckvStatus) -> PyResult<()> {
    if s == SpeckvStatus::Ok {
        return Ok(());
    }
    // SAFETY: speckv_last_error returns a valid NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(speckv_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(SpeckvError::new_err(format!("{s:?}: {msg}")))
}

fn ptr(addr: usize) -> *mut c_void {
    addr as *mut c_void
}

/// `SpeckvStatsArgs` from the pointer-level arguments `softmax_stats` and `softmax_stats_stop`
/// share (`shape`: rows, vocab, row stride; `philox`: seed, step).
#[allow(clippy::too_many_arguments)]
fn stats_args(
    logits: usize,
    dtype: u32,
    shape: [u32; 3],
    out: usize,
    temperature: f32,
    sample: bool,
    philox: [u64; 2],
    accumulate: u32,
    accum: usize,
) -> SpeckvStatsArgs {
    let [rows, vocab, row_stride] = shape;
    SpeckvStatsArgs {
        logits: ptr(logits),
        dtype,
        rows,
        vocab,
        row_stride,
        temperature,
        sample: sample as u32,
        seed: philox[0],
        step: philox[1],
        accumulate,
        accum: ptr(accum) as *mut SpeckvFeatureAccum,
        out: ptr(out) as *mut SpeckvRowStats,
    }
}

/// `speckv_online_cost_*`: step costs measured while decoding.
#[pyclass(module = "speckv._speckv", unsendable)]
struct OnlineCost {
    raw: *mut SpeckvOnlineCost,
}

impl Drop for OnlineCost {
    fn drop(&mut self) {
        // SAFETY: created by speckv_online_cost_create, destroyed once.
        unsafe { speckv_online_cost_destroy(self.raw) };
    }
}

#[pymethods]
impl OnlineCost {
    #[new]
    #[pyo3(signature = (cost_json, seqs))]
    fn new(cost_json: Option<&str>, seqs: u32) -> PyResult<OnlineCost> {
        let p = match cost_json {
            Some(p) => Some(CString::new(p).map_err(|e| SpeckvError::new_err(e.to_string()))?),
            None => None,
        };
        let mut raw = null_mut();
        // SAFETY: a NUL-terminated path or null, and a valid out-pointer.
        check(unsafe {
            speckv_online_cost_create(p.as_ref().map_or(null(), |p| p.as_ptr()), seqs, &mut raw)
        })?;
        Ok(OnlineCost { raw })
    }

    fn observe(
        &mut self,
        draft_passes: u32,
        draft_seconds: f64,
        gamma: u32,
        verify_seconds: f64,
    ) -> PyResult<()> {
        // SAFETY: a live model, used by this call only (unsendable, &mut self).
        check(unsafe {
            speckv_online_cost_observe(self.raw, draft_passes, draft_seconds, gamma, verify_seconds)
        })
    }

    fn step_costs(&self, gamma_max: u32) -> PyResult<(f32, Vec<f32>)> {
        let mut c = SpeckvStepCosts {
            draft: 0.0,
            verify: [0.0; SPECKV_STOP_TIMES],
        };
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { speckv_online_cost_step_costs(self.raw, gamma_max, &mut c) })?;
        Ok((c.draft, c.verify[..=gamma_max as usize].to_vec()))
    }
}

/// A speckv context: the CPU, or a CUDA context and stream.
#[pyclass(module = "speckv._speckv", unsendable)]
struct Context {
    raw: *mut SpeckvContext,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by a speckv_context_create_* call, destroyed once.
        unsafe { speckv_context_destroy(self.raw) };
    }
}

#[pymethods]
impl Context {
    /// A CPU context.
    #[staticmethod]
    fn cpu() -> PyResult<Context> {
        let mut raw = null_mut();
        // SAFETY: a valid out-pointer.
        check(unsafe { speckv_context_create_cpu(&mut raw) })?;
        Ok(Context { raw })
    }

    /// A context on CUDA context `cu_context` (0: the current one) and stream `cu_stream` (0: the
    /// legacy default stream), both raw handles (e.g. `torch.cuda.current_stream().cuda_stream`).
    #[staticmethod]
    fn cuda(cu_context: usize, cu_stream: usize) -> PyResult<Context> {
        let mut raw = null_mut();
        // SAFETY: handles from the caller (checked by the driver), a valid out-pointer.
        check(unsafe { speckv_context_create_cuda(ptr(cu_context), ptr(cu_stream), &mut raw) })?;
        Ok(Context { raw })
    }

    /// "cpu" or "cuda".
    #[getter]
    fn device(&self) -> PyResult<&'static str> {
        let mut d = 0u32;
        // SAFETY: a live context and a valid out-pointer.
        check(unsafe { speckv_context_device(self.raw, &mut d) })?;
        Ok(if d == SPECKV_DEVICE_CUDA {
            "cuda"
        } else {
            "cpu"
        })
    }

    fn set_stream(&mut self, cu_stream: usize) -> PyResult<()> {
        // SAFETY: a live context; the stream is checked against it.
        check(unsafe { speckv_context_set_stream(self.raw, ptr(cu_stream)) })
    }

    #[pyo3(signature = (path, candidates, cost_json=None))]
    fn load_controller(
        &mut self,
        path: &str,
        candidates: Vec<u32>,
        cost_json: Option<&str>,
    ) -> PyResult<()> {
        let p = CString::new(path).map_err(|e| SpeckvError::new_err(e.to_string()))?;
        let c = match cost_json {
            Some(c) => Some(CString::new(c).map_err(|e| SpeckvError::new_err(e.to_string()))?),
            None => None,
        };
        // SAFETY: NUL-terminated strings and `candidates.len()` values, alive for the call.
        check(unsafe {
            speckv_load_controller(
                self.raw,
                p.as_ptr(),
                candidates.as_ptr(),
                candidates.len(),
                c.as_ref().map_or(null(), |c| c.as_ptr()),
            )
        })
    }

    /// Pointer-level `speckv_softmax_stats` (see speckv.h).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (logits, dtype, rows, vocab, row_stride, out, temperature, sample, seed, step, accumulate, accum))]
    fn softmax_stats(
        &self,
        logits: usize,
        dtype: u32,
        rows: u32,
        vocab: u32,
        row_stride: u32,
        out: usize,
        temperature: f32,
        sample: bool,
        seed: u64,
        step: u64,
        accumulate: u32,
        accum: usize,
    ) -> PyResult<()> {
        let a = stats_args(
            logits,
            dtype,
            [rows, vocab, row_stride],
            out,
            temperature,
            sample,
            [seed, step],
            accumulate,
            accum,
        );
        // SAFETY: the Python wrapper passes addresses of buffers of the stated shapes; the C
        // ABI checks what it can (nulls, dtypes, shapes).
        check(unsafe { speckv_softmax_stats(self.raw, &a) })
    }

    /// `speckv_load_hazard`: a hazard model from `speckv train --hazard` (None: the shipped one).
    #[pyo3(signature = (path=None))]
    fn load_hazard(&mut self, path: Option<&str>) -> PyResult<()> {
        let p = match path {
            Some(p) => Some(CString::new(p).map_err(|e| SpeckvError::new_err(e.to_string()))?),
            None => None,
        };
        // SAFETY: a live context and a NUL-terminated path or null.
        check(unsafe { speckv_load_hazard(self.raw, p.as_ref().map_or(null(), |p| p.as_ptr())) })
    }

    /// Pointer-level `speckv_softmax_stats_stop`: the statistics' arguments as in
    /// `softmax_stats`, then the stopping rule's (`verify_costs`: γ = 0..len−1, at most
    /// `STOP_TIMES`; the rest +inf, so every γ ≤ γmax needs an entry).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (logits, dtype, rows, vocab, row_stride, out, temperature, sample, seed, step, accumulate, accum, state, gammas_out, stopped_count, hazards_out, draft_cost, verify_costs, gamma_max, compression_code, odds_scale, lockstep, odds_scales))]
    fn softmax_stats_stop(
        &self,
        logits: usize,
        dtype: u32,
        rows: u32,
        vocab: u32,
        row_stride: u32,
        out: usize,
        temperature: f32,
        sample: bool,
        seed: u64,
        step: u64,
        accumulate: u32,
        accum: usize,
        state: usize,
        gammas_out: usize,
        stopped_count: usize,
        hazards_out: usize,
        draft_cost: f32,
        verify_costs: Vec<f32>,
        gamma_max: u32,
        compression_code: f32,
        odds_scale: f32,
        lockstep: bool,
        odds_scales: usize,
    ) -> PyResult<()> {
        if verify_costs.len() > SPECKV_STOP_TIMES {
            return Err(SpeckvError::new_err(format!(
                "InvalidArgument: {} verification costs, at most {SPECKV_STOP_TIMES}",
                verify_costs.len()
            )));
        }
        let mut verify = [f32::INFINITY; SPECKV_STOP_TIMES];
        verify[..verify_costs.len()].copy_from_slice(&verify_costs);
        let a = stats_args(
            logits,
            dtype,
            [rows, vocab, row_stride],
            out,
            temperature,
            sample,
            [seed, step],
            accumulate,
            accum,
        );
        let s = SpeckvStopArgs {
            state: ptr(state) as *mut SpeckvStopState,
            gammas_out: ptr(gammas_out) as *mut i32,
            stopped_count: ptr(stopped_count) as *mut u32,
            hazards_out: ptr(hazards_out) as *mut f32,
            costs: SpeckvStepCosts {
                draft: draft_cost,
                verify,
            },
            gamma_max,
            compression_code,
            odds_scale,
            lockstep: lockstep as u32,
            odds_scales: ptr(odds_scales) as *const f32,
        };
        // SAFETY: as in `softmax_stats`; the C ABI checks the rule's arguments.
        check(unsafe { speckv_softmax_stats_stop(self.raw, &a, &s) })
    }

    /// Pointer-level `speckv_softmax_stats_rows`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_stats_rows(
        &self,
        logits: usize,
        dtype: u32,
        logit_rows: u32,
        vocab: u32,
        row_stride: u32,
        row_params: usize,
        rows: u32,
        accum_slots: u32,
        accum: usize,
        out: usize,
    ) -> PyResult<()> {
        let a = SpeckvStatsRowsArgs {
            logits: ptr(logits),
            dtype,
            logit_rows,
            vocab,
            row_stride,
            row_params: ptr(row_params) as *const SpeckvStatsRow,
            rows,
            accum_slots,
            accum: ptr(accum) as *mut SpeckvFeatureAccum,
            out: ptr(out) as *mut SpeckvRowStats,
        };
        // SAFETY: as in `softmax_stats`.
        check(unsafe { speckv_softmax_stats_rows(self.raw, &a) })
    }

    /// Pointer-level `speckv_decide_gamma`.
    #[allow(clippy::too_many_arguments)]
    fn decide_gamma(
        &self,
        accum: usize,
        batch: u32,
        compression_code: f32,
        fallback_gamma: i32,
        gammas_out: usize,
        expected_out: usize,
        flags_out: usize,
    ) -> PyResult<()> {
        // SAFETY: as in `softmax_stats`.
        check(unsafe {
            speckv_decide_gamma(
                self.raw,
                ptr(accum) as *const SpeckvFeatureAccum,
                batch,
                compression_code,
                fallback_gamma,
                ptr(gammas_out) as *mut i32,
                ptr(expected_out) as *mut f32,
                ptr(flags_out) as *mut u32,
            )
        })
    }

    /// Pointer-level `speckv_verify`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (target_logits, dtype, target_stride, draft, draft_kind, draft_stride, draft_temperature, draft_tokens, gammas, target_temperature, batch, gamma_max, vocab, seed, step, accepted, emitted, emitted_count, ratios, counterfactual, flags))]
    fn verify(
        &self,
        target_logits: usize,
        dtype: u32,
        target_stride: u32,
        draft: usize,
        draft_kind: u32,
        draft_stride: u32,
        draft_temperature: usize,
        draft_tokens: usize,
        gammas: usize,
        target_temperature: usize,
        batch: u32,
        gamma_max: u32,
        vocab: u32,
        seed: u64,
        step: u64,
        accepted: usize,
        emitted: usize,
        emitted_count: usize,
        ratios: usize,
        counterfactual: usize,
        flags: usize,
    ) -> PyResult<()> {
        let a = SpeckvVerifyArgs {
            target_logits: ptr(target_logits),
            dtype,
            target_stride,
            draft: ptr(draft),
            draft_kind,
            draft_stride,
            draft_temperature: ptr(draft_temperature) as *const f32,
            draft_tokens: ptr(draft_tokens) as *const i32,
            gammas: ptr(gammas) as *const i32,
            target_temperature: ptr(target_temperature) as *const f32,
            batch,
            gamma_max,
            vocab,
            seed,
            step,
            accepted: ptr(accepted) as *mut i32,
            emitted: ptr(emitted) as *mut i32,
            emitted_count: ptr(emitted_count) as *mut i32,
            ratios: ptr(ratios) as *mut f32,
            counterfactual: ptr(counterfactual) as *mut i32,
            flags: ptr(flags) as *mut u32,
        };
        // SAFETY: as in `softmax_stats`.
        check(unsafe { speckv_verify(self.raw, &a) })
    }
}

/// `speckv_step_costs`: (draft cost, verification costs for γ = 0..=gamma_max) of a cost model
/// (None: the assumed one).
#[pyfunction]
#[pyo3(signature = (cost_json, gamma_max))]
fn step_costs(cost_json: Option<&str>, gamma_max: u32) -> PyResult<(f32, Vec<f32>)> {
    let p = match cost_json {
        Some(p) => Some(CString::new(p).map_err(|e| SpeckvError::new_err(e.to_string()))?),
        None => None,
    };
    let mut c = SpeckvStepCosts {
        draft: 0.0,
        verify: [0.0; SPECKV_STOP_TIMES],
    };
    // SAFETY: a NUL-terminated path or null, and a valid out-pointer.
    check(unsafe {
        speckv_step_costs(p.as_ref().map_or(null(), |p| p.as_ptr()), gamma_max, &mut c)
    })?;
    Ok((c.draft, c.verify[..=gamma_max as usize].to_vec()))
}

/// `speckv_calibrate` on host buffers: the odds scale after a verified step.
#[pyfunction]
fn calibrate(
    odds_scale: f32,
    hazards: usize,
    gammas: usize,
    accepted: usize,
    batch: u32,
) -> PyResult<f32> {
    let mut k = odds_scale;
    // SAFETY: the Python wrapper passes host buffers of the stated shapes; the C ABI checks values.
    check(unsafe {
        speckv_calibrate(
            &mut k,
            ptr(hazards) as *const f32,
            ptr(gammas) as *const i32,
            ptr(accepted) as *const i32,
            batch,
        )
    })?;
    Ok(k)
}

/// `speckv_calibrate_each` on host buffers: every sequence's odds scale, updated in place.
#[pyfunction]
fn calibrate_each(
    odds_scales: usize,
    hazards: usize,
    gammas: usize,
    accepted: usize,
    batch: u32,
) -> PyResult<()> {
    // SAFETY: the Python wrapper passes host buffers of the stated shapes; the C ABI checks values.
    check(unsafe {
        speckv_calibrate_each(
            ptr(odds_scales) as *mut f32,
            ptr(hazards) as *const f32,
            ptr(gammas) as *const i32,
            ptr(accepted) as *const i32,
            batch,
        )
    })
}

/// The embedded PTX for "sm_80" or "sm_90".
#[pyfunction]
fn ptx(arch: &str) -> PyResult<String> {
    let a = CString::new(arch).map_err(|e| SpeckvError::new_err(e.to_string()))?;
    let (mut p, mut n) = (null(), 0usize);
    // SAFETY: valid out-pointers; the PTX is a static NUL-terminated string.
    check(unsafe { speckv_ptx(a.as_ptr(), &mut p, &mut n) })?;
    // SAFETY: as above.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

#[pymodule]
fn _speckv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Context>()?;
    m.add_class::<OnlineCost>()?;
    m.add_function(wrap_pyfunction!(ptx, m)?)?;
    m.add_function(wrap_pyfunction!(step_costs, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate_each, m)?)?;
    m.add("SpeckvError", m.py().get_type::<SpeckvError>())?;
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(speckv_version()) };
    m.add("__version__", v.to_string_lossy().into_owned())?;
    m.add("ROW_STATS_BYTES", std::mem::size_of::<SpeckvRowStats>())?;
    m.add("STATS_ROW_BYTES", std::mem::size_of::<SpeckvStatsRow>())?;
    m.add("STOP_STATE_BYTES", std::mem::size_of::<SpeckvStopState>())?;
    m.add("STOP_TIMES", SPECKV_STOP_TIMES)?;
    m.add("LOCKSTEP_MAX_ROWS", SPECKV_LOCKSTEP_MAX_ROWS)?;
    m.add(
        "FEATURE_ACCUM_BYTES",
        std::mem::size_of::<SpeckvFeatureAccum>(),
    )?;
    // Flag bits, from the C ABI (which asserts them equal to the kernels').
    for (name, v) in [
        ("ROW_NONFINITE", SPECKV_ROW_NONFINITE),
        ("ROW_ALL_MASKED", SPECKV_ROW_ALL_MASKED),
        ("ROW_BAD_TEMPERATURE", SPECKV_ROW_BAD_TEMPERATURE),
        ("ROW_BAD_INDEX", SPECKV_ROW_BAD_INDEX),
        ("STATS_SAMPLE", SPECKV_STATS_SAMPLE),
        ("STATS_ACCUMULATE", SPECKV_STATS_ACCUMULATE),
        ("STATS_ACCUM_RESET", SPECKV_STATS_ACCUM_RESET),
        ("VERIFY_NONFINITE", SPECKV_VERIFY_NONFINITE),
        ("VERIFY_ALL_MASKED", SPECKV_VERIFY_ALL_MASKED),
        ("VERIFY_BAD_GAMMA", SPECKV_VERIFY_BAD_GAMMA),
        ("VERIFY_BAD_TOKEN", SPECKV_VERIFY_BAD_TOKEN),
        ("VERIFY_BAD_TEMPERATURE", SPECKV_VERIFY_BAD_TEMPERATURE),
        ("VERIFY_BAD_DRAFT", SPECKV_VERIFY_BAD_DRAFT),
        ("GAMMA_EMPTY", SPECKV_GAMMA_EMPTY),
        ("GAMMA_FLAGGED_ROWS", SPECKV_GAMMA_FLAGGED_ROWS),
        ("GAMMA_NONFINITE", SPECKV_GAMMA_NONFINITE),
    ] {
        m.add(name, v)?;
    }
    Ok(())
}

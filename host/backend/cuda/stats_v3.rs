//! `softmax_stats_v3` on the device: a batch's rows, each with its own options and accumulator,
//! in one launch — over logits a forward pass left on the device, or over host logits.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use speckv_kernels::params::{FeatureAccum, RowStats, SoftmaxStatsV3Params, StatsRow, StatsState};
use speckv_kernels::softmax_stats::PlanV2;

use super::{CudaBackend, KernelFn};
use crate::error::{Error, Result};
use crate::stats::{check_stats_rows, fill_stats_rows, Dtype, Logits, StatsOptions};

const DESC: usize = std::mem::size_of::<StatsRow>();
const ACCUM: usize = std::mem::size_of::<FeatureAccum>();
const STATS: usize = std::mem::size_of::<RowStats>();

/// Buffers for the statistics of up to `cap` rows per launch, kept across calls. A call of n rows
/// packs `[StatsRow × n | FeatureAccum × n | RowStats × n]` at the start of `io`, so the
/// descriptions and accumulators go up in one copy and the accumulators and statistics come
/// back in one.
pub struct ResidentRows {
    io: CudaSlice<u8>,
    partials: CudaSlice<u8>,
    counters: CudaSlice<u32>,
    cap: usize,
    vocab: usize,
    desc: Vec<StatsRow>,
    staging: Vec<u8>,
}

impl CudaBackend {
    /// Buffers for launches of up to `cap` rows of `vocab` f32 logits: the scratch is the most
    /// any row count up to `cap` plans.
    pub fn resident_rows(&self, cap: usize, vocab: usize) -> Result<ResidentRows> {
        let most = (1..=cap.max(1))
            .map(|n| n * self.plan_v3(n, vocab, Dtype::F32).splits as usize)
            .max()
            .unwrap_or(1);
        Ok(ResidentRows {
            io: self
                .stream
                .alloc_zeros::<u8>(cap.max(1) * (DESC + ACCUM + STATS))?,
            partials: self
                .stream
                .alloc_zeros::<u8>(most * std::mem::size_of::<StatsState>())?,
            counters: self.stream.alloc_zeros::<u32>(cap.max(1))?,
            cap,
            vocab,
            desc: Vec::with_capacity(cap),
            staging: Vec::with_capacity(cap * (DESC + ACCUM + STATS)),
        })
    }

    fn plan_v3(&self, rows: usize, vocab: usize, dtype: Dtype) -> PlanV2 {
        crate::plan::softmax_stats_v3(rows as u32, vocab as u32, dtype, self.sm_count).1
    }

    /// The statistics of `rows` of `logits` (f32 rows of `r`'s vocabulary on the device), row k
    /// with `opts[k]` and `accums[k]` updated as they say, into `out` (cleared first): one copy
    /// up, one `softmax_stats_v3` launch, one copy back. No logits row crosses the bus.
    pub fn rows_stats_resident(
        &self,
        r: &mut ResidentRows,
        logits: &CudaSlice<f32>,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
        out: &mut Vec<RowStats>,
    ) -> Result<()> {
        out.clear();
        let n = self.rows_upload(r, logits, rows, opts, accums)?;
        if n == 0 {
            return Ok(());
        }
        self.rows_launch(r, logits, n)?;
        let st = &self.stream;
        r.staging.resize(n * (ACCUM + STATS), 0);
        st.memcpy_dtoh(
            &r.io.slice(n * DESC..n * (DESC + ACCUM + STATS)),
            &mut r.staging[..],
        )?;
        let (a, s) = r.staging.split_at(n * ACCUM);
        bytemuck::cast_slice_mut::<FeatureAccum, u8>(accums).copy_from_slice(a);
        out.resize(n, RowStats::default());
        bytemuck::cast_slice_mut::<RowStats, u8>(&mut out[..]).copy_from_slice(s);
        Ok(())
    }

    /// Checks a call and uploads its descriptions and accumulators; returns the rows.
    fn rows_upload(
        &self,
        r: &mut ResidentRows,
        logits: &CudaSlice<f32>,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &[FeatureAccum],
    ) -> Result<usize> {
        let (n, v) = (rows.len(), r.vocab);
        check_stats_rows(rows, opts, accums.len(), logits.len() / v.max(1))?;
        if n > r.cap {
            return Err(Error::Other(format!(
                "{n} rows in one statistics launch whose buffers hold {}",
                r.cap
            )));
        }
        if n > 0 {
            fill_stats_rows(rows, opts, &mut r.desc);
            r.staging.clear();
            r.staging.extend_from_slice(bytemuck::cast_slice(&r.desc));
            r.staging.extend_from_slice(bytemuck::cast_slice(accums));
            self.stream
                .memcpy_htod(&r.staging[..], &mut r.io.slice_mut(..n * (DESC + ACCUM)))?;
        }
        Ok(n)
    }

    /// One v3 launch over the `n` rows [`CudaBackend::rows_upload`] put in `r` (1 ≤ n ≤ cap).
    fn rows_launch(&self, r: &mut ResidentRows, logits: &CudaSlice<f32>, n: usize) -> Result<()> {
        let (st, v) = (&self.stream, r.vocab);
        let plan = self.plan_v3(n, v, Dtype::F32);
        let (lp, _g1) = logits.device_ptr(st);
        let (io, _g2) = r.io.device_ptr_mut(st);
        let (pp, _g3) = r.partials.device_ptr_mut(st);
        let (cp, _g4) = r.counters.device_ptr_mut(st);
        let params = SoftmaxStatsV3Params {
            logits: lp as *const u8,
            out: (io + (n * (DESC + ACCUM)) as u64) as *mut RowStats,
            accum: (io + (n * DESC) as u64) as *mut FeatureAccum,
            partials: pp as *mut StatsState,
            counters: cp as *mut u32,
            row_params: io as *const StatsRow,
            rows: n as u32,
            logit_rows: (logits.len() / v) as u32,
            vocab: v as u32,
            row_stride: v as u32,
            accum_slots: n as u32,
            splits: plan.splits,
            chunk_vecs: plan.chunk_vecs,
            _pad: 0,
        };
        // SAFETY: `rows_upload` checked the n descriptions (rows of `logits`, distinct slots
        // 0..n) and put them and the accumulators in `io` at the offsets above (each 4- or 8-byte
        // aligned: 40 · n and 64 · n bytes in); n ≤ cap, so the scratch holds what the plan
        // needs, and every launch leaves its counters zero; the caller keeps the buffers alive
        // until the stream has passed the launch.
        unsafe { self.launch_stats_v3(Dtype::F32, params, &plan) }
    }

    /// Mean time of the statistics of `rows` of f32 `logits` (uploaded once), each row with its
    /// options, cold L2, launches only: v3's one launch (`one_launch`), or v2's one launch per
    /// row as batched decoding made them before v3. The copies around them are one each way in
    /// both, so not timed.
    pub fn time_rows_stats(
        &self,
        logits: &Logits<'_>,
        rows: &[usize],
        opts: &[StatsOptions],
        iters: u32,
        one_launch: bool,
    ) -> Result<std::time::Duration> {
        let crate::stats::LogitsData::F32(x) = logits.data() else {
            return Err(Error::Other(
                "batched row statistics are timed on f32 logits, as the forward pass leaves them"
                    .to_string(),
            ));
        };
        let (n, v) = (rows.len(), logits.vocab());
        let accums = vec![FeatureAccum::EMPTY; n];
        let d_logits = self.stream.clone_htod(x)?;
        if one_launch {
            let mut r = self.resident_rows(n, v)?;
            let n = self.rows_upload(&mut r, &d_logits, rows, opts, &accums)?;
            return self.time_cold(iters, || self.rows_launch(&mut r, &d_logits, n));
        }
        check_stats_rows(rows, opts, n, logits.rows())?;
        let mut r = self.resident_stats(v)?;
        let mut out = self.stream.alloc_zeros::<u32>(n.max(1) * STATS / 4)?;
        let mut acc = self.stream.alloc_zeros::<u32>(n.max(1) * ACCUM / 4)?;
        self.time_cold(iters, || {
            for (k, (&row, o)) in rows.iter().zip(opts).enumerate() {
                self.stats_enqueue(&mut r, &d_logits, row, o, &mut out, k, &mut acc, k)?;
            }
            Ok(())
        })
    }

    /// Statistics of host logits by the v3 kernel (uploads, launches, downloads): launch row k
    /// reads logits row `rows[k]` with `opts[k]` and updates `accums[k]`.
    pub fn softmax_stats_v3(
        &self,
        logits: &Logits<'_>,
        rows: &[usize],
        opts: &[StatsOptions],
        accums: &mut [FeatureAccum],
    ) -> Result<Vec<RowStats>> {
        check_stats_rows(rows, opts, accums.len(), logits.rows())?;
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut desc = Vec::with_capacity(n);
        fill_stats_rows(rows, opts, &mut desc);
        let st = &self.stream;
        let d_logits = st.clone_htod(logits.data().bytes())?;
        let d_desc = st.clone_htod(bytemuck::cast_slice::<StatsRow, u8>(&desc))?;
        let mut d_accum = st.clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accums))?;
        let mut d_out = st.alloc_zeros::<u8>(n * STATS)?;
        let plan = self.plan_v3(n, logits.vocab(), logits.dtype());
        let mut partials =
            st.alloc_zeros::<u8>(n * plan.splits as usize * std::mem::size_of::<StatsState>())?;
        let mut counters = st.alloc_zeros::<u32>(n)?;
        {
            let (lp, _g1) = d_logits.device_ptr(st);
            let (dp, _g2) = d_desc.device_ptr(st);
            let (ap, _g3) = d_accum.device_ptr_mut(st);
            let (op, _g4) = d_out.device_ptr_mut(st);
            let (pp, _g5) = partials.device_ptr_mut(st);
            let (cp, _g6) = counters.device_ptr_mut(st);
            let params = SoftmaxStatsV3Params {
                logits: lp as *const u8,
                out: op as *mut RowStats,
                accum: ap as *mut FeatureAccum,
                partials: pp as *mut StatsState,
                counters: cp as *mut u32,
                row_params: dp as *const StatsRow,
                rows: n as u32,
                logit_rows: logits.rows() as u32,
                vocab: logits.vocab() as u32,
                row_stride: logits.row_stride() as u32,
                accum_slots: n as u32,
                splits: plan.splits,
                chunk_vecs: plan.chunk_vecs,
                _pad: 0,
            };
            // SAFETY: every buffer was sized from the checked shapes just above (the logits
            // cover `logit_rows` rows, one description, accumulator, result and counter per
            // launch row, the plan's partials) and lives past the synchronising downloads.
            unsafe { self.launch_stats_v3(logits.dtype(), params, &plan) }?;
        }
        let out: Vec<u8> = st.clone_dtoh(&d_out)?;
        let acc: Vec<u8> = st.clone_dtoh(&d_accum)?;
        bytemuck::cast_slice_mut::<FeatureAccum, u8>(accums).copy_from_slice(&acc);
        if st.clone_dtoh(&counters)?.iter().any(|&c| c != 0) {
            return Err(Error::Other(
                "softmax_stats_v3 left its arrival counters non-zero".to_string(),
            ));
        }
        Ok(bytemuck::pod_collect_to_vec(&out))
    }

    /// # Safety
    /// `params` must satisfy [`speckv_kernels::softmax_stats::softmax_stats_v3`]'s contract for
    /// `plan` in `dtype`.
    pub(super) unsafe fn launch_stats_v3(
        &self,
        dtype: Dtype,
        params: SoftmaxStatsV3Params,
        plan: &PlanV2,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.launch_planned(KernelFn::SoftmaxStatsV3(dtype), params, plan) }
    }
}

//! Per-token stopping fused into `softmax_stats_v2` on the device (`STATS_STOP`): one launch per
//! drafted position, the stop states and γ_b kept in device memory between launches.

use cudarc::driver::{DevicePtr, DevicePtrMut};
use speckv_kernels::params::{
    FeatureAccum, LockstepScratch, MlpWeights, RowStats, StopParams, StopState, STATS_STOP,
    STOP_TIMES,
};

use super::stats::PodStop;
use super::CudaBackend;
use crate::backend::emulate::{StatsV2Output, Stop};
use crate::error::Result;
use crate::stats::{check_accum, stats_params, Logits, StatsOptions};

impl CudaBackend {
    /// `softmax_stats_v2` with per-token stopping in its epilogue: one row per sequence, its draft
    /// just computed. Returns what [`crate::backend::emulate::Emulator::softmax_stats_v2_stop`]
    /// returns: statistics, accumulators (`accum` is updated), γ_b in `gammas`, the states after
    /// the launch and how many sequences stopped in it.
    pub fn softmax_stats_stop(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum],
        stop: Stop<'_>,
    ) -> Result<StatsV2Output> {
        opts.validate()?;
        check_accum(Some(accum.len()), logits.rows(), opts)?;
        let rows = logits.rows();
        stop.check(rows, opts)?;
        let st = &self.stream;
        let (_, plan) = crate::plan::softmax_stats_v2(
            rows as u32,
            logits.vocab() as u32,
            logits.dtype(),
            self.sm_count,
        );
        let lg = st.clone_htod(logits.data().bytes())?;
        let mut out = st.alloc_zeros::<u8>(rows * std::mem::size_of::<RowStats>())?;
        let mut acc = st.clone_htod(bytemuck::cast_slice::<FeatureAccum, u8>(accum))?;
        let w = st.clone_htod(bytemuck::bytes_of(stop.weights))?;
        let mut state = st.clone_htod(bytemuck::cast_slice::<StopState, u8>(stop.state))?;
        let kept: Vec<i32> = stop.state.iter().map(|s| s.kept as i32).collect();
        let mut gammas = st.clone_htod(&kept)?;
        let mut stopped = st.alloc_zeros::<u32>(1)?;
        let mut hazards = st.clone_htod(&vec![f32::NAN; rows * STOP_TIMES])?;
        let mut lockstep = st.alloc_zeros::<u8>(std::mem::size_of::<LockstepScratch>())?;
        let scales = stop.odds_scales.map(|k| st.clone_htod(k)).transpose()?;
        let mut scratch = super::stats::StatsScratch::new(self, rows, &plan)?;
        {
            let (wp, _g0) = w.device_ptr(st);
            let (sp, _g1) = state.device_ptr_mut(st);
            let (gp, _g2) = gammas.device_ptr_mut(st);
            let (cp, _g3) = stopped.device_ptr_mut(st);
            let (hp, _g8) = hazards.device_ptr_mut(st);
            let (kp, _g9) = lockstep.device_ptr_mut(st);
            let kk = scales.as_ref().map(|k| k.device_ptr(st));
            let params = StopParams {
                weights: wp as *const MlpWeights,
                state: sp as *mut StopState,
                gammas_out: gp as *mut i32,
                stopped_count: cp as *mut u32,
                hazards_out: hp as *mut f32,
                costs: stop.costs,
                gamma_max: stop.gamma_max,
                compression_code: stop.compression_code,
                odds_scale: stop.odds_scale,
                lockstep: if stop.lockstep {
                    kp as *mut LockstepScratch
                } else {
                    std::ptr::null_mut()
                },
                odds_scales: kk
                    .as_ref()
                    .map_or(std::ptr::null(), |(p, _)| *p as *const f32),
            };
            let pbuf = st.clone_htod(bytemuck::bytes_of(&PodStop(params)))?;
            let (pp, _g4) = pbuf.device_ptr(st);
            let (lp, _g5) = lg.device_ptr(st);
            let (op, _g6) = out.device_ptr_mut(st);
            let (ap, _g7) = acc.device_ptr_mut(st);
            let base = stats_params(
                logits,
                opts,
                lp as *const u8,
                op as *mut RowStats,
                ap as *mut FeatureAccum,
            );
            let mut p2 = scratch.params(st, base, &plan);
            p2.flags |= STATS_STOP;
            p2.stop = pp as *const StopParams;
            // SAFETY: logits, outputs, accumulators, states and γ_b have `rows` entries (at most
            // `LOCKSTEP_MAX_ROWS` in lockstep: `Stop::check`), so do the odds scales where given
            // (`Stop::check`), the lockstep scratch is zeroed, the
            // statistics scratch the plan's size, the parameters one `StopParams` pointing at them and at one
            // `MlpWeights`; all live to the end of this function (the copies below synchronise).
            unsafe { self.launch_stats_v2(logits.dtype(), p2, &plan) }?;
        }
        let stats: Vec<RowStats> = bytemuck::pod_collect_to_vec(&st.clone_dtoh(&out)?);
        let a: Vec<FeatureAccum> = bytemuck::pod_collect_to_vec(&st.clone_dtoh(&acc)?);
        accum.copy_from_slice(&a);
        scratch.check_counters(st)?;
        Ok(StatsV2Output {
            stats,
            accum: Some(a),
            gammas: Some(st.clone_dtoh(&gammas)?),
            expected: None,
            gamma_flags: None,
            stop_state: Some(bytemuck::pod_collect_to_vec(&st.clone_dtoh(&state)?)),
            stopped_count: st.clone_dtoh(&stopped)?.first().copied(),
            hazards: Some(st.clone_dtoh(&hazards)?),
        })
    }
}

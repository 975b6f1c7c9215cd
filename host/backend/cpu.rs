//! The native CPU backend: every kernel's CPU twin (`stats::cpu`, `verify::cpu`, the GEMV in
//! `weights::gemv`) on rayon's thread pool. Not the emulator: same results as the kernels, its own
//! fast code.

use speckv_kernels::params::{FeatureAccum, RowStats, StopState, STOP_TIMES};
use speckv_kernels::stop_rule;

use crate::backend::emulate::{StatsV2Output, Stop};
use crate::controller::batch_auto::decide_batch;
use crate::error::Result;
use crate::stats::cpu::StatsScratch;
use crate::stats::{self, Logits, StatsOptions};
use crate::verify::{self, VerifyBatch, VerifyOutput};

/// The native CPU backend.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            threads: rayon::current_num_threads(),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// A description of the CPU, e.g. "AMD EPYC 7B13 (2 threads, avx2)".
    pub fn device_name(&self) -> String {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        format!(
            "{model} ({} threads{})",
            self.threads,
            if stats::cpu::has_avx2() { ", avx2" } else { "" }
        )
    }

    /// Statistics of every row; updates `accum` as `opts.accumulate` says.
    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        stats::cpu::softmax_stats(self.threads, logits, opts, accum)
    }

    /// Statistics of every row with the per-token stopping rule after each (one row per
    /// sequence, its draft just computed): what `softmax_stats_v2`'s `STATS_STOP` epilogue does, and
    /// what [`crate::backend::emulate::Emulator::softmax_stats_v2_stop`] returns. A step's first
    /// draft (`Accumulate::Reset`) starts every sequence from [`StopState::START`]; a sequence that
    /// has stopped keeps its accumulator, state and γ_b. With `stop.lockstep` the sequences decide
    /// together, as the kernel's lockstep epilogue does.
    pub fn softmax_stats_stop(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: &mut [FeatureAccum],
        stop: Stop<'_>,
    ) -> Result<StatsV2Output> {
        let rows = logits.rows();
        stop.check(rows, opts)?;
        let before = accum.to_vec();
        let stats = self.softmax_stats(logits, opts, Some(&mut *accum))?;
        let reset = opts.accumulate == stats::Accumulate::Reset;
        let mut states = stop.state.to_vec();
        let mut gammas: Vec<i32> = states.iter().map(|s| s.kept as i32).collect();
        let mut stopped = 0;
        let mut hazards = vec![f32::NAN; rows * STOP_TIMES];
        if reset {
            states.fill(StopState::START);
        }
        let odds = |r: usize| stop.odds_scales.map_or(stop.odds_scale, |k| k[r]);
        if stop.lockstep {
            // `softmax_stats_v2`'s lockstep epilogue: every sequence's hazard, then one decision for
            // the batch (`Stop::check` refused states that do not move together).
            if states.iter().any(|s| s.stopped != 0) {
                accum.copy_from_slice(&before); // the batch stopped at an earlier draft
            } else if let Some(first) = states.first() {
                let j = first.kept;
                let gmax = stop.gamma_max.min(STOP_TIMES as u32 - 1);
                let h: Vec<f32> = (0..rows)
                    .map(|r| {
                        let x = stop_rule::features(
                            stats[r].entropy,
                            stats[r].confidence,
                            &accum[r],
                            stop.compression_code,
                            j,
                        );
                        stop_rule::hazard(stop.weights, &x, odds(r))
                    })
                    .collect();
                // `generate`'s batched rule: the comparison the kernel runs, applied to every state.
                let costs = &stop.costs;
                let verdict = decide_batch(&mut states, &h, j, gmax, costs.draft, |g| {
                    costs.verify.get(g as usize).copied().unwrap_or(f32::NAN)
                });
                for (r, s) in states.iter().enumerate() {
                    if verdict.keep {
                        hazards[r * STOP_TIMES + j as usize] = h[r];
                    }
                    gammas[r] = s.kept as i32;
                    stopped += s.stopped;
                }
            }
        } else {
            for (r, s) in states.iter_mut().enumerate() {
                if s.stopped != 0 {
                    accum[r] = before[r];
                    continue;
                }
                let j = s.kept as usize;
                let d = stop_rule::decide_host(
                    stop.weights,
                    s,
                    &accum[r],
                    stats[r].entropy,
                    stats[r].confidence,
                    stop.compression_code,
                    odds(r),
                    stop.gamma_max,
                    &stop.costs,
                );
                if d.keep {
                    hazards[r * STOP_TIMES + j] = d.hazard;
                }
                gammas[r] = s.kept as i32;
                stopped += s.stopped;
            }
        }
        Ok(StatsV2Output {
            stats,
            accum: Some(accum.to_vec()),
            gammas: Some(gammas),
            expected: None,
            gamma_flags: None,
            stop_state: Some(states),
            stopped_count: Some(stopped),
            hazards: Some(hazards),
        })
    }

    /// The statistics of the described rows (`softmax_stats_v3`'s twin: each row its logits row,
    /// seed, step, stream, temperature, flags and accumulator slot), launch row k at `out[k]`.
    pub fn softmax_stats_rows(
        &self,
        logits: &Logits<'_>,
        desc: &[speckv_kernels::params::StatsRow],
        accum: &mut [FeatureAccum],
    ) -> Result<Vec<RowStats>> {
        stats::rows::softmax_stats_rows(self.threads, logits, desc, accum)
    }

    /// [`CpuBackend::softmax_stats`] into `scratch` (no allocation once it has held as many rows).
    pub fn softmax_stats_into<'s>(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
        scratch: &'s mut StatsScratch,
    ) -> Result<&'s [RowStats]> {
        stats::cpu::softmax_stats_into(self.threads, logits, opts, accum, scratch)
    }

    /// Batched verification (see [`crate::verify`]).
    pub fn verify(&self, v: &VerifyBatch<'_>) -> Result<VerifyOutput> {
        v.validate()?;
        Ok(verify::cpu::verify(v))
    }

    /// [`CpuBackend::verify`] into `out`, reusing its buffers (a batch of one allocates nothing).
    pub fn verify_into(&self, v: &VerifyBatch<'_>, out: &mut VerifyOutput) -> Result<()> {
        v.validate()?;
        verify::cpu::verify_into(v, out);
        Ok(())
    }
}

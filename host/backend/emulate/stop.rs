//! The per-token stopping rule's inputs to a `softmax_stats_v2` launch (`STATS_STOP`), and what
//! every backend checks of them before it launches.

use speckv_kernels::params::{MlpWeights, StepCosts, StopState, LOCKSTEP_MAX_ROWS};

use crate::error::{Error, Result};
use crate::stats::StatsOptions;

/// Per-token stopping fused into `softmax_stats_v2` (`STATS_STOP`): the hazard model, each
/// sequence's state before the launch, the step times and γmax.
#[derive(Clone, Copy)]
pub struct Stop<'a> {
    pub weights: &'a MlpWeights,
    pub state: &'a [StopState],
    pub costs: StepCosts,
    pub gamma_max: u32,
    pub compression_code: f32,
    /// The online calibration's odds scale (1: the model as trained), for every sequence unless
    /// `odds_scales` is given.
    pub odds_scale: f32,
    /// One odds scale per sequence (each sequence's own calibration, `StopParams::odds_scales`),
    /// or `None`: `odds_scale` for all.
    pub odds_scales: Option<&'a [f32]>,
    /// The sequences draft in lockstep and decide together (`StopParams::lockstep`); false: each
    /// alone.
    pub lockstep: bool,
}

impl Stop<'_> {
    /// What every backend checks before a launch with per-token stopping over `rows` sequences:
    /// [`crate::stats::check_stop`], one state per sequence, and odds scales that are finite and
    /// positive (one per sequence where given).
    pub fn check(&self, rows: usize, opts: &StatsOptions) -> Result<()> {
        crate::stats::check_stop(opts, self.gamma_max)?;
        if self.state.len() != rows {
            return Err(Error::Other(format!(
                "{} stop states for {rows} rows",
                self.state.len()
            )));
        }
        let positive = |k: f32| k.is_finite() && k > 0.0;
        match self.odds_scales {
            Some(k) if k.len() != rows => {
                return Err(Error::Other(format!(
                    "{} odds scales for {rows} sequences",
                    k.len()
                )))
            }
            Some(k) => {
                if let Some(b) = k.iter().position(|&x| !positive(x)) {
                    return Err(Error::Other(format!(
                        "sequence {b}'s odds scale must be finite and > 0, got {}",
                        k[b]
                    )));
                }
            }
            None if !positive(self.odds_scale) => {
                return Err(Error::Other(format!(
                    "the odds scale must be finite and > 0, got {}",
                    self.odds_scale
                )))
            }
            None => {}
        }
        if self.lockstep {
            if rows > LOCKSTEP_MAX_ROWS {
                return Err(Error::Other(format!(
                    "{rows} sequences in lockstep: one decision covers at most {LOCKSTEP_MAX_ROWS}"
                )));
            }
            // Lockstep states move together; others were not made by a lockstep launch (without
            // `Accumulate::Reset`, which starts them all afresh, they are read as they are).
            let first = self.state.first().copied().unwrap_or(StopState::START);
            let apart = self
                .state
                .iter()
                .any(|s| s.stopped != first.stopped || s.kept != first.kept);
            if apart && opts.accumulate != crate::stats::Accumulate::Reset {
                return Err(Error::Other(
                    "lockstep states differ in their drafts kept or stopped: they were not left by \
                     a lockstep launch (start the step with accumulate Reset)"
                        .to_string(),
                ));
            }
        }
        Ok(())
    }
}

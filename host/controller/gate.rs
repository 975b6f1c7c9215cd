//! The gate before a step of `auto`: speculate at all, or take a plain step (one target pass)?
//! It compares the best speculative step, with every later hazard taken equal to a moving average
//! of first-draft hazards, against a plain step under the measured costs, and probes now and then
//! to keep that average current: on a [`ProbeSchedule`] that backs off while probes lose, and not
//! at all while even drafts all accepted could not pay ([`speculation_could_pay`]). One sequence's
//! gate is [`PlainGate`]; a batch's (`controller::batch_auto`) sums the same comparison over its
//! sequences and shares the schedule.

use speckv_kernels::params::StepCosts;
use speckv_kernels::stop_rule;

use crate::controller::stop::MAX_GAMMA;

/// Whether a batched step should speculate, from each sequence's moving average of first-draft
/// hazards `first` (summed over the sequences; [`PlainGate`]'s comparison is this with one): the
/// best γ ≥ 1, every later hazard taken equal to the first, against a plain step (one target
/// pass emitting a token per sequence).
pub fn speculate_batch(first: &[f64], costs: &StepCosts, gamma_max: usize) -> bool {
    if gamma_max == 0 {
        return false;
    }
    let n = first.len().min(crate::weights::gemv::MAX_M);
    let plain = n as f64 / costs.verify[0] as f64;
    let mut a = [1f64; crate::weights::gemv::MAX_M];
    let (mut tokens, mut best) = (n as f64, f64::NEG_INFINITY);
    let top = gamma_max.min(MAX_GAMMA) + 1;
    for (g, &v) in costs.verify.iter().enumerate().take(top).skip(1) {
        let mut gain = 0.0;
        for (ai, &h) in a.iter_mut().zip(first).take(n) {
            *ai *= h;
            gain += *ai;
        }
        tokens += gain;
        best = best.max(tokens / (g as f64 * costs.draft as f64 + v as f64));
    }
    best > plain
}

/// Whether speculating could beat a plain step at all under `costs`, for `seqs` sequences:
/// [`speculate_batch`] with every draft as likely accepted as the rule lets a hazard be
/// ([`stop_rule::HAZARD_CEIL`]). When it could not, no first-draft hazard a probe might measure
/// would change the gate's decision, so the gate does not probe: a probe would only pay for the
/// draft's catch-up, its drafts and a wider verification.
pub fn speculation_could_pay(seqs: usize, costs: &StepCosts, gamma_max: usize) -> bool {
    let best = [stop_rule::HAZARD_CEIL as f64; crate::weights::gemv::MAX_M];
    speculate_batch(&best[..seqs.min(best.len())], costs, gamma_max)
}

/// After this many plain steps in a row, the gate speculates once to keep its estimate current
/// (when [`speculation_could_pay`]); after each probe it rejects again, it waits twice as long.
pub const PROBE_EVERY: usize = 4;

/// The most plain steps between two probes whose predecessors kept losing.
pub const MAX_PROBE_EVERY: usize = 64;

/// When the gate probes: after [`PROBE_EVERY`] plain steps in a row, doubled after every probe
/// the gate's comparison still rejects, up to [`MAX_PROBE_EVERY`], and back to [`PROBE_EVERY`]
/// once it speculates on its own. Each probe costs a catch-up of the draft on the tokens it
/// skipped (up to its window), its drafts and a wider verification, so a probe that keeps losing
/// is made rarer. One schedule serves a single sequence ([`PlainGate`]) and a batch
/// (`BatchAuto`), so a batch of one probes as one sequence does.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSchedule {
    plain_run: usize,
    every: usize,
    /// The last step was a probe.
    probed: bool,
}

impl Default for ProbeSchedule {
    fn default() -> ProbeSchedule {
        ProbeSchedule {
            plain_run: 0,
            every: PROBE_EVERY,
            probed: false,
        }
    }
}

impl ProbeSchedule {
    /// Whether this step speculates, given whether the gate's comparison says it `wins` and
    /// whether speculation `could_pay` at all ([`speculation_could_pay`]).
    pub fn speculate(&mut self, wins: bool, could_pay: bool) -> bool {
        if wins {
            self.every = PROBE_EVERY;
        } else if self.probed {
            self.every = (self.every * 2).min(MAX_PROBE_EVERY);
        }
        self.probed = false;
        if wins {
            self.plain_run = 0;
            true
        } else if self.plain_run >= self.every && could_pay {
            self.plain_run = 0;
            self.probed = true;
            true
        } else {
            self.plain_run = self.plain_run.saturating_add(1);
            false
        }
    }

    /// A plain step taken outside the schedule (a batch measuring its plain step).
    pub fn plain_step(&mut self) {
        self.plain_run = self.plain_run.saturating_add(1);
    }

    /// Plain steps the gate now waits before a probe.
    pub fn probe_every(&self) -> usize {
        self.every
    }
}

/// Whether a step should speculate at all, decided before it drafts (a step whose rule stops before
/// its first draft has already paid for that draft): speculate when the best γ ≥ 1, with a
/// constant hazard equal to a moving average of recent first-draft hazards, promises more tokens
/// per second than a plain step (one target pass, `verify(0)`), and probe on a
/// [`ProbeSchedule`] otherwise. It does not count the draft catching up on the tokens of plain
/// steps (one pass, paid when speculation resumes, and left out of the draft's measured cost:
/// `hazard::DraftTime::measured`), so after plain steps it leans towards speculating; the probe
/// schedule bounds how often that pass is paid.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainGate {
    first_hazard: Option<f64>,
    probes: ProbeSchedule,
}

impl PlainGate {
    pub fn speculate(&mut self, costs: &StepCosts, gamma_max: usize) -> bool {
        let Some(h) = self.first_hazard else {
            return true;
        };
        if gamma_max == 0 {
            return false;
        }
        let wins = speculate_batch(&[h], costs, gamma_max);
        // Only a step the comparison rejects needs to know whether drafts could pay at all.
        let could_pay = wins || speculation_could_pay(1, costs, gamma_max);
        self.probes.speculate(wins, could_pay)
    }

    /// A plain step taken outside the schedule (measuring a plain step's cost).
    pub fn plain_step(&mut self) {
        self.probes.plain_step();
    }

    /// The moving average of first-draft hazards (`None` before the first).
    pub fn first_hazard(&self) -> Option<f64> {
        self.first_hazard
    }

    /// The hazard of a step's first draft.
    pub fn observe_first(&mut self, h: f64) {
        if h.is_finite() {
            self.first_hazard = Some(self.first_hazard.map_or(h, |v| v + 0.3 * (h - v)));
        }
    }
}

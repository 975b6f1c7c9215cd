//! The `auto` policy replayed on full-information traces (`speckv profile`: every step drafted
//! γmax tokens, each draft's entropy and confidence recorded with the step's accepted count), under
//! a fixed cost model: what `auto` would have emitted and spent on the very steps the trace oracle
//! and the fixed-γ sweep are computed on. The whole policy runs — the stopping rule, the online
//! calibration and the plain-step gate, restarted for every prompt as `generate` restarts them —
//! with the costs held at the model's (no timing noise).

use std::collections::BTreeMap;

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::controller::hazard::{draft_values, trace_steps, AutoState, DraftTime, HazardModel};
use crate::controller::records::TraceRow;
use crate::controller::CostModel;
use crate::error::{Error, Result};

/// The command line's catch-up window (`--draft-catch-up`): 8 tokens a sequence, so a batch of 8
/// catches up in at most 4 passes of 16 rows however long it decoded plain. Measured on this
/// project's CPU (README, "The draft's catch-up window"): it halves what `auto`'s batched probes
/// feed the draft at 128 tokens and cuts it to about a quarter at 256; where drafts are mostly
/// accepted (the Qwen pair, B = 4) acceptance with it was no lower than without, while a window of
/// 2 lowered it.
pub const DRAFT_CATCH_UP: usize = 8;

/// What the draft has yet to be fed before a step's first draft, as the decode loop keeps it
/// (`decode::speculative`'s backlog): the pending token; the last draft of a fully accepted step
/// whose drafting stopped on it (so never fed it); the tokens of plain steps; at most `window` of
/// them (the catch-up window). The replays charge a step's first draft pass this many tokens
/// ([`CostModel::draft_feed`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftLag {
    unseen: usize,
    window: Option<usize>,
}

impl DraftLag {
    /// After the prompt's prefill: the pending token alone.
    pub fn new(window: Option<usize>) -> DraftLag {
        DraftLag { unseen: 1, window }
    }

    /// Tokens the next step's first draft pass feeds.
    pub fn first_feed(&self) -> usize {
        self.window
            .map_or(self.unseen, |w| self.unseen.min(w.max(1)))
    }

    /// After a step of `passes` draft passes (0: a plain step) that verified `gamma` drafts, of
    /// which `accepted` were accepted.
    pub fn after_step(&mut self, passes: usize, gamma: usize, accepted: usize) {
        self.unseen = if passes == 0 {
            self.first_feed() + 1
        } else {
            1 + usize::from(gamma > 0 && accepted >= gamma && passes == gamma)
        };
    }
}

/// What the replay produced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Replay {
    pub tokens_per_second: f64,
    pub mean_gamma: f64,
    /// Steps the gate made plain.
    pub plain_steps: usize,
    pub steps: usize,
}

/// Replays `auto` with `model` on trace rows (grouped by run, prompt and step, in file order).
/// Tokens per second use `cost`'s milliseconds: a step of n draft passes that verifies γ costs
/// its draft phase (the first pass feeding what the draft has yet to see, [`DraftLag`] with the
/// command line's window, the others a token each) + verify(γ); a plain step verify(0). `auto`
/// measures the draft on those passes as it does live ([`DraftTime::measured`]).
pub fn auto_on_traces(rows: &[TraceRow], model: &HazardModel, cost: &CostModel) -> Result<Replay> {
    let prompts = prompt_steps(rows)?;
    let (mut tokens, mut ms, mut gammas) = (0.0f64, 0.0f64, 0usize);
    let (mut plain, mut steps) = (0usize, 0usize);
    for step_rows in prompts.values() {
        let mut auto = AutoState::new(model, cost.clone());
        let mut lag = DraftLag::new(Some(DRAFT_CATCH_UP));
        for step in step_rows {
            let gmax = step.len();
            let accepted = step[0].trace_accepted as usize;
            let compression = step[0].compression;
            let (costs, g_allowed, mut rule) = auto.begin_step(gmax);
            let mut accum = FeatureAccum::EMPTY;
            let (mut gamma, mut forwards) = (0usize, 0usize);
            for n in 0..g_allowed {
                let (e, c) = draft_values(step, n);
                let st = RowStats {
                    entropy: e as f32,
                    confidence: c as f32,
                    ..Default::default()
                };
                accum.push(st.entropy, st.confidence, 0);
                forwards += 1;
                let d = rule.decide(&auto.weights, &accum, &st, compression, &costs, g_allowed);
                auto.record(&d);
                gamma += d.keep as usize;
                if !d.more {
                    break;
                }
            }
            let first = lag.first_feed();
            let draft_ms = cost.draft_phase(forwards, first);
            let verify_ms = cost.verify(gamma as u32);
            let draft = DraftTime {
                passes: forwards,
                seconds: draft_ms,
                first_passes: forwards.min(1),
                first_seconds: cost.draft_phase(forwards.min(1), first),
                first_tokens: first,
            };
            auto.end_step(&draft, gamma, verify_ms, accepted.min(gamma));
            lag.after_step(forwards, gamma, accepted.min(gamma));
            tokens += (accepted.min(gamma) + 1) as f64;
            ms += draft_ms + verify_ms;
            gammas += gamma;
            plain += (g_allowed == 0) as usize;
            steps += 1;
        }
    }
    Ok(Replay {
        tokens_per_second: tokens / ms * 1e3,
        mean_gamma: gammas as f64 / steps as f64,
        plain_steps: plain,
        steps,
    })
}

/// HF transformers' default assisted-generation schedule (`num_assistant_tokens` 20, schedule
/// `constant`, `assistant_confidence_threshold` 0.4) replayed on trace rows under `cost`: a step
/// drafts until a draft's probability falls below `threshold` — that draft included, as HF's
/// `ConfidenceCriteria` stops after the token it judges — and at most the trace's γmax (HF allows
/// 20). HF also re-fits the threshold online (an ROC cost over past drafts, when scikit-learn is
/// installed); the replay holds it fixed. Steps cost as in [`auto_on_traces`].
pub fn threshold_on_traces(rows: &[TraceRow], cost: &CostModel, threshold: f64) -> Result<Replay> {
    let prompts = prompt_steps(rows)?;
    let (mut tokens, mut ms, mut gammas, mut steps) = (0.0f64, 0.0f64, 0usize, 0usize);
    for step_rows in prompts.values() {
        let mut lag = DraftLag::new(Some(DRAFT_CATCH_UP));
        for step in step_rows {
            let gmax = step.len();
            let gamma = (0..gmax)
                .find(|&n| draft_values(step, n).1 < threshold)
                .map_or(gmax, |n| n + 1);
            let accepted = (step[0].trace_accepted as usize).min(gamma);
            tokens += (accepted + 1) as f64;
            ms += cost.draft_phase(gamma, lag.first_feed()) + cost.verify(gamma as u32);
            lag.after_step(gamma, gamma, accepted);
            gammas += gamma;
            steps += 1;
        }
    }
    Ok(Replay {
        tokens_per_second: tokens / ms * 1e3,
        mean_gamma: gammas as f64 / steps as f64,
        plain_steps: 0,
        steps,
    })
}

/// Each (run, prompt)'s trace steps in order, a step its rows γ = 1..=γmax.
type PromptSteps<'a> = BTreeMap<(u32, usize), Vec<&'a [TraceRow]>>;

/// Trace steps (each its rows γ = 1..=γmax) per (run, prompt), in order; an error for a step
/// missing rows, or for no step at all.
fn prompt_steps(rows: &[TraceRow]) -> Result<PromptSteps<'_>> {
    let mut prompts = PromptSteps::new();
    for step in trace_steps(rows) {
        let r = &step[0];
        if step.len() as u32 != r.trace_gamma_max {
            return Err(Error::Other(format!(
                "trace rows of run {} prompt {} step {}: {} rows for γmax {} (a full-information \
                 trace lists every drafted position)",
                r.run,
                r.prompt,
                r.step,
                step.len(),
                r.trace_gamma_max
            )));
        }
        prompts.entry((r.run, r.prompt)).or_default().push(step);
    }
    if prompts.is_empty() {
        return Err(Error::Empty {
            what: "trace rows (no step to replay)",
        });
    }
    Ok(prompts)
}

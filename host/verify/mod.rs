//! Batched verification: inputs, validation and outputs, shared by every backend; the CPU twin of
//! the kernel is [`cpu`], the losslessness simulation [`sim`].

pub mod cpu;

use speckv_kernels::params::{VerifyParams, VERIFY_DRAFT_PROBS};

use crate::error::{Error, Result};
use crate::stats::{check_temperature, LogitsData, MAX_VOCAB};

/// The draft's distributions.
#[derive(Clone, Copy, Debug)]
pub enum DraftDist<'a> {
    /// Draft logits `[batch, γmax, vocab]` (same dtype as the target) and the draft temperature per
    /// sequence (0: the draft was greedy, q is one-hot at its argmax).
    Logits {
        data: LogitsData<'a>,
        temperature: &'a [f32],
    },
    /// Draft probabilities `[batch, γmax, vocab]`.
    Probs(&'a [f32]),
}

/// One verification launch: `batch` sequences, each with γ_b ≤ γmax drafted tokens.
#[derive(Clone, Copy, Debug)]
pub struct VerifyBatch<'a> {
    /// Target logits `[batch, γmax+1, vocab]`, rows `target_stride` elements apart.
    pub target: LogitsData<'a>,
    pub target_stride: usize,
    pub draft: DraftDist<'a>,
    /// Elements between draft rows.
    pub draft_stride: usize,
    /// `[batch, γmax]` drafted tokens (entries past γ_b are ignored).
    pub draft_tokens: &'a [i32],
    /// `[batch]` γ_b.
    pub gammas: &'a [i32],
    /// `[batch]` target temperature; 0 = greedy verification.
    pub target_temperature: &'a [f32],
    pub batch: usize,
    pub gamma_max: usize,
    pub vocab: usize,
    pub seed: u64,
    pub step: u64,
}

/// Most positions of one verification pass (the device passes' step, γmax + 1).
pub const MAX_VERIFY_POSITIONS: usize = 16;

/// What verifying one sequence's step needs besides the target's logits.
#[derive(Clone, Copy, Debug)]
pub struct VerifyStep<'a> {
    /// The γ drafted tokens.
    pub draft_tokens: &'a [i32],
    /// The draft's logits rows `[γ, vocab]`; `None` in greedy decoding, where verification never
    /// reads them (q is one-hot at the drafted token).
    pub draft_rows: Option<&'a [f32]>,
    /// Target and draft temperature; 0 = greedy.
    pub temperature: f32,
    pub seed: u64,
    /// The verification's Philox step.
    pub step: u64,
}

impl VerifyStep<'_> {
    /// A verification pass over `n` positions: the pending token and the γ drafts, in one chunk
    /// of at most 16 (checked before anything runs, so a refused step leaves the cache as it was).
    pub fn check_positions(&self, n: usize) -> Result<()> {
        let g = self.draft_tokens.len();
        if n != g + 1 || n > MAX_VERIFY_POSITIONS {
            return Err(Error::Other(format!(
                "verification of {g} drafts takes {} positions (at most {MAX_VERIFY_POSITIONS}); got {n}",
                g + 1
            )));
        }
        if self.draft_rows.is_none() && self.temperature != 0.0 {
            return Err(Error::Other(
                "sampled verification needs the draft's logits rows".to_string(),
            ));
        }
        Ok(())
    }

    /// The batch of one sequence over the host rows `target` (`[γ + 1, vocab]`), with `temps`
    /// and `gammas` the one-element arrays it borrows.
    pub(crate) fn batch<'a>(
        &'a self,
        target: &'a [f32],
        vocab: usize,
        temps: &'a [f32; 1],
        gammas: &'a [i32; 1],
    ) -> Result<VerifyBatch<'a>> {
        let g = self.draft_tokens.len();
        self.check_positions(g + 1)?;
        let draft = match self.draft_rows {
            Some(q) => q,
            // Greedy verification never reads the draft's rows: the target's own rows stand in
            // as a buffer of the shape the batch must have.
            None => target.get(..g * vocab).ok_or(Error::Length {
                what: "target logits",
                got: target.len(),
                expected: (g + 1) * vocab,
            })?,
        };
        let mut v = self.device_batch(vocab, temps, gammas);
        v.target = LogitsData::F32(target);
        v.draft = DraftDist::Logits {
            data: LogitsData::F32(draft),
            temperature: temps,
        };
        Ok(v)
    }

    /// The batch as kernels see it when the rows stay on a device: its host row slices are empty
    /// (only `validate_values` applies; the caller checks the device rows' shapes).
    pub(crate) fn device_batch<'a>(
        &'a self,
        vocab: usize,
        temps: &'a [f32; 1],
        gammas: &'a [i32; 1],
    ) -> VerifyBatch<'a> {
        let g = self.draft_tokens.len();
        let mut v = VerifyBatch::resident(vocab, g, self.draft_tokens, gammas, temps);
        (v.seed, v.step) = (self.seed, self.step);
        v
    }
}

impl<'a> VerifyBatch<'a> {
    /// A batch whose target rows stay on a device, `gammas.len()` sequences of up to
    /// `gamma_max` drafts (`draft_tokens` `[batch, γmax]`), each verified at its temperature in
    /// `temps` (target and draft alike): its host row slices are empty — set `draft` when
    /// sampling — and its seed and step 0. [`VerifyBatch::validate_device`] checks it.
    pub fn resident(
        vocab: usize,
        gamma_max: usize,
        draft_tokens: &'a [i32],
        gammas: &'a [i32],
        temps: &'a [f32],
    ) -> VerifyBatch<'a> {
        VerifyBatch {
            target: LogitsData::F32(&[]),
            target_stride: vocab,
            draft: DraftDist::Logits {
                data: LogitsData::F32(&[]),
                temperature: temps,
            },
            draft_stride: vocab,
            draft_tokens,
            gammas,
            target_temperature: temps,
            batch: gammas.len(),
            gamma_max,
            vocab,
            seed: 0,
            step: 0,
        }
    }
}

/// What verification decided, per sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyOutput {
    pub batch: usize,
    pub gamma_max: usize,
    /// Accepted draft tokens.
    pub accepted: Vec<i32>,
    /// `[batch, γmax+1]` emitted tokens, −1 padded.
    pub emitted: Vec<i32>,
    /// accepted + 1 (0 for a flagged sequence).
    pub emitted_count: Vec<i32>,
    /// `[batch, γmax]` min(1, p/q) per evaluated position (1/0 greedy), NaN elsewhere.
    pub ratios: Vec<f32>,
    /// `[batch, γmax+1]` tokens each γ' would have produced with the same random numbers, −1 for
    /// γ' > γ_b.
    pub counterfactual: Vec<i32>,
    /// `VERIFY_*` flags, 0 for a good sequence.
    pub flags: Vec<u32>,
}

impl VerifyOutput {
    pub fn new(batch: usize, gamma_max: usize) -> Self {
        VerifyOutput {
            batch,
            gamma_max,
            accepted: vec![0; batch],
            emitted: vec![-1; batch * (gamma_max + 1)],
            emitted_count: vec![0; batch],
            ratios: vec![f32::NAN; batch * gamma_max],
            counterfactual: vec![-1; batch * (gamma_max + 1)],
            flags: vec![0; batch],
        }
    }

    /// Sized and filled as [`VerifyOutput::new`] leaves it, reusing the buffers (no allocation when
    /// they are large enough).
    pub fn reset(&mut self, batch: usize, gamma_max: usize) {
        fn fill<T: Copy>(v: &mut Vec<T>, n: usize, x: T) {
            v.clear();
            v.resize(n, x);
        }
        self.batch = batch;
        self.gamma_max = gamma_max;
        fill(&mut self.accepted, batch, 0);
        fill(&mut self.emitted, batch * (gamma_max + 1), -1);
        fill(&mut self.emitted_count, batch, 0);
        fill(&mut self.ratios, batch * gamma_max, f32::NAN);
        fill(&mut self.counterfactual, batch * (gamma_max + 1), -1);
        fill(&mut self.flags, batch, 0);
    }

    /// The tokens sequence `b` emitted.
    pub fn tokens(&self, b: usize) -> &[i32] {
        let w = self.gamma_max + 1;
        &self.emitted[b * w..b * w + self.emitted_count[b].max(0) as usize]
    }
}

fn need(rows: usize, stride: usize, vocab: usize) -> Option<usize> {
    if rows == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(stride)?.checked_add(vocab)
}

impl VerifyBatch<'_> {
    /// Every shape, token id, γ and temperature, checked; NaN logits are not an error (they are
    /// flagged per sequence).
    pub fn validate(&self) -> Result<()> {
        self.validate_shapes()?;
        self.validate_values()
    }

    /// γ_b, the drafted tokens and the temperatures (values a device-side controller or engine
    /// may write without the host seeing them: the kernel flags them too).
    /// The checks of a batch whose target rows stay on a device (its `target` is empty; the
    /// caller checks the device rows): the per-sequence arrays' lengths, then
    /// [`VerifyBatch::validate_values`]; sampled sequences need the draft's rows.
    pub fn validate_device(&self) -> Result<()> {
        let b = self.batch;
        let d_temps = match self.draft {
            DraftDist::Logits { temperature, .. } => temperature.len(),
            DraftDist::Probs(_) => b,
        };
        for (what, got, expected) in [
            ("γ per sequence", self.gammas.len(), b),
            ("target temperatures", self.target_temperature.len(), b),
            ("draft temperatures", d_temps, b),
            (
                "drafted tokens",
                self.draft_tokens.len(),
                b * self.gamma_max,
            ),
        ] {
            if got != expected {
                return Err(Error::Length {
                    what,
                    got,
                    expected,
                });
            }
        }
        self.validate_values()?;
        let rows = b * self.gamma_max * self.vocab;
        let have = match self.draft {
            DraftDist::Logits { data, .. } => data.len(),
            DraftDist::Probs(p) => p.len(),
        };
        if self.target_temperature.iter().any(|&t| t != 0.0) && have < rows {
            return Err(Error::Length {
                what: "draft rows of a sampled verification",
                got: have,
                expected: rows,
            });
        }
        Ok(())
    }

    /// This device-resident batch over target rows `p` `[batch, γmax + 1, vocab]` in host memory
    /// (an executor's step, emulated or on the CPU). Greedy verification never reads the draft's
    /// rows: where there are none, the target's stand in.
    pub fn over_rows<'b>(&'b self, p: &'b [f32], vocab: usize) -> VerifyBatch<'b> {
        let mut vb: VerifyBatch<'b> = *self;
        vb.target = LogitsData::F32(p);
        vb.target_stride = vocab;
        if let DraftDist::Logits { data, temperature } = self.draft {
            if data.is_empty() {
                let n = (self.batch * self.gamma_max * vocab).min(p.len());
                vb.draft = DraftDist::Logits {
                    data: LogitsData::F32(&p[..n]),
                    temperature,
                };
            }
        }
        vb
    }

    pub fn validate_values(&self) -> Result<()> {
        for &t in self.target_temperature {
            check_temperature(t)?;
        }
        if let DraftDist::Logits { temperature, .. } = self.draft {
            for &t in temperature {
                check_temperature(t)?;
            }
        }
        for (b, &g) in self.gammas.iter().enumerate() {
            if g < 0 || g as usize > self.gamma_max {
                return Err(Error::BadGamma {
                    seq: b,
                    gamma: g,
                    max: self.gamma_max,
                });
            }
            for i in 0..g as usize {
                let x = self.draft_tokens[b * self.gamma_max + i];
                if x < 0 || x as usize >= self.vocab {
                    return Err(Error::BadToken {
                        seq: b,
                        pos: i,
                        token: x,
                        vocab: self.vocab,
                    });
                }
            }
        }
        Ok(())
    }

    /// Shapes, lengths and dtypes: what memory safety depends on.
    pub fn validate_shapes(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::Empty { what: "batch" });
        }
        if self.vocab == 0 {
            return Err(Error::Empty { what: "vocab" });
        }
        if self.vocab > MAX_VOCAB {
            return Err(Error::VocabTooLarge {
                vocab: self.vocab,
                max: MAX_VOCAB,
            });
        }
        if self.gamma_max > 1024 {
            return Err(Error::Other(format!(
                "γmax {} is above the supported 1024",
                self.gamma_max
            )));
        }
        if self.target_stride < self.vocab {
            return Err(Error::StrideTooSmall {
                stride: self.target_stride,
                vocab: self.vocab,
            });
        }
        if self.draft_stride < self.vocab {
            return Err(Error::StrideTooSmall {
                stride: self.draft_stride,
                vocab: self.vocab,
            });
        }
        let too_large = Error::TooLarge("batch × γmax × stride");
        if self.batch > u32::MAX as usize
            || self.target_stride > u32::MAX as usize
            || self.draft_stride > u32::MAX as usize
        {
            return Err(too_large);
        }
        let t_rows = self.batch * (self.gamma_max + 1);
        let t_need =
            need(t_rows, self.target_stride, self.vocab).ok_or(Error::TooLarge("target logits"))?;
        if self.target.len() < t_need {
            return Err(Error::Length {
                what: "target logits",
                got: self.target.len(),
                expected: t_need,
            });
        }
        let d_rows = self.batch * self.gamma_max;
        let d_need = need(d_rows, self.draft_stride, self.vocab).ok_or(Error::TooLarge("draft"))?;
        match self.draft {
            DraftDist::Logits { data, temperature } => {
                if data.dtype() != self.target.dtype() {
                    return Err(Error::Other(format!(
                        "draft logits are {} but target logits are {}: verification reads both in one dtype",
                        data.dtype().name(),
                        self.target.dtype().name()
                    )));
                }
                if data.len() < d_need {
                    return Err(Error::Length {
                        what: "draft logits",
                        got: data.len(),
                        expected: d_need,
                    });
                }
                check_len("draft temperatures", temperature.len(), self.batch)?;
            }
            DraftDist::Probs(p) => {
                if p.len() < d_need {
                    return Err(Error::Length {
                        what: "draft probabilities",
                        got: p.len(),
                        expected: d_need,
                    });
                }
            }
        }
        check_len(
            "draft tokens",
            self.draft_tokens.len(),
            self.batch * self.gamma_max,
        )?;
        check_len("gammas", self.gammas.len(), self.batch)?;
        check_len(
            "target temperatures",
            self.target_temperature.len(),
            self.batch,
        )?;
        Ok(())
    }

    /// Kernel parameters with the caller's (host or device) output addresses.
    pub(crate) fn params(&self, ptrs: VerifyPtrs) -> VerifyParams {
        VerifyParams {
            target_logits: ptrs.target,
            draft: ptrs.draft,
            draft_tokens: ptrs.draft_tokens,
            gammas: ptrs.gammas,
            target_temperature: ptrs.target_temperature,
            draft_temperature: ptrs.draft_temperature,
            accepted: ptrs.accepted,
            emitted: ptrs.emitted,
            emitted_count: ptrs.emitted_count,
            ratios: ptrs.ratios,
            counterfactual: ptrs.counterfactual,
            seq_flags: ptrs.seq_flags,
            seed: self.seed,
            step: self.step,
            batch: self.batch as u32,
            gamma_max: self.gamma_max as u32,
            vocab: self.vocab as u32,
            target_stride: self.target_stride as u32,
            draft_stride: self.draft_stride as u32,
            flags: if matches!(self.draft, DraftDist::Probs(_)) {
                VERIFY_DRAFT_PROBS
            } else {
                0
            },
        }
    }

    /// Bytes of logits/probabilities the kernel reads when every drafted token is accepted (the
    /// most it reads): γ_b target and draft rows, plus the bonus row.
    pub fn bytes_read_all_accepted(&self) -> usize {
        let g: usize = self.gammas.iter().map(|&g| g.max(0) as usize).sum();
        let t = self.target.dtype().size();
        let d = match self.draft {
            DraftDist::Logits { data, .. } => data.dtype().size(),
            DraftDist::Probs(_) => 0, // only q(x) is read per position
        };
        self.vocab * (g * (t + d) + self.batch * t)
    }
}

/// Raw addresses of every buffer a launch touches.
#[derive(Clone, Copy)]
pub(crate) struct VerifyPtrs {
    pub target: *const u8,
    pub draft: *const u8,
    pub draft_tokens: *const i32,
    pub gammas: *const i32,
    pub target_temperature: *const f32,
    pub draft_temperature: *const f32,
    pub accepted: *mut i32,
    pub emitted: *mut i32,
    pub emitted_count: *mut i32,
    pub ratios: *mut f32,
    pub counterfactual: *mut i32,
    pub seq_flags: *mut u32,
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Length {
            what,
            got,
            expected,
        });
    }
    Ok(())
}

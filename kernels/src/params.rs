//! `#[repr(C)]` structures shared by the kernels and every host that launches them (speckv's own
//! backends, the C ABI, engines loading the PTX themselves). Their layout is part of the public
//! kernel interface (`docs/kernels.md`); size assertions at the bottom pin it.

/// Parameters of the `softmax_stats_{f32,f16,bf16}` kernels, passed by value.
///
/// One block per row (`grid.x = rows`), any block size that is a multiple of 32 up to 1024, and
/// `block.x / 32 * size_of::<StatsState>()` bytes of dynamic shared memory
/// ([`softmax_stats_shared_bytes`](crate::softmax_stats::shared_bytes)).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxStatsParams {
    /// Logits, `rows` rows of `vocab` elements each, row `r` starting at element `r * row_stride`;
    /// the element type is the entry point's (f32, f16 or bf16 bits).
    pub logits: *const u8,
    /// `rows` results.
    pub out: *mut RowStats,
    /// Per-sequence feature accumulators, one per row (row `r` is sequence `r`); null when
    /// [`STATS_ACCUMULATE`] is not set.
    pub accum: *mut FeatureAccum,
    /// Philox seed (see `philox`).
    pub seed: u64,
    /// Philox step (for example the decode position); the stream id is the row.
    pub step: u64,
    pub rows: u32,
    pub vocab: u32,
    /// Elements between row starts, `>= vocab`.
    pub row_stride: u32,
    /// Softmax temperature `T`: `T > 0` gives statistics of softmax(x / T); `T == 0` means greedy:
    /// statistics of softmax(x) and `sampled` = argmax.
    pub temperature: f32,
    /// `STATS_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

// SAFETY: the parameters are plain addresses and sizes; sharing them between (emulated) GPU
// threads is what a launch does. Dereferencing the pointers is what needs care, and only the
// kernels do that, under their documented contracts.
unsafe impl Send for SoftmaxStatsParams {}
unsafe impl Sync for SoftmaxStatsParams {}

/// Draw a token from softmax(x / T) (Gumbel-max with Philox noise) into `RowStats::sampled`.
pub const STATS_SAMPLE: u32 = 1;
/// Update `accum[row]` with this row's entropy and confidence.
pub const STATS_ACCUMULATE: u32 = 2;
/// With `STATS_ACCUMULATE`: start `accum[row]` afresh with this row (first draft of a step).
pub const STATS_ACCUM_RESET: u32 = 4;

/// `softmax_stats_v2` with `STATS_ACCUMULATE`: after accumulating the row, decide its sequence's
/// next γ with the 16-unit MLP (`SoftmaxStatsV2Params::decision`), in the same launch.
pub const STATS_DECIDE: u32 = 8;

/// `softmax_stats_v2` with `STATS_ACCUMULATE`: per-token stopping — decide whether the row's
/// sequence keeps this draft and drafts on (`SoftmaxStatsV2Params::stop`, see `stop_rule`).
pub const STATS_STOP: u32 = 16;

/// Parameters of the `softmax_stats_v2_{f32,f16,bf16}` kernels, passed by value.
///
/// Each row is split across `splits` blocks (grid `rows × splits`, block b = row `b / splits`,
/// split `b % splits`); every block reads `chunk_vecs` 16-byte vectors of its row, keeps its partial
/// state in `partials`, and the last block of a row to arrive (an atomic counter per row) merges
/// the row's partials in split order — so the result does not depend on which block came last —
/// writes the row's statistics, updates its accumulator and, with `STATS_DECIDE`, decides γ.
/// `speckv_kernels::softmax_stats::plan_v2` computes `splits`, `chunk_vecs` and the block size.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxStatsV2Params {
    /// As in [`SoftmaxStatsParams`]: element-aligned; rows need not be 16-byte aligned (a row's
    /// unaligned head and tail are read element by element).
    pub logits: *const u8,
    pub out: *mut RowStats,
    pub accum: *mut FeatureAccum,
    /// Scratch: `rows × splits` partial states.
    pub partials: *mut StatsState,
    /// Scratch: `rows` arrival counters, zero before the first launch; every launch leaves them
    /// zero again.
    pub counters: *mut u32,
    /// The γ decision's parameters in device memory (their `accum` and `batch` are ignored: the
    /// launch's accumulators and rows are used); null unless `STATS_DECIDE`.
    pub decision: *const GammaMlpParams,
    pub seed: u64,
    pub step: u64,
    pub rows: u32,
    pub vocab: u32,
    pub row_stride: u32,
    pub temperature: f32,
    /// `STATS_*` bits.
    pub flags: u32,
    /// Blocks per row (≥ 1).
    pub splits: u32,
    /// 16-byte vectors of a row's aligned body per block.
    pub chunk_vecs: u32,
    /// Rows per entry of `temperatures`: row r uses `temperatures[r / temperature_group]`
    /// (e.g. γmax when the rows are a batch's drafted positions); ignored when `temperatures` is
    /// null.
    pub temperature_group: u32,
    /// Per-row-group temperatures in device memory, or null: `temperature` for every row.
    pub temperatures: *const f32,
    /// The stopping rule's parameters in device memory; null unless `STATS_STOP`.
    pub stop: *const StopParams,
}

/// Entries of [`StepCosts::verify`]: γ = 0..=15 (the GEMV's largest M is γmax + 1 = 16).
pub const STOP_TIMES: usize = 16;

/// The stopping rule's parameters, in device memory (`SoftmaxStatsV2Params::stop`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StopParams {
    /// The hazard model.
    pub weights: *const MlpWeights,
    /// `[rows]` per-sequence state, reset by the first draft's launch (`STATS_ACCUM_RESET`).
    pub state: *mut StopState,
    /// `[rows]` γ_b: the drafts kept so far, written after every decision (read by `verify`).
    pub gammas_out: *mut i32,
    /// One word, or null: incremented once by every sequence that stops (early or at γmax); the
    /// host zeroes it before a step's first draft.
    pub stopped_count: *mut u32,
    /// `[rows × STOP_TIMES]`, or null: the hazard each kept draft was decided with, draft j of
    /// row r at `r · STOP_TIMES + j` — what the online calibration of the hazard model's odds
    /// needs once the step's drafts are verified. Entries of drafts not kept are not written.
    pub hazards_out: *mut f32,
    /// The costs the rule weighs, any time unit.
    pub costs: StepCosts,
    /// Most drafts per step, ≤ `STOP_TIMES − 1`.
    pub gamma_max: u32,
    /// The target's compression code (0 fp16, 1 int8, 2 nf4).
    pub compression_code: f32,
    /// Online calibration: the model's odds h / (1 − h) are multiplied by this (1: as trained).
    pub odds_scale: f32,
    /// Null: every sequence decides alone. Otherwise the launch's sequences draft in lockstep
    /// (one batched draft pass, one batched verification of the longest γ) and decide together
    /// (`stop_rule::compare_lockstep`), through this scratch: zeroed before the first launch,
    /// left zeroed by every launch, not shared with a concurrent launch; at most
    /// [`LOCKSTEP_MAX_ROWS`] rows.
    pub lockstep: *mut LockstepScratch,
    /// `[rows]` per-sequence odds scales (each sequence's own online calibration), or null:
    /// `odds_scale` for every row. Sequences of one batch are different prompts whose drafts the
    /// target accepts at different rates, so each keeps its own scale (as `generate`'s batched
    /// rule does).
    pub odds_scales: *const f32,
}

/// Most sequences one lockstep decision covers (`StopParams::lockstep`).
pub const LOCKSTEP_MAX_ROWS: usize = 16;

/// Where a lockstep launch's rows meet (`StopParams::lockstep`): each row publishes its hazard and
/// counts its arrival; the last row to arrive decides for all and zeroes `arrived` again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct LockstepScratch {
    pub arrived: u32,
    /// Row r's hazard for this launch's draft (NaN for a row whose sequence had stopped).
    pub hazards: [f32; LOCKSTEP_MAX_ROWS],
}

/// A step's costs as the stopping rule sees them: one draft pass, and the verification of γ drafts
/// (γ + 1 target positions) for γ = 0..=γmax (entries beyond γmax unused). Any unit: only ratios
/// enter the decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCosts {
    pub draft: f32,
    pub verify: [f32; STOP_TIMES],
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for StopParams {}
unsafe impl Sync for StopParams {}

/// One sequence's state within a step.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct StopState {
    /// A_{j−1}: the chance that every draft kept so far is accepted (1 before the first).
    pub survive: f32,
    /// 1 + Σ A_i over the drafts kept: the step's expected emitted tokens so far.
    pub expected: f32,
    /// Drafts kept (the position of the next decision).
    pub kept: u32,
    /// 1 once the sequence has stopped this step.
    pub stopped: u32,
}

impl StopState {
    /// Before a step's first draft.
    pub const START: StopState = StopState {
        survive: 1.0,
        expected: 1.0,
        kept: 0,
        stopped: 0,
    };
}

impl Default for StopState {
    fn default() -> Self {
        Self::START
    }
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for SoftmaxStatsV2Params {}
unsafe impl Sync for SoftmaxStatsV2Params {}

/// One row of a `softmax_stats_v3` launch: which logits row it reads, with its own options, and
/// which accumulator it updates — the per-row state a batch of sequences needs (each sequence has
/// its seed, random step, temperature and place in its speculation step), so a whole batch's rows
/// take one launch instead of one each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct StatsRow {
    /// Philox seed and step of this row's draw.
    pub seed: u64,
    pub step: u64,
    /// Row of `logits` this launch row reads (`< logit_rows`).
    pub row: u32,
    /// Philox stream of the draw (v2 uses its launch row; a one-row launch, stream 0).
    pub stream: u32,
    /// Softmax temperature, 0 for greedy.
    pub temperature: f32,
    /// `STATS_SAMPLE`, `STATS_ACCUMULATE`, `STATS_ACCUM_RESET` (other bits are ignored: v3 does not
    /// decide γ or stop).
    pub flags: u32,
    /// The accumulator this row updates, `accum[accum_slot]` (`< accum_slots`); two accumulating
    /// rows of one launch must not share one.
    pub accum_slot: u32,
    pub _pad: u32,
}

/// Parameters of the `softmax_stats_v3_{f32,f16,bf16}` kernels, passed by value: v2's split rows,
/// each launch row `k` described by `row_params[k]` (device memory). The launch row `k` writes
/// `out[k]` and uses `partials[k × splits ..]` and `counters[k]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxStatsV3Params {
    /// `logit_rows` rows `row_stride` elements apart, element-aligned.
    pub logits: *const u8,
    /// `rows` results.
    pub out: *mut RowStats,
    /// `accum_slots` accumulators, or null when no row accumulates (an accumulating row is then
    /// flagged `ROW_BAD_INDEX`).
    pub accum: *mut FeatureAccum,
    /// Scratch: `rows × splits` partial states.
    pub partials: *mut StatsState,
    /// Scratch: `rows` arrival counters, zero before the first launch and left zero.
    pub counters: *mut u32,
    /// `rows` row descriptions.
    pub row_params: *const StatsRow,
    /// Launch rows.
    pub rows: u32,
    /// Rows of `logits`; a row description pointing past them is flagged `ROW_BAD_INDEX`.
    pub logit_rows: u32,
    pub vocab: u32,
    pub row_stride: u32,
    /// Accumulators behind `accum`; a slot past them is flagged `ROW_BAD_INDEX`.
    pub accum_slots: u32,
    /// Blocks per row (≥ 1), as v2's plan says.
    pub splits: u32,
    /// 16-byte vectors of a row's aligned body per block.
    pub chunk_vecs: u32,
    pub _pad: u32,
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for SoftmaxStatsV3Params {}
unsafe impl Sync for SoftmaxStatsV3Params {}

/// The row held a NaN or +inf logit; its statistics are NaN and its tokens −1.
pub const ROW_NONFINITE: u32 = 1;
/// Every logit of the row was −inf (everything masked); statistics NaN, tokens −1.
pub const ROW_ALL_MASKED: u32 = 2;
/// The launch's temperature was negative, NaN, infinite or below `f32::MIN_POSITIVE` (hosts
/// reject this before launching; the kernel flags rather than trusts it).
pub const ROW_BAD_TEMPERATURE: u32 = 4;
/// `softmax_stats_v3`: the row's description named a logits row or an accumulator the launch does
/// not have; statistics NaN, tokens −1, no accumulator touched (hosts reject this before
/// launching).
pub const ROW_BAD_INDEX: u32 = 8;

/// The statistics of one row of logits, written by `softmax_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct RowStats {
    /// Largest raw logit (before temperature).
    pub max_logit: f32,
    /// log Σ exp(x_i / T) (T = 1 in greedy mode).
    pub lse: f32,
    /// Entropy of softmax(x / T) in nats.
    pub entropy: f32,
    /// Top-1 probability of softmax(x / T): the draft's confidence.
    pub confidence: f32,
    /// Index of the largest logit; ties go to the lowest index.
    pub argmax: i32,
    /// Token drawn from softmax(x / T) (argmax in greedy mode); −1 when not sampled or flagged.
    pub sampled: i32,
    /// Its probability under softmax(x / T) (NaN when not sampled).
    pub sampled_prob: f32,
    /// `ROW_*` bits; zero for a good row.
    pub flags: u32,
}

impl RowStats {
    /// The result of a flagged row: NaN statistics, tokens −1.
    pub const fn flagged(flags: u32) -> RowStats {
        RowStats {
            max_logit: f32::NAN,
            lse: f32::NAN,
            entropy: f32::NAN,
            confidence: f32::NAN,
            argmax: -1,
            sampled: -1,
            sampled_prob: f32::NAN,
            flags,
        }
    }
}

/// Running draft features of one sequence over the drafted tokens of the current speculation step,
/// so the γ controller reads mean/max entropy and mean/min confidence without another pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct FeatureAccum {
    /// Good rows accumulated.
    pub count: u32,
    /// OR of the `ROW_*` flags of rows that were not accumulated.
    pub flags: u32,
    pub entropy_sum: f32,
    pub entropy_max: f32,
    pub confidence_sum: f32,
    pub confidence_min: f32,
}

impl FeatureAccum {
    /// The state before any drafted token.
    pub const EMPTY: FeatureAccum = FeatureAccum {
        count: 0,
        flags: 0,
        entropy_sum: 0.0,
        entropy_max: f32::NEG_INFINITY,
        confidence_sum: 0.0,
        confidence_min: f32::INFINITY,
    };

    /// Adds one row's statistics (or its flags, for a flagged row).
    #[inline(always)]
    pub fn push(&mut self, entropy: f32, confidence: f32, row_flags: u32) {
        if row_flags != 0 {
            self.flags |= row_flags;
            return;
        }
        self.count += 1;
        self.entropy_sum += entropy;
        self.entropy_max = if entropy > self.entropy_max {
            entropy
        } else {
            self.entropy_max
        };
        self.confidence_sum += confidence;
        self.confidence_min = if confidence < self.confidence_min {
            confidence
        } else {
            self.confidence_min
        };
    }
}

impl Default for FeatureAccum {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// The per-thread (and per-warp, per-block) partial state of `softmax_stats`'s online recurrence.
/// It lives in dynamic shared memory between the warp and block reductions, and (v2) in the
/// `partials` scratch between a row's blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct StatsState {
    /// Largest raw logit seen, −inf when none.
    pub max: f32,
    /// Σ exp(z_i − m) with z = x / T and m = max / T.
    pub sum: f32,
    /// Σ exp(z_i − m) (z_i − m): entropy = ln(sum) − u / sum.
    pub u: f32,
    /// Index of `max` (lowest on ties); u32::MAX when none.
    pub argmax: u32,
    /// Largest Gumbel key z_i + g_i, −inf when none.
    pub key: f32,
    /// Its index; u32::MAX when none.
    pub key_idx: u32,
    /// z at `key_idx` (for the sampled token's probability).
    pub key_z: f32,
    /// `ROW_NONFINITE` when a NaN or +inf was seen.
    pub flags: u32,
}

/// Parameters of the `verify_{f32,f16,bf16}` kernels, passed by value.
///
/// One block per sequence (`grid.x = batch`), a block size that is a multiple of 32 up to 1024, and
/// [`verify_shared_bytes`](crate::verify::shared_bytes) bytes of dynamic shared memory. Rows are
/// dense per sequence: target row (b, i) starts at element `(b·(γmax+1) + i)·target_stride`, draft
/// row (b, i) at `(b·γmax + i)·draft_stride`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VerifyParams {
    /// Target logits `[batch, γmax+1, vocab]` in the entry point's dtype.
    pub target_logits: *const u8,
    /// Draft logits `[batch, γmax, vocab]` (same dtype as the target), or f32 probabilities with
    /// [`VERIFY_DRAFT_PROBS`].
    pub draft: *const u8,
    /// `[batch, γmax]` drafted tokens; only the first γ_b of each sequence are read.
    pub draft_tokens: *const i32,
    /// `[batch]` γ_b, 0 ≤ γ_b ≤ γmax, read from device memory (the controller writes it there).
    pub gammas: *const i32,
    /// `[batch]` target temperature; 0 = greedy verification for that sequence.
    pub target_temperature: *const f32,
    /// `[batch]` draft temperature (logits mode; 0 = the draft was greedy); null with probabilities.
    pub draft_temperature: *const f32,
    /// `[batch]` accepted draft tokens.
    pub accepted: *mut i32,
    /// `[batch, γmax+1]` emitted tokens, −1 padded.
    pub emitted: *mut i32,
    /// `[batch]` emitted tokens (accepted + 1; 0 for a flagged sequence).
    pub emitted_count: *mut i32,
    /// `[batch, γmax]` min(1, p/q) per position (1/0 in greedy mode), NaN where not evaluated; may
    /// be null.
    pub ratios: *mut f32,
    /// `[batch, γmax+1]` full information: entry γ' is the number of tokens γ' would have
    /// produced with the same random numbers (min(k, γ') + 1), −1 for γ' > γ_b; may be null.
    pub counterfactual: *mut i32,
    /// `[batch]` `VERIFY_*` problem flags, 0 for a good sequence.
    pub seq_flags: *mut u32,
    pub seed: u64,
    pub step: u64,
    pub batch: u32,
    pub gamma_max: u32,
    pub vocab: u32,
    /// Elements between consecutive target rows, ≥ vocab.
    pub target_stride: u32,
    /// Elements between consecutive draft rows, ≥ vocab.
    pub draft_stride: u32,
    /// `VERIFY_DRAFT_PROBS` or 0.
    pub flags: u32,
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for VerifyParams {}
unsafe impl Sync for VerifyParams {}

/// `draft` holds f32 probabilities instead of logits.
pub const VERIFY_DRAFT_PROBS: u32 = 1;

/// A row read held a NaN or +inf logit, x / T overflowed, or a probability (p(x), q(x), their
/// ratio, a draft probability read in the residual pass) was not finite and in [0, 1].
pub const VERIFY_NONFINITE: u32 = 1;
/// A row read was entirely −inf.
pub const VERIFY_ALL_MASKED: u32 = 2;
/// γ_b was negative or above γmax.
pub const VERIFY_BAD_GAMMA: u32 = 4;
/// A drafted token was negative or ≥ vocab.
pub const VERIFY_BAD_TOKEN: u32 = 8;
/// A temperature was negative, NaN, infinite, or positive but below `f32::MIN_POSITIVE` (1/T
/// would not be finite).
pub const VERIFY_BAD_TEMPERATURE: u32 = 16;
/// A drafted token had draft probability q(x) = 0: the draft cannot have proposed it (a greedy
/// draft is one-hot at its own token, so this comes from probabilities or underflowed logits).
pub const VERIFY_BAD_DRAFT: u32 = 32;

/// The γ predictor's weights in f32 (6 → 16 ReLU → 1), with the feature standardisation folded in
/// as mean and 1/std. Uploaded once; read by every `gamma_mlp` launch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    not(target_arch = "nvptx64"),
    derive(bytemuck::Pod, bytemuck::Zeroable)
)]
pub struct MlpWeights {
    /// Row-major `[6][16]`: input i, hidden unit j at `i * 16 + j`.
    pub w1: [f32; 96],
    pub b1: [f32; 16],
    pub w2: [f32; 16],
    pub mean: [f32; 6],
    pub inv_std: [f32; 6],
    pub b2: f32,
    pub _pad: [f32; 3],
}

impl Default for MlpWeights {
    fn default() -> Self {
        MlpWeights {
            w1: [0.0; 96],
            b1: [0.0; 16],
            w2: [0.0; 16],
            mean: [0.0; 6],
            inv_std: [1.0; 6],
            b2: 0.0,
            _pad: [0.0; 3],
        }
    }
}

/// Most candidate γ values a `gamma_mlp` launch considers.
pub const MAX_CANDIDATES: usize = 8;

/// Parameters of the `gamma_mlp` kernel, passed by value: one thread per sequence (any 1-D launch
/// covering `batch` threads; speckv uses blocks of 128), no shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GammaMlpParams {
    pub weights: *const MlpWeights,
    /// `[batch]` this step's feature accumulators (written by `softmax_stats`).
    pub accum: *const FeatureAccum,
    /// `[batch]` compression code per sequence (0 fp16, 1 int8, 2 nf4), or null: `compression_code`.
    pub compression: *const f32,
    /// `[n_candidates]` cost of a step at each candidate γ (any time unit), or null: maximise
    /// expected tokens per step instead of tokens per unit cost.
    pub cost: *const f32,
    /// `[batch]` output: γ for each sequence's next step (read by `verify`).
    pub gammas_out: *mut i32,
    /// `[batch]` output: the chosen γ's predicted tokens per step â·γ + 1, NaN for a fallback
    /// (may be null).
    pub expected_out: *mut f32,
    /// `[batch]` output: `GAMMA_*` bits, why `fallback_gamma` was written; 0 for a decision
    /// (may be null).
    pub flags_out: *mut u32,
    pub candidates: [i32; MAX_CANDIDATES],
    pub n_candidates: u32,
    pub batch: u32,
    /// γ written for a sequence whose accumulator is empty or flagged, or whose features or
    /// predictions are not finite.
    pub fallback_gamma: i32,
    pub compression_code: f32,
}

/// `gamma_mlp`: no drafted token was accumulated this step (count 0).
pub const GAMMA_EMPTY: u32 = 1;
/// `gamma_mlp`: a drafted row of this step was flagged by `softmax_stats`.
pub const GAMMA_FLAGGED_ROWS: u32 = 2;
/// `gamma_mlp`: a feature, a weight or a prediction was not finite.
pub const GAMMA_NONFINITE: u32 = 4;

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for GammaMlpParams {}
unsafe impl Sync for GammaMlpParams {}

/// Parameters of the `gemv_{fp16,int8,nf4}_m{1,2,4,8,16}` kernels: y[m, o] = Σ_k x[m, k]·W[o, k] for
/// m < `m` (≤ the entry point's tile), weights dequantised on the fly, f32 accumulation.
///
/// One warp per output row: `block.x` a multiple of 32 (speckv: 128, four rows per block),
/// `grid.x = ceil(out / (block.x / 32))`, no shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GemvParams {
    /// fp16: f16 `[out, in]`; int8: i8 `[out, in]`; nf4: `out·in/2` bytes, element e of the
    /// row-major matrix in the high nibble of byte e/2 when e is even, the low nibble when odd.
    pub weight: *const u8,
    /// int8: scale per output row `[out]`; nf4: absmax per 64-element block `[out·in/64]`; fp16: null.
    pub scales: *const f32,
    /// Activations `[m, in]`, f32.
    pub x: *const f32,
    /// Output `[m, out]`, f32.
    pub y: *mut f32,
    pub out_features: u32,
    pub in_features: u32,
    /// Rows of x (1 ≤ m ≤ the entry point's tile, at most 16).
    pub m: u32,
    /// [`GEMV_ACCUMULATE`] or 0: honoured by the v2, tensor-core, v3 and v4 kernels; v1 (the
    /// oracle) always writes y = x · Wᵀ.
    pub flags: u32,
}

/// `GemvParams::flags`: y += x · Wᵀ instead of y = x · Wᵀ — a projection adds itself into the
/// residual stream, so no separate add (and no launch for it) is needed. Each output is read and
/// written by the one thread that writes it, after the product (and, with a split K, after the
/// merge of the splits), so the add is y + product in that order whatever the schedule.
pub const GEMV_ACCUMULATE: u32 = 1;

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for GemvParams {}
unsafe impl Sync for GemvParams {}

/// The NF4 codebook of QLoRA / bitsandbytes (full precision).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// NF4 block size (elements of the row-major matrix per absmax).
pub const NF4_BLOCK: usize = 64;

// SAFETY of the host's byte copies relies on these layouts: no padding, fixed sizes.
const _: () = assert!(core::mem::size_of::<SoftmaxStatsParams>() == 64);
const _: () = assert!(core::mem::size_of::<RowStats>() == 32);
const _: () = assert!(core::mem::size_of::<FeatureAccum>() == 24);
const _: () = assert!(core::mem::size_of::<StatsState>() == 32);
const _: () = assert!(core::mem::size_of::<VerifyParams>() == 136);
const _: () = assert!(core::mem::size_of::<MlpWeights>() == 576);
const _: () = assert!(core::mem::size_of::<GammaMlpParams>() == 104);
const _: () = assert!(core::mem::size_of::<GemvParams>() == 48);
const _: () = assert!(core::mem::size_of::<SoftmaxStatsV2Params>() == 112);
const _: () = assert!(core::mem::size_of::<StatsRow>() == 40);
const _: () = assert!(core::mem::size_of::<SoftmaxStatsV3Params>() == 80);
const _: () = assert!(core::mem::size_of::<StopParams>() == 136);
const _: () = assert!(core::mem::size_of::<LockstepScratch>() == 68);
const _: () = assert!(core::mem::size_of::<StopState>() == 16);

/// Parameters of the v2 verification kernels `verify_v2_rows_{f32,f16,bf16}` and
/// `verify_v2_sample_{f32,f16,bf16}`, passed by value to both (launched one after the other on the
/// same stream, same parameters).
///
/// `verify_v2_rows` (grid `batch × (γmax + 1) × row_splits`) reduces every target row a sequence
/// may need to (max, Σ, argmax) with rows split across blocks; the last block of a sequence to
/// finish runs the acceptance walk for it (one thread: q(x) is one load, from draft probabilities
/// or from the draft's log-sum-exp in `draft_stats`). `verify_v2_sample` (grid
/// `batch × sample_splits`) then draws the emitted token of every sequence that needs one — the
/// residual at its first rejection or the bonus token — in one split pass over that one row.
/// `speckv_kernels::verify::plan_v2` and `workspace_bytes` size the launches and the workspace.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VerifyV2Params {
    /// Shapes, inputs and outputs as for v1 (`draft` holds logits or, with `VERIFY_DRAFT_PROBS`,
    /// probabilities).
    pub base: VerifyParams,
    /// Logits mode with a positive draft temperature: the statistics of every draft row `[batch,
    /// γmax]` at the draft temperature, as `softmax_stats` wrote them (their `lse` gives q(x)); null
    /// otherwise.
    pub draft_stats: *const RowStats,
    /// Scratch of `workspace_bytes(batch, γmax, row_splits, sample_splits)` bytes, zero before
    /// the first launch; every launch pair leaves it ready for the next.
    pub workspace: *mut u8,
    pub row_splits: u32,
    pub row_chunk_vecs: u32,
    pub sample_splits: u32,
    pub sample_chunk_vecs: u32,
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for VerifyV2Params {}
unsafe impl Sync for VerifyV2Params {}

const _: () = assert!(core::mem::size_of::<VerifyV2Params>() == 168);

/// Parameters of the v2 GEMV kernels (`gemv_v2_{fp16,int8,nf4}_m{1,2,4,8,16}` on CUDA cores,
/// `gemv_tc_{fp16,int8,nf4}_n{8,16}` on tensor cores) and of v3 / v4 (`gemv_v3_*`, `gemv_v4_*`,
/// with or without `_norm`), passed by value: v1's buffers and shapes, plus the split of K across
/// blocks and the workspace the splits' partial sums meet in, plus the `_norm` entries' gains.
/// `speckv_kernels::gemv::plan_v2` / `plan_v3` / `plan_v4` choose the kernel, the grid and `kt`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GemvV2Params {
    pub base: GemvParams,
    /// Scratch: `ceil(out / rows per block)` arrival counters (zero before the first launch; left
    /// zero), then `ksplits × m × out` f32 partial sums. Unused (may be null) when `ksplits == 1`.
    pub workspace: *mut u8,
    /// Blocks along K per row tile.
    pub ksplits: u32,
    /// Elements of K per split (a multiple of 64).
    pub kt: u32,
    /// The `_norm` entry points of v3 and v4 only: RMSNorm gains `[in]`; x is read as
    /// x / √(mean(x²) + `eps`) · gains (`rms_norm_f32`'s arithmetic, same order), so the norm in
    /// front of a projection needs no launch of its own. Null (and unread) for every other entry.
    pub norm: *const f32,
    pub eps: f32,
    pub _pad: u32,
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for GemvV2Params {}
unsafe impl Sync for GemvV2Params {}

const _: () = assert!(core::mem::size_of::<GemvV2Params>() == 80);

// ---------------------------------------------------------------------------------------------
// The forward pass of a llama / qwen2 decoder (`rms_norm`, `embed`, `qkv_rope`, `attention`,
// `silu_mul`): activations are f32 `[m, width]` row-major, the KV cache is f16 `[capacity,
// kv_heads · head_dim]` per layer, and the cache length before the step is read from device memory
// (`cache_len`), so a captured step replays at any position without new parameters.

/// Parameters of `rms_norm_f32`: for each of `rows` rows, x ← x + residual (when `residual` is not
/// null; written back), then out = x / √(mean(x²) + eps) · weight.
///
/// One block per row (`grid.x = rows`), `block.x` a multiple of 32 up to 1024, `block.x / 32 · 4`
/// bytes of dynamic shared memory; `hidden` a multiple of 4 and every buffer 16-byte aligned
/// (rows are read and written as 16-byte vectors).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RmsNormParams {
    /// `[rows, hidden]`, read and (with a residual) written.
    pub x: *mut f32,
    /// `[rows, hidden]` added to x first; null for none.
    pub residual: *const f32,
    /// `[hidden]` gains.
    pub weight: *const f32,
    /// `[rows, hidden]`.
    pub out: *mut f32,
    pub hidden: u32,
    pub rows: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// Parameters of `embed_f16`: x[i] = table[tokens[i]] as f32 for `m` tokens (a token outside the
/// vocabulary writes NaN rows: loud, never a clamp). Grid `m`, any block size.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmbedParams {
    /// f16 bits `[vocab, hidden]`.
    pub table: *const u16,
    /// `[m]`.
    pub tokens: *const u32,
    /// `[m, hidden]`.
    pub x: *mut f32,
    pub hidden: u32,
    pub vocab: u32,
    pub m: u32,
    pub _pad: u32,
}

/// Parameters of `qkv_rope_f32`: splits the fused projection `qkv [m, (heads + 2·kv_heads)·hd]`
/// (q, then k, then v, by position) after adding `bias`; rotates q and k by the rotary table at
/// positions `cache_len + i`; writes q to `q [m, heads·hd]` and k, v (as f16) into the cache rows
/// `cache_len + i`. A position at or past `capacity` or the table's `rope_positions` is not
/// written (the host checks first).
///
/// Batched: `seqs` sequences of `m` positions each (0 counts as 1). Row r of `qkv` and `q` is
/// position r % m of sequence r / m, whose cache is rows `b · capacity ..` of `k_cache` / `v_cache`
/// and whose length is `cache_len[b]`.
///
/// One thread per (position, pair of a q or k head) and per (position, v element): `grid.x =
/// ceil(m · ((heads + kv_heads)·hd/2 + kv_heads·hd) / block.x)`, any block size, no shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct QkvRopeParams {
    pub qkv: *const f32,
    /// `[(heads + 2·kv_heads)·hd]`, or null.
    pub bias: *const f32,
    /// `[rope_positions, hd/2]` (cos, sin) pairs.
    pub rope: *const [f32; 2],
    pub q: *mut f32,
    /// f16 bits `[capacity, kv_heads·hd]`.
    pub k_cache: *mut u16,
    pub v_cache: *mut u16,
    /// The cache length before this step (one u32 in device memory).
    pub cache_len: *const u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub m: u32,
    pub capacity: u32,
    pub rope_positions: u32,
    /// 1: rotate halves (qwen2, "neox"); 0: adjacent pairs (llama as GGUF stores it).
    pub neox: u32,
    /// Sequences in the batch (0: one).
    pub seqs: u32,
}

/// Parameters of `attention_f32`: causal grouped-query attention of the `m` new positions over the
/// cache (position i sees cache rows `0 ..= cache_len + i`): out[i, h] = Σ_p softmax_p(q·k_p ·
/// scale) v_p, with `q [m, heads·hd]` and `out [m, heads·hd]` f32, k / v f16 rows of the cache.
///
/// One block per (position, head): `grid.x = m · heads` (block b: position b / heads, head b %
/// heads), `block.x` a multiple of 32 up to 1024; each warp walks every `warps`-th position with an
/// online softmax, lanes holding `head_dim / 32` elements (at least 1, `head_dim ≤ 256`, a power of
/// two ≥ 8); dynamic shared memory `warps · (2 + head_dim) · 4` bytes
/// ([`attention::shared_bytes`](crate::attention::shared_bytes)).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub q: *const f32,
    pub k_cache: *const u16,
    pub v_cache: *const u16,
    pub out: *mut f32,
    pub cache_len: *const u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub m: u32,
    pub capacity: u32,
    /// Usually 1/√head_dim.
    pub scale: f32,
}

/// Parameters of `attention_v2_f32_e{1,2,4,8}`: v1's, plus the split of each (position, head)
/// pair's cache positions across `splits` blocks (grid `m · heads · splits`, block b: pair b /
/// splits, split b % splits; each split takes ceil(n / splits) positions of the n its query sees)
/// and the workspace where the splits meet
/// ([`attention::workspace_bytes_v2`](crate::attention::workspace_bytes_v2): arrival counters,
/// zero before the first launch and left zero, then every split's partial state). Dynamic shared
/// memory [`attention::shared_bytes_v2`](crate::attention::shared_bytes_v2).
///
/// Batched (v2 only; v1, the oracle, runs one sequence): `seqs` sequences of `base.m` positions
/// each (0 counts as 1), laid out as for [`QkvRopeParams`] — row r of q and out is position r % m of
/// sequence r / m, whose cache starts at row `b · capacity` and whose length is `cache_len[b]`; the
/// grid and the workspace count `seqs · m · heads` pairs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttentionV2Params {
    pub base: AttentionParams,
    pub workspace: *mut u8,
    pub splits: u32,
    /// Sequences in the batch (0: one).
    pub seqs: u32,
}

/// Parameters of `silu_mul_f32`: out[i, j] = silu(gu[i, j]) · gu[i, ffn + j] for the fused
/// gate / up projection `gu [m, 2·ffn]`. One thread per 4 outputs (`ffn` a multiple of 4, buffers
/// 16-byte aligned): `grid.x = ceil(m · ffn / 4 / block.x)`, no shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SiluMulParams {
    pub gu: *const f32,
    pub out: *mut f32,
    pub ffn: u32,
    pub m: u32,
}

// SAFETY: plain addresses and sizes, as for `SoftmaxStatsParams`.
unsafe impl Send for RmsNormParams {}
unsafe impl Sync for RmsNormParams {}
unsafe impl Send for EmbedParams {}
unsafe impl Sync for EmbedParams {}
unsafe impl Send for QkvRopeParams {}
unsafe impl Sync for QkvRopeParams {}
unsafe impl Send for AttentionParams {}
unsafe impl Sync for AttentionParams {}
unsafe impl Send for SiluMulParams {}
unsafe impl Send for AttentionV2Params {}
unsafe impl Sync for AttentionV2Params {}
unsafe impl Sync for SiluMulParams {}

const _: () = assert!(core::mem::size_of::<RmsNormParams>() == 48);
const _: () = assert!(core::mem::size_of::<EmbedParams>() == 40);
const _: () = assert!(core::mem::size_of::<QkvRopeParams>() == 88);
const _: () = assert!(core::mem::size_of::<AttentionParams>() == 64);
const _: () = assert!(core::mem::size_of::<SiluMulParams>() == 24);
const _: () = assert!(core::mem::size_of::<AttentionV2Params>() == 80);

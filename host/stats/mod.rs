//! Logits as the kernels read them, and the options of the statistics pass; everything a user
//! passes is validated here once, before any backend touches memory. [`cpu`] is the CPU twin of the
//! `softmax_stats` kernel.

pub mod cpu;
pub mod rows;

use half::{bf16, f16};
use speckv_kernels::params::{
    MlpWeights, SoftmaxStatsParams, StatsRow, StepCosts, StopState, STATS_ACCUMULATE,
    STATS_ACCUM_RESET, STATS_SAMPLE, STOP_TIMES,
};

use crate::error::{Error, Result};

/// Element type of logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Result<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| Error::Unknown {
                what: "dtype",
                value: s.to_string(),
                expected: "f32, f16, bf16",
            })
    }
}

/// Borrowed logits of one dtype.
#[derive(Clone, Copy, Debug)]
pub enum LogitsData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> LogitsData<'a> {
    pub fn len(&self) -> usize {
        match self {
            LogitsData::F32(d) => d.len(),
            LogitsData::F16(d) => d.len(),
            LogitsData::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            LogitsData::F32(_) => Dtype::F32,
            LogitsData::F16(_) => Dtype::F16,
            LogitsData::Bf16(_) => Dtype::Bf16,
        }
    }

    pub fn bytes(&self) -> &'a [u8] {
        match self {
            LogitsData::F32(d) => bytemuck::cast_slice(d),
            LogitsData::F16(d) => bytemuck::cast_slice(d),
            LogitsData::Bf16(d) => bytemuck::cast_slice(d),
        }
    }

    /// Element `i` as f32 (exact for every dtype).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            LogitsData::F32(d) => d[i],
            LogitsData::F16(d) => d[i].to_f32(),
            LogitsData::Bf16(d) => d[i].to_f32(),
        }
    }
}

/// Largest vocabulary the kernels take: indices stay below 2^31 so they fit an `i32` token id and
/// the strided loops cannot overflow.
pub const MAX_VOCAB: usize = (1 << 31) - 1024;

/// A validated `[rows, vocab]` view with a row stride (in elements).
#[derive(Clone, Copy, Debug)]
pub struct Logits<'a> {
    data: LogitsData<'a>,
    rows: usize,
    vocab: usize,
    row_stride: usize,
}

impl<'a> Logits<'a> {
    /// Checks that `data` holds `rows` rows of `vocab` logits, `row_stride` elements apart.
    pub fn new(data: LogitsData<'a>, rows: usize, vocab: usize, row_stride: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::Empty { what: "rows" });
        }
        if vocab == 0 {
            return Err(Error::Empty { what: "vocab" });
        }
        if vocab > MAX_VOCAB {
            return Err(Error::VocabTooLarge {
                vocab,
                max: MAX_VOCAB,
            });
        }
        if row_stride < vocab {
            return Err(Error::StrideTooSmall {
                stride: row_stride,
                vocab,
            });
        }
        if rows > u32::MAX as usize || row_stride > u32::MAX as usize {
            return Err(Error::TooLarge("rows or row stride"));
        }
        let need = (rows - 1)
            .checked_mul(row_stride)
            .and_then(|n| n.checked_add(vocab))
            .ok_or(Error::TooLarge("rows × row stride"))?;
        if data.len() < need {
            return Err(Error::LogitsLength {
                got: data.len(),
                need,
                rows,
                vocab,
                stride: row_stride,
            });
        }
        Ok(Logits {
            data,
            rows,
            vocab,
            row_stride,
        })
    }

    /// Dense rows (stride = vocab); the length must be a whole number of rows.
    pub fn dense(data: LogitsData<'a>, vocab: usize) -> Result<Self> {
        if vocab == 0 {
            return Err(Error::Empty { what: "vocab" });
        }
        if !data.len().is_multiple_of(vocab) {
            return Err(Error::Length {
                what: "logits (not a whole number of rows)",
                got: data.len(),
                expected: (data.len() / vocab + 1) * vocab,
            });
        }
        Logits::new(data, data.len() / vocab, vocab, vocab)
    }

    pub fn data(&self) -> LogitsData<'a> {
        self.data
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }
    /// Bytes the statistics pass reads.
    pub fn bytes_read(&self) -> usize {
        self.rows * self.vocab * self.dtype().size()
    }
}

/// How the statistics pass treats the feature accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Accumulate {
    /// Leave them alone.
    #[default]
    No,
    /// Add this row to `accum[row]`.
    Add,
    /// Start `accum[row]` afresh with this row (first draft of a speculation step).
    Reset,
}

/// Options of the statistics pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StatsOptions {
    /// Softmax temperature; 0 means greedy (statistics of softmax(x), sampled = argmax).
    pub temperature: f32,
    /// Draw a token from softmax(x / T).
    pub sample: bool,
    /// Philox seed and step (the stream is the row).
    pub seed: u64,
    pub step: u64,
    pub accumulate: Accumulate,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions {
            temperature: 1.0,
            sample: false,
            seed: 0,
            step: 0,
            accumulate: Accumulate::No,
        }
    }
}

impl StatsOptions {
    pub fn validate(&self) -> Result<()> {
        check_temperature(self.temperature)
    }

    pub fn kernel_flags(&self) -> u32 {
        let mut f = 0;
        if self.sample {
            f |= STATS_SAMPLE;
        }
        match self.accumulate {
            Accumulate::No => {}
            Accumulate::Add => f |= STATS_ACCUMULATE,
            Accumulate::Reset => f |= STATS_ACCUMULATE | STATS_ACCUM_RESET,
        }
        f
    }
}

/// A temperature the kernels accept: 0 (greedy) or a normal, finite, positive number — below
/// `f32::MIN_POSITIVE` (≈ 1.18e-38) 1/T is not finite (and a GPU flushes it to zero).
pub fn check_temperature(t: f32) -> Result<()> {
    if !speckv_kernels::verify::valid_temperature(t) {
        return Err(Error::BadTemperature(t));
    }
    Ok(())
}

/// Block sizes the kernels accept.
pub fn check_block(block: u32) -> Result<()> {
    if block == 0 || block > 1024 || !block.is_multiple_of(32) {
        return Err(Error::BadBlockSize(block));
    }
    Ok(())
}

/// Checks the accumulator slice against the launch.
pub fn check_accum(accum_len: Option<usize>, rows: usize, opts: &StatsOptions) -> Result<()> {
    match (opts.accumulate, accum_len) {
        (Accumulate::No, _) => Ok(()),
        (_, None) => Err(Error::Other(
            "accumulation was requested but no accumulator slice was given".to_string(),
        )),
        (_, Some(n)) if n != rows => Err(Error::Length {
            what: "accumulators",
            got: n,
            expected: rows,
        }),
        _ => Ok(()),
    }
}

/// A launch of `softmax_stats_v3` over `logit_rows` rows of logits: launch row k reads logits row
/// `rows[k]` with `opts[k]` (each valid) and updates accumulator k (`accums` has one per row).
pub fn check_stats_rows(
    rows: &[usize],
    opts: &[StatsOptions],
    accums: usize,
    logit_rows: usize,
) -> Result<()> {
    for (what, got) in [("row options", opts.len()), ("accumulators", accums)] {
        if got != rows.len() {
            return Err(Error::Length {
                what,
                got,
                expected: rows.len(),
            });
        }
    }
    for o in opts {
        o.validate()?;
    }
    match rows.iter().find(|&&r| r >= logit_rows) {
        Some(r) => Err(Error::Other(format!("logits row {r} of {logit_rows} rows"))),
        None => Ok(()),
    }
}

/// The row descriptions of a checked [`check_stats_rows`] launch into `out` (cleared first): row
/// k reads `rows[k]`, draws from Philox stream 0 as a one-row launch does, and owns accumulator k.
pub fn fill_stats_rows(rows: &[usize], opts: &[StatsOptions], out: &mut Vec<StatsRow>) {
    out.clear();
    out.extend(
        rows.iter()
            .zip(opts)
            .enumerate()
            .map(|(k, (&row, o))| StatsRow {
                seed: o.seed,
                step: o.step,
                row: row as u32,
                stream: 0,
                temperature: o.temperature,
                flags: o.kernel_flags(),
                accum_slot: k as u32,
                _pad: 0,
            }),
    );
}

/// Kernel parameters for validated inputs, with the caller's (host or device) addresses.
pub fn stats_params(
    logits: &Logits<'_>,
    opts: &StatsOptions,
    logits_ptr: *const u8,
    out_ptr: *mut speckv_kernels::params::RowStats,
    accum_ptr: *mut speckv_kernels::params::FeatureAccum,
) -> SoftmaxStatsParams {
    SoftmaxStatsParams {
        logits: logits_ptr,
        out: out_ptr,
        accum: accum_ptr,
        seed: opts.seed,
        step: opts.step,
        rows: logits.rows() as u32,
        vocab: logits.vocab() as u32,
        row_stride: logits.row_stride() as u32,
        temperature: opts.temperature,
        flags: opts.kernel_flags(),
        _pad: 0,
    }
}

/// The per-token stopping rule's inputs for one draft step (the `auto` policy), and its state
/// across the step's drafts: what `softmax_stats_v2` reads through `StopParams` and updates in its
/// `STATS_STOP` epilogue. After a draft, `state.kept` grew when the draft is kept, and
/// `state.stopped` is set when the step drafts no more. A step's first draft (`Accumulate::Reset`)
/// starts from [`StopState::START`] whatever `state` holds; a sequence that has stopped is left as
/// it is — neither its accumulator nor its state changes — as on the device.
#[derive(Clone, Copy, Debug)]
pub struct DraftStop<'a> {
    pub weights: &'a MlpWeights,
    /// The step's costs as the rule weighs them (any unit).
    pub costs: StepCosts,
    /// Most drafts this step, ≤ `STOP_TIMES − 1` (larger values are an error).
    pub gamma_max: u32,
    /// The target's compression code (0 fp16, 1 int8, 2 nf4).
    pub compression_code: f32,
    /// The online calibration's odds scale (1: the model as trained).
    pub odds_scale: f32,
    pub state: StopState,
}

/// What every launch with per-token stopping checks before it runs anything, one sequence or a
/// batch: accumulators on and γmax within the rule's table.
pub fn check_stop(opts: &StatsOptions, gamma_max: u32) -> Result<()> {
    if opts.accumulate == Accumulate::No {
        return Err(Error::Other(
            "per-token stopping needs accumulators (accumulate add or reset)".to_string(),
        ));
    }
    if gamma_max as usize >= STOP_TIMES {
        return Err(Error::Other(format!(
            "γmax {gamma_max} above the stopping rule's {}",
            STOP_TIMES - 1
        )));
    }
    Ok(())
}

impl DraftStop<'_> {
    /// The checks every pass makes before it runs anything ([`check_stop`]).
    pub fn check(&self, opts: &StatsOptions) -> Result<()> {
        check_stop(opts, self.gamma_max)
    }

    /// The state the device starts this draft from (a reset starts the step).
    pub fn entry_state(&self, opts: &StatsOptions) -> StopState {
        if opts.accumulate == Accumulate::Reset {
            StopState::START
        } else {
            self.state
        }
    }
}

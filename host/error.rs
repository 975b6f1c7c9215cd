//! speckv's typed errors: every bad input says what was wrong.

use speckv_kernels::emu::EmuError;

/// Result with speckv's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} must be at least 1 (got 0)")]
    Empty { what: &'static str },
    #[error("vocab {vocab} is too large: at most {max} tokens per row")]
    VocabTooLarge { vocab: usize, max: usize },
    #[error("row stride {stride} is smaller than vocab {vocab}")]
    StrideTooSmall { stride: usize, vocab: usize },
    #[error("logits hold {got} elements but {rows} rows of vocab {vocab} at stride {stride} need {need}")]
    LogitsLength {
        got: usize,
        need: usize,
        rows: usize,
        vocab: usize,
        stride: usize,
    },
    #[error("{what} has length {got}, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error(
        "temperature must be 0 (greedy) or a finite number >= 1.18e-38 (f32::MIN_POSITIVE, so 1/T \
         is finite), got {0:e}"
    )]
    BadTemperature(f32),
    #[error("block size {0} is not a multiple of 32 between 32 and 1024")]
    BadBlockSize(u32),
    #[error("sequence {seq}: γ = {gamma} is outside 0..={max}")]
    BadGamma { seq: usize, gamma: i32, max: usize },
    #[error(
        "sequence {seq}, position {pos}: draft token {token} is outside the vocabulary 0..{vocab}"
    )]
    BadToken {
        seq: usize,
        pos: usize,
        token: i32,
        vocab: usize,
    },
    #[error("{0} does not fit the kernels' 32-bit sizes")]
    TooLarge(&'static str),
    #[error("unknown {what} {value:?}; expected one of {expected}")]
    Unknown {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the CUDA backend is unavailable: {0}")]
    NoCuda(String),
    #[error(
        "no PTX is embedded in this build ({0}); rebuild with network access so build.rs can \
         install the kernel toolchain (kernels/toolchain/rust-toolchain.toml) with rust-src"
    )]
    NoPtx(String),
    #[error("the GPU's compute capability {major}.{minor} is below the oldest PTX built (sm_80)")]
    UnsupportedDevice { major: i32, minor: i32 },
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("CUDA driver call failed: {0}")]
    CudaCall(String),
    #[error("wrong stream: {0}")]
    WrongStream(String),
    #[error("null pointer: {0}")]
    NullPointer(&'static str),
    #[error("malformed model: {0}")]
    BadModel(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("decoding step {step}: the model produced {what}; no token can be chosen from it")]
    NonFiniteLogits { step: usize, what: String },
    #[error(
        "{what} needs {need_bytes} bytes of memory, more than the {budget_bytes} allowed ({hint})"
    )]
    TooMuchMemory {
        what: &'static str,
        need_bytes: u128,
        budget_bytes: u128,
        hint: &'static str,
    },
    #[error("emulator: {0}")]
    Emulator(#[from] EmuError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

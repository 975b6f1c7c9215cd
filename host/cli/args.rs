//! What several commands share: the model-pair arguments (flattened into `generate`, `profile` and
//! `bench decode`), the draft's catch-up window, JSON output, progress bars and the checks of
//! common numbers.

use std::path::{Path, PathBuf};

use speckv::weights::Regime;
use speckv::{Error, Result};

/// A target GGUF, its draft (a second GGUF or a layer subset of the target) and the target's
/// weight regime.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Target GGUF (scripts/fetch-model).
    #[arg(long)]
    pub model: PathBuf,
    /// Draft GGUF (same tokenizer); default: the target itself skipping every other layer.
    #[arg(long, conflicts_with = "draft_layers")]
    pub draft: Option<PathBuf>,
    /// Self-speculative draft keeping these layers (from `speckv calibrate-draft`).
    #[arg(long, value_delimiter = ',')]
    pub draft_layers: Option<Vec<usize>>,
    /// Target weight regime: `gguf` keeps the file's own blocks (Q4_K, Q6_K, ...) and multiplies
    /// them by integer dot products; fp16 / int8 / nf4 re-store the dequantised weights.
    #[arg(long, value_enum, default_value_t = Regime::Gguf)]
    pub target: Regime,
    /// Weight regime of a `--draft` model (default: its own GGUF blocks).
    #[arg(long, value_enum, default_value_t = Regime::Gguf)]
    pub draft_regime: Regime,
}

impl ModelArgs {
    /// Loads the pair (target and draft in their regimes).
    pub fn load(&self) -> Result<speckv::decode::pair::Pair> {
        speckv::decode::pair::Pair::load(
            &self.model,
            self.draft.as_deref(),
            self.draft_layers.as_deref(),
            self.target,
            self.draft_regime,
        )
    }
}

pub fn json_out<T: serde::Serialize>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Error::Other(e.to_string()))?
    );
    Ok(())
}

/// Writes `v` as pretty JSON to `path`.
pub fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(v).map_err(|e| Error::Other(e.to_string()))?,
    )
    .map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{elapsed}} (eta {{eta}}) {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// A sampling temperature: finite and ≥ 0 (0 = greedy).
pub fn check_temperature(t: f32) -> Result<()> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(Error::BadTemperature(t));
    }
    Ok(())
}

/// A measurement time: finite and > 0.
pub fn check_seconds(seconds: f64) -> Result<std::time::Duration> {
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(Error::Other(format!(
            "--seconds must be positive, got {seconds}"
        )));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// The draft's catch-up window, flattened into `generate`, `bench decode` and `bench batch`.
#[derive(clap::Args, Debug)]
pub struct CatchUpArgs {
    /// The most committed tokens the draft catches up on (the pending token included) when it
    /// drafts after steps in which it drafted nothing (`auto`'s plain steps); it never sees the
    /// older ones (its positions then trail the target's). `all`: every one.
    #[arg(long, default_value_t = CatchUp(Some(speckv::decode::DRAFT_CATCH_UP)))]
    draft_catch_up: CatchUp,
}

impl CatchUpArgs {
    /// The window as `GenConfig::draft_catch_up` takes it (`None`: every token).
    pub fn window(&self) -> Option<usize> {
        self.draft_catch_up.0
    }
}

/// `--draft-catch-up`'s value: `all`, or the most committed tokens the draft is fed before a step's
/// first draft after steps in which it drafted nothing (at least 1: the pending token).
#[derive(Clone, Copy, Debug)]
pub struct CatchUp(Option<usize>);

impl std::fmt::Display for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("all"),
        }
    }
}

impl std::str::FromStr for CatchUp {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<CatchUp, String> {
        if s == "all" {
            return Ok(CatchUp(None));
        }
        match s.parse::<usize>() {
            Ok(0) => Err("at least 1 (the pending token), or `all`".into()),
            Ok(n) => Ok(CatchUp(Some(n))),
            Err(_) => Err(format!("{s:?} is neither a token count nor `all`")),
        }
    }
}

//! Backend selection: CUDA when a device is present, else the CPU; `--backend` forces one.

pub mod cpu;
pub mod cuda;
pub mod emulate;
pub mod external;
pub mod forward;
pub mod verify_v2;

use std::time::{Duration, Instant};

use speckv_kernels::params::{FeatureAccum, RowStats};

use crate::error::{Error, Result};
use crate::stats::{Logits, StatsOptions};
use cpu::CpuBackend;
use cuda::CudaBackend;

/// Which backend the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// CUDA when a device is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A backend every feature runs on.
pub enum Backend {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl Backend {
    pub fn new(kind: BackendKind) -> Result<Backend> {
        match kind {
            BackendKind::Cpu => Ok(Backend::Cpu(CpuBackend::new())),
            BackendKind::Cuda => Ok(Backend::Cuda(Box::new(CudaBackend::new(0)?))),
            BackendKind::Auto => {
                if cuda::driver_present() {
                    match CudaBackend::new(0) {
                        Ok(c) => return Ok(Backend::Cuda(Box::new(c))),
                        Err(e) => {
                            eprintln!("speckv: CUDA present but unusable ({e}); using the CPU")
                        }
                    }
                }
                Ok(Backend::Cpu(CpuBackend::new()))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu(_) => "cpu",
            Backend::Cuda(_) => "cuda",
        }
    }

    pub fn device(&self) -> String {
        match self {
            Backend::Cpu(c) => c.device_name(),
            Backend::Cuda(c) => c.device_name().to_string(),
        }
    }

    pub fn softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        accum: Option<&mut [FeatureAccum]>,
    ) -> Result<Vec<RowStats>> {
        match self {
            Backend::Cpu(c) => c.softmax_stats(logits, opts, accum),
            Backend::Cuda(c) => c.softmax_stats(logits, opts, accum),
        }
    }

    /// Batched verification.
    pub fn verify(
        &self,
        v: &crate::verify::VerifyBatch<'_>,
    ) -> Result<crate::verify::VerifyOutput> {
        match self {
            Backend::Cpu(c) => c.verify(v),
            Backend::Cuda(c) => c.verify(v),
        }
    }

    /// Time of one verification launch (device-resident on CUDA), averaged over at least `min_time`.
    pub fn time_verify(
        &self,
        v: &crate::verify::VerifyBatch<'_>,
        min_time: Duration,
    ) -> Result<Duration> {
        match self {
            Backend::Cpu(c) => time_host(min_time, 3, || c.verify(v)),
            Backend::Cuda(c) => {
                time_device(min_time, |n| c.time_verify(v, n, cuda::KernelVersion::V2))
            }
        }
    }

    /// Time of one statistics pass over `logits` (device-resident on CUDA), averaged over at least
    /// `min_time`.
    pub fn time_softmax_stats(
        &self,
        logits: &Logits<'_>,
        opts: &StatsOptions,
        min_time: Duration,
    ) -> Result<Duration> {
        match self {
            Backend::Cpu(c) => time_host(min_time, 3, || c.softmax_stats(logits, opts, None)),
            Backend::Cuda(c) => time_device(min_time, |n| {
                c.time_softmax_stats(logits, opts, n, cuda::KernelVersion::V2)
            }),
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            _ => Err(Error::Unknown {
                what: "backend",
                value: s.to_string(),
                expected: "auto, cpu, cuda",
            }),
        }
    }
}

/// Mean wall time of `f` on the host: one warm-up call, then calls until `min_time` has passed
/// and at least `min_calls` were made.
pub fn time_host<T>(
    min_time: Duration,
    min_calls: u32,
    mut f: impl FnMut() -> Result<T>,
) -> Result<Duration> {
    f()?;
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < min_time || n < min_calls.max(1) {
        std::hint::black_box(f()?);
        n += 1;
    }
    Ok(start.elapsed() / n)
}

/// Mean time of a device launch measured by `timed(iters)`: a short probe of 3, then enough
/// iterations to fill about `min_time` (3 to 10,000).
pub fn time_device(
    min_time: Duration,
    mut timed: impl FnMut(u32) -> Result<Duration>,
) -> Result<Duration> {
    let one = timed(3)?;
    let iters = (min_time.as_secs_f64() / one.as_secs_f64().max(1e-7)).clamp(3.0, 10_000.0);
    timed(iters as u32)
}

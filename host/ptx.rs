//! The PTX built by `build.rs` from `kernels/`, embedded in the library.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

pub use speckv_kernels::entries::ENTRY_POINTS;

use crate::error::{Error, Result};

/// An architecture PTX is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Sm80,
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The newest architecture whose PTX a device of compute capability `major.minor` runs.
    pub fn for_capability(major: i32, minor: i32) -> Result<Arch> {
        match (major, minor) {
            (m, _) if m >= 9 => Ok(Arch::Sm90),
            (8, _) => Ok(Arch::Sm80),
            _ => Err(Error::UnsupportedDevice { major, minor }),
        }
    }

    /// This architecture's PTX, or why there is none.
    pub fn ptx(self) -> Result<&'static str> {
        let ptx = match self {
            Arch::Sm80 => PTX_SM_80,
            Arch::Sm90 => PTX_SM_90,
        };
        ptx.ok_or_else(|| Error::NoPtx(PTX_BUILD_ERROR.unwrap_or("not built").to_string()))
    }

    pub fn parse(s: &str) -> Result<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::Unknown {
                what: "architecture",
                value: s.to_string(),
                expected: "sm_80, sm_90",
            })
    }
}

/// The architectures whose PTX this build embeds.
pub fn built_archs() -> Vec<&'static str> {
    Arch::ALL
        .into_iter()
        .filter(|a| a.ptx().is_ok())
        .map(Arch::name)
        .collect()
}

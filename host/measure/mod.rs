//! Measurements on a backend, above every kernel's host side: `speckv report` ([`report`]), the
//! losslessness simulation behind `speckv verify-sim` ([`verify_sim`]), the γ decision's overhead
//! ([`overhead`]) and the weight regimes' measured step costs ([`regime`]).

pub mod overhead;
pub mod regime;
pub mod report;
pub mod verify_sim;

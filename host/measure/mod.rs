//! Measurements on a backend, above every kernel's host side: `speckv report` ([`report`]), the
//! losslessness simulation behind `speckv verify-sim` ([`verify_sim`]), the γ decision's overhead
//! ([`overhead`]), the weight regimes' measured step costs ([`regime`]), and the GPU kernel
//! benchmark with a cold L2 against the device's copy bandwidth ([`gpu_bench`]).

pub mod batch_step;
pub mod cpu_bench;
pub mod device_step;
pub mod gpu_bench;
pub mod overhead;
pub mod regime;
pub mod report;
pub mod verify_sim;

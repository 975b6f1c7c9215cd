//! speckv's GPU kernels, written in Rust.
//!
//! The same source has two destinations:
//! - on `nvptx64-nvidia-cuda` (nightly, `-Zbuild-std=core`) it compiles to PTX; every kernel has one
//!   `extern "ptx-kernel"` entry point per input dtype, taking its `#[repr(C)]` parameter struct by value;
//! - on the host (stable Rust) the very same kernel functions run inside [`emu`], a CPU emulator of the
//!   CUDA execution model (grid and block indices, `bar.sync`, dynamic shared memory, 32-lane warp
//!   shuffles), so `cargo test` exercises the kernels without a GPU.
//!
//! Only [`gpu`] differs between the two: on the GPU it is inline PTX, on the host it talks to the
//! emulator. Module boundaries follow the data: logits → statistics ([`softmax_stats`]) → decision →
//! verification.
#![cfg_attr(target_arch = "nvptx64", no_std)]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(
        abi_ptx,
        stdarch_nvptx,
        asm_experimental_arch,
        gpu_intrinsics,
        gpu_launch_sized_workgroup_mem,
        core_intrinsics
    )
)]
// Kernels are raw-pointer code by nature; each entry point documents what its parameters must satisfy.
#![allow(clippy::missing_safety_doc)]
#![cfg_attr(target_arch = "nvptx64", allow(internal_features))]

/// Every PTX entry point by name (also `include!`d by `build.rs`).
pub mod attention;
pub mod embed;
pub mod entries;
pub mod gamma_mlp;
pub mod gemv;
pub mod gpu;
pub mod params;
pub mod philox;
pub mod qkv_rope;
pub mod reduce;
pub mod rms_norm;
pub mod rows;
pub mod silu_mul;
pub mod softmax_stats;
pub mod stop_rule;
pub mod verify;

#[cfg(not(target_arch = "nvptx64"))]
pub mod emu;

/// A kernel that reaches this has a bug (there is no unwinding on the GPU): `trap` aborts the launch,
/// which the host sees as a launch error rather than silent garbage. The kernels are written so that
/// no panic path is reachable (no slice indexing, no division by a value that can be zero);
/// `build.rs` rejects PTX that references any external function.
#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` takes no operands and ends the kernel.
    unsafe { core::arch::asm!("trap;", options(noreturn)) }
}

//! Helpers the C ABI's test files share.

use std::ffi::CStr;
use std::ptr::null_mut;

use speckv_c::*;

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: speckv_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(speckv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A new CPU context.
#[allow(dead_code)] // not every test file opens a context
pub fn cpu() -> *mut SpeckvContext {
    let mut ctx = null_mut();
    // SAFETY: `ctx` is a valid out-pointer.
    assert_eq!(
        unsafe { speckv_context_create_cpu(&mut ctx) },
        SpeckvStatus::Ok
    );
    assert!(!ctx.is_null());
    ctx
}

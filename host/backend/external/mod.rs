//! Launching the kernels on memory and streams another engine owns (the C ABI and the Python
//! binding's CUDA path): raw driver calls on the caller's `CUcontext` and `CUstream`, the embedded
//! PTX loaded once per context, parameters passed by value exactly as [`crate::backend::cuda`] passes them.
//! Nothing is allocated per launch: the v2 kernels' scratch is one workspace per context, grown only
//! when a larger shape than any before arrives. Not yet run on a GPU (no device was lent while writing it):
//! validated by the CPU emulator and ptxas only through the same kernels and launch shapes.

mod stats;

use std::collections::HashMap;
use std::ffi::{c_void, CStr};

use cudarc::driver::sys::{
    self, CUcontext, CUdevice_attribute, CUfunction, CUmodule, CUresult, CUstream,
};
use speckv_kernels::params::{GammaMlpParams, SoftmaxStatsParams, VerifyParams};

use crate::backend::cuda::{
    driver_present, KernelFn, PodStop, GAMMA_BLOCK, STATS_BLOCK, VERIFY_BLOCK,
};
use crate::error::{Error, Result};
use crate::ptx::Arch;
use crate::stats::Dtype;

fn check(r: CUresult, what: &str) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    let name = unsafe {
        if sys::cuGetErrorString(r, &mut s) == CUresult::CUDA_SUCCESS && !s.is_null() {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(Error::CudaCall(format!("{what}: {name}")))
}

/// The kernels loaded into a caller's context.
pub struct ExternalCuda {
    ctx: CUcontext,
    module: CUmodule,
    functions: HashMap<KernelFn, CUfunction>,
    pub arch: Arch,
    /// Streaming multiprocessors of the context's device (the v2 launch plans).
    pub sm_count: u32,
    /// Scratch of the v2 kernels, grown (never per launch) when a larger shape arrives.
    workspace: std::sync::Mutex<Option<DeviceBuffer>>,
    /// The per-token stopping rule's parameters (`StopParams`, which the kernel reads from device
    /// memory) and the bytes last copied there.
    stop_slot: std::sync::Mutex<Option<(DeviceBuffer, Box<PodStop>)>>,
    /// Where a lockstep stopping launch's rows meet (`LockstepScratch`), allocated zeroed by the
    /// first such launch; every launch leaves it zeroed.
    lockstep: std::sync::Mutex<Option<DeviceBuffer>>,
}

// SAFETY: CUcontext, CUmodule and CUfunction handles may be used from any thread (the driver API
// is thread-safe); `ExternalCuda` makes its context current around every call.
unsafe impl Send for ExternalCuda {}

/// Makes `ctx` current for the guard's lifetime.
struct Current;
impl Current {
    fn push(ctx: CUcontext) -> Result<Current> {
        // SAFETY: pushing a context handle the caller vouched for; popped on drop.
        check(unsafe { sys::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")?;
        Ok(Current)
    }
}
impl Drop for Current {
    fn drop(&mut self) {
        let mut old: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context `push` pushed.
        unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

impl ExternalCuda {
    /// Loads the embedded PTX into `ctx` (null: the calling thread's current context).
    ///
    /// # Safety
    /// `ctx` must be null or a live CUDA context that outlives the returned value.
    pub unsafe fn new(ctx: *mut c_void) -> Result<ExternalCuda> {
        if !driver_present() {
            return Err(Error::NoCuda(
                "no CUDA driver library (libcuda) was found".to_string(),
            ));
        }
        // SAFETY: cuInit is idempotent.
        check(unsafe { sys::cuInit(0) }, "cuInit")?;
        let mut ctx = ctx as CUcontext;
        if ctx.is_null() {
            // SAFETY: writes the current context handle (null when none).
            check(unsafe { sys::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
            if ctx.is_null() {
                return Err(Error::NoCuda(
                    "no CUDA context given and none is current on this thread".to_string(),
                ));
            }
        }
        let _cur = Current::push(ctx)?;
        let mut dev = 0;
        // SAFETY: the context is current; writes its device ordinal.
        check(unsafe { sys::cuCtxGetDevice(&mut dev) }, "cuCtxGetDevice")?;
        let attr = |a| -> Result<i32> {
            let mut v = 0;
            // SAFETY: writes one attribute of a valid device.
            check(
                unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
                "cuDeviceGetAttribute",
            )?;
            Ok(v)
        };
        let sm_count =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let arch = Arch::for_capability(major, minor)?;
        let ptx = std::ffi::CString::new(arch.ptx()?)
            .map_err(|_| Error::Other("embedded PTX holds a NUL byte".to_string()))?;
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: `ptx` is a NUL-terminated PTX image; the module lives until `drop`.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        let mut functions = HashMap::new();
        for f in KernelFn::ALL {
            let name = std::ffi::CString::new(f.entry()).expect("entry names hold no NUL");
            let mut func: CUfunction = std::ptr::null_mut();
            // SAFETY: looks an entry up in the module just loaded.
            check(
                unsafe { sys::cuModuleGetFunction(&mut func, module, name.as_ptr()) },
                f.entry(),
            )?;
            functions.insert(f, func);
        }
        Ok(ExternalCuda {
            ctx,
            module,
            functions,
            arch,
            sm_count,
            workspace: std::sync::Mutex::new(None),
            stop_slot: std::sync::Mutex::new(None),
            lockstep: std::sync::Mutex::new(None),
        })
    }

    /// Checks that `stream` (null: the legacy default stream) belongs to this context.
    pub fn check_stream(&self, stream: *mut c_void) -> Result<()> {
        if stream.is_null() {
            return Ok(());
        }
        let mut owner: CUcontext = std::ptr::null_mut();
        // SAFETY: queries the context of a stream handle; an invalid handle returns an error.
        check(
            unsafe { sys::cuStreamGetCtx(stream as CUstream, &mut owner) },
            "cuStreamGetCtx",
        )?;
        if owner != self.ctx {
            return Err(Error::WrongStream(
                "the stream belongs to another CUDA context".to_string(),
            ));
        }
        Ok(())
    }

    /// # Safety
    /// `params` must describe live buffers of this context.
    unsafe fn launch<T>(
        &self,
        f: KernelFn,
        grid: u32,
        block: u32,
        shared: usize,
        stream: *mut c_void,
        params: &T,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let _cur = Current::push(self.ctx)?;
        let mut args = [params as *const T as *mut c_void];
        // SAFETY: the kernel's only parameter is `T` by value (its `#[repr(C)]` struct); the
        // driver copies it before returning; buffers are the caller's per this fn's contract.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    self.functions[&f],
                    grid,
                    1,
                    1,
                    block,
                    1,
                    1,
                    shared as u32,
                    stream as CUstream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            f.entry(),
        )
    }

    /// A device scratch area of at least `bytes` bytes, zeroed when it is (re)allocated; the
    /// kernels that use it leave their counters zero again. Grows only when a launch needs more than
    /// any before (after synchronising `stream`, so no launch still uses the old area).
    fn workspace(&self, bytes: usize, stream: *mut c_void) -> Result<u64> {
        let mut w = self
            .workspace
            .lock()
            .map_err(|_| Error::Other("workspace lock poisoned".to_string()))?;
        let have = w.as_ref().map(|b| b.bytes).unwrap_or(0);
        if have < bytes {
            let _cur = Current::push(self.ctx)?;
            // SAFETY: waits for the launches that may still use the old area.
            check(
                unsafe { sys::cuStreamSynchronize(stream as CUstream) },
                "cuStreamSynchronize",
            )?;
            *w = None;
            let grow = bytes.max(2 * have).max(4096);
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: allocates and zeroes `grow` bytes in the current context.
            unsafe {
                check(sys::cuMemAlloc_v2(&mut ptr, grow), "cuMemAlloc")?;
                let buf = DeviceBuffer {
                    ctx: self.ctx,
                    ptr,
                    bytes: grow,
                };
                check(sys::cuMemsetD8_v2(ptr, 0, grow), "cuMemsetD8")?;
                *w = Some(buf);
            }
        }
        Ok(w.as_ref().map(|b| b.ptr).unwrap_or(0))
    }

    /// Zeroes `bytes` bytes at device address `at`, asynchronously on `stream`.
    fn zero_async(&self, at: u64, bytes: usize, stream: *mut c_void) -> Result<()> {
        let _cur = Current::push(self.ctx)?;
        // SAFETY: `at` is this context's workspace, at least `bytes` long.
        check(
            unsafe { sys::cuMemsetD8Async(at, 0, bytes, stream as CUstream) },
            "cuMemsetD8Async",
        )
    }

    /// Verification by the v2 kernels (the draft rows' statistics in logits mode, then
    /// `verify_v2_rows` and `verify_v2_sample`) on the caller's buffers described by v1's
    /// parameters; the scratch is this context's workspace.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats`].
    pub unsafe fn verify(&self, dtype: Dtype, p: &VerifyParams, stream: *mut c_void) -> Result<()> {
        let plan = speckv_kernels::verify::full_plan_v2(
            p.batch,
            p.gamma_max,
            p.vocab,
            dtype.size(),
            self.sm_count,
        );
        let ws = self.workspace(plan.bytes, stream)?;
        self.zero_async(ws, plan.stats_partials, stream)?;
        for l in crate::backend::verify_v2::launches(p, dtype, &plan, ws) {
            // SAFETY: forwarded; the workspace holds the plan's scratch, counters zeroed.
            unsafe {
                match l.step {
                    crate::backend::verify_v2::Step::DraftStats(sp) => {
                        self.launch(l.f, l.grid, l.block, l.shared, stream, &sp)
                    }
                    crate::backend::verify_v2::Step::Verify(_, vp) => {
                        self.launch(l.f, l.grid, l.block, l.shared, stream, &vp)
                    }
                }
            }?;
        }
        Ok(())
    }

    /// `softmax_stats` v1 (one block per row), kept for comparison.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats`].
    pub unsafe fn softmax_stats_v1(
        &self,
        dtype: Dtype,
        p: &SoftmaxStatsParams,
        stream: *mut c_void,
    ) -> Result<()> {
        let shared = speckv_kernels::softmax_stats::shared_bytes(STATS_BLOCK);
        // SAFETY: forwarded.
        unsafe {
            self.launch(
                KernelFn::SoftmaxStats(dtype),
                p.rows,
                STATS_BLOCK,
                shared,
                stream,
                p,
            )
        }
    }

    /// Verification by the v1 kernel (one block per sequence), kept for comparison.
    ///
    /// # Safety
    /// As [`ExternalCuda::softmax_stats`].
    pub unsafe fn verify_v1(
        &self,
        dtype: Dtype,
        p: &VerifyParams,
        stream: *mut c_void,
    ) -> Result<()> {
        let shared = speckv_kernels::verify::shared_bytes(VERIFY_BLOCK);
        // SAFETY: forwarded.
        unsafe {
            self.launch(
                KernelFn::Verify(dtype),
                p.batch,
                VERIFY_BLOCK,
                shared,
                stream,
                p,
            )
        }
    }

    /// # Safety
    /// As [`ExternalCuda::softmax_stats`].
    pub unsafe fn gamma_mlp(&self, p: &GammaMlpParams, stream: *mut c_void) -> Result<()> {
        // SAFETY: forwarded.
        unsafe {
            self.launch(
                KernelFn::GammaMlp,
                p.batch.div_ceil(GAMMA_BLOCK),
                GAMMA_BLOCK,
                0,
                stream,
                p,
            )
        }
    }
}

/// Device memory speckv owns in a caller's context (the controller's weights, uploaded once; the
/// v2 kernels' workspace).
pub struct DeviceBuffer {
    ctx: CUcontext,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

// SAFETY: a device address and its context handle, usable from any thread.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(_cur) = Current::push(self.ctx) {
            // SAFETY: frees the allocation `upload` made, once.
            unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

impl ExternalCuda {
    /// Copies `bytes` into new device memory of this context (synchronously).
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        let _cur = Current::push(self.ctx)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: allocates `bytes.len()` (at least 1) bytes in the current context.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.len().max(1)) },
            "cuMemAlloc",
        )?;
        let buf = DeviceBuffer {
            ctx: self.ctx,
            ptr,
            bytes: bytes.len().max(1),
        };
        // SAFETY: copies `bytes` into the allocation just made, of at least that size.
        check(
            unsafe { sys::cuMemcpyHtoD_v2(ptr, bytes.as_ptr() as *const c_void, bytes.len()) },
            "cuMemcpyHtoD",
        )?;
        Ok(buf)
    }
}

impl Drop for ExternalCuda {
    fn drop(&mut self) {
        if let Ok(_cur) = Current::push(self.ctx) {
            // SAFETY: unloads the module `new` loaded; no launch can follow.
            unsafe { sys::cuModuleUnload(self.module) };
        }
    }
}

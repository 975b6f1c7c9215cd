//! Launching the kernels on memory and streams another engine owns (the C ABI and the Python
//! binding's CUDA path): raw driver calls on the caller's `CUcontext` and `CUstream`, the embedded
//! PTX loaded once per context, parameters passed by value exactly as [`crate::backend::cuda`] passes them.
//! Nothing is allocated per launch. Not yet run on a GPU (no device was lent while writing it):
//! validated by the CPU emulator and ptxas only through the same kernels and launch shapes.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};

use cudarc::driver::sys::{
    self, CUcontext, CUdevice_attribute, CUfunction, CUmodule, CUresult, CUstream,
};
use speckv_kernels::params::{GammaMlpParams, SoftmaxStatsParams, VerifyParams};

use crate::backend::cuda::{driver_present, KernelFn, GAMMA_BLOCK, STATS_BLOCK, VERIFY_BLOCK};
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

    /// # Safety
    /// Every address in `p` must be a live device buffer of the size the kernel reads or writes
    /// (docs/kernels.md), in this context.
    pub unsafe fn softmax_stats(
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

    /// # Safety
    /// As [`ExternalCuda::softmax_stats`].
    pub unsafe fn verify(&self, dtype: Dtype, p: &VerifyParams, stream: *mut c_void) -> Result<()> {
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

/// Device memory speckv owns in a caller's context (the controller's weights, uploaded once).
pub struct DeviceBuffer {
    ctx: CUcontext,
    ptr: sys::CUdeviceptr,
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
        let buf = DeviceBuffer { ctx: self.ctx, ptr };
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

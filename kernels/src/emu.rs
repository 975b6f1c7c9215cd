//! A CPU emulator of the CUDA execution model, so the kernels' own source runs in `cargo test`.
//!
//! Every GPU thread of a block is a stackful coroutine ([`corosensei`]) on one OS thread, scheduled
//! cooperatively:
//! - `sync_threads` suspends a thread until every live (not yet returned) thread of its block has
//!   arrived — `bar.sync` semantics, with exited threads counted as arrived as on sm_70+;
//! - a warp shuffle deposits the lane's value and the lane it reads from, and suspends until every
//!   live lane of the warp has arrived; the scheduler then exchanges all values at once, so a lane
//!   never sees a value from a different shuffle. Reading a lane that does not exist or has exited,
//!   or a warp that never converges (a lane returns or waits at a barrier while others shuffle),
//!   is reported as an error instead of producing a value;
//! - dynamic shared memory is one zero-initialised (debug aid; CUDA leaves it undefined) buffer per
//!   block, 16-byte aligned.
//!
//! Blocks are independent (no grid-wide synchronisation), so they are spread over the machine's
//! cores, each OS thread running whole blocks one after another — a valid CUDA schedule.
//! A deadlock (threads waiting at different barriers) or a panic inside the kernel ends the
//! launch with an [`EmuError`] instead of hanging.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// One emulated launch's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: usize,
}

/// Why an emulated launch failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmuError {
    /// The launch shape is impossible on a CUDA device (zero sizes, block > 1024, shared > 227 KiB).
    BadLaunch(String),
    /// Threads of block `block` wait at different synchronisation points forever.
    Deadlock { block: u32, detail: String },
    /// The kernel panicked (a bug in the kernel, or a shuffle from an absent lane).
    KernelPanic { block: u32, message: String },
    /// The OS refused a coroutine stack.
    Stack(String),
}

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmuError::BadLaunch(m) => write!(f, "invalid launch: {m}"),
            EmuError::Deadlock { block, detail } => {
                write!(f, "deadlock in block {block}: {detail}")
            }
            EmuError::KernelPanic { block, message } => {
                write!(f, "kernel panicked in block {block}: {message}")
            }
            EmuError::Stack(m) => write!(f, "could not allocate a coroutine stack: {m}"),
        }
    }
}

impl std::error::Error for EmuError {}

/// What the kernel code running in the current coroutine sees.
pub struct ThreadCtx {
    pub thread_idx: u32,
    pub block_idx: u32,
    pub block_dim: u32,
    pub grid_dim: u32,
    pub shared: *mut u8,
    yielder: Cell<*const Yielder<(), Event>>,
    /// Shuffle mailbox of this lane: (value, source lane) in, exchanged value out.
    shfl_in: Cell<(u32, u32)>,
    shfl_out: Cell<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Barrier,
    Shuffle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    AtBarrier,
    AtShuffle,
    Done,
}

thread_local! {
    static CURRENT: Cell<*const ThreadCtx> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` on the current emulated thread's context.
///
/// # Panics
/// When called outside an emulated kernel (a kernel function called directly on the host).
#[inline]
pub fn with_thread<R>(f: impl FnOnce(&ThreadCtx) -> R) -> R {
    let ptr = CURRENT.with(|c| c.get());
    assert!(
        !ptr.is_null(),
        "a GPU intrinsic was called outside an emulated kernel launch"
    );
    // SAFETY: the scheduler points CURRENT at a context that outlives the resume it set it for,
    // and only this OS thread reads it.
    f(unsafe { &*ptr })
}

fn suspend(event: Event) {
    let y = with_thread(|t| t.yielder.get());
    // SAFETY: the yielder pointer was stored by this coroutine's own body, whose `&Yielder`
    // argument lives for the whole body, and we are inside that body.
    unsafe { (*y).suspend(event) }
}

pub fn sync_threads() {
    suspend(Event::Barrier);
}

/// A 32-bit warp shuffle: lane `l` receives the value of lane `src(l)`.
pub fn shuffle(v: u32, src: impl FnOnce(u32) -> u32) -> u32 {
    let lane = with_thread(|t| t.thread_idx % 32);
    let s = src(lane);
    with_thread(|t| t.shfl_in.set((v, s)));
    suspend(Event::Shuffle);
    with_thread(|t| t.shfl_out.get())
}

/// Coroutine stack size: generous, since host builds of kernel code may be unoptimised.
const STACK_BYTES: usize = 256 * 1024;

/// Most dynamic shared memory a block may have on sm_90 (227 KiB).
pub const MAX_SHARED_BYTES: usize = 227 * 1024;

/// Runs `kernel` for every thread of a `cfg.grid` × `cfg.block` launch.
///
/// # Safety
/// `kernel` runs with the GPU's memory model, not Rust's: every pointer it dereferences must be
/// valid for the accesses the kernel makes, and threads must not race (no two threads write, or
/// write and read, the same location without a barrier between them).
pub unsafe fn launch<F>(cfg: LaunchConfig, kernel: F) -> Result<(), EmuError>
where
    F: Fn() + Sync,
{
    if cfg.grid == 0 || cfg.block == 0 || cfg.block > 1024 {
        return Err(EmuError::BadLaunch(format!(
            "grid {} × block {}: both must be positive and block at most 1024",
            cfg.grid, cfg.block
        )));
    }
    if cfg.shared_bytes > MAX_SHARED_BYTES {
        return Err(EmuError::BadLaunch(format!(
            "{} bytes of shared memory exceed the {} a block can have",
            cfg.shared_bytes, MAX_SHARED_BYTES
        )));
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(cfg.grid as usize);
    let next = AtomicU32::new(0);
    let first_error: Mutex<Option<EmuError>> = Mutex::new(None);
    let kernel = &kernel;
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut stacks: Vec<DefaultStack> = Vec::new();
                loop {
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= cfg.grid {
                        return;
                    }
                    // SAFETY: forwarded from this function's contract.
                    if let Err(e) = unsafe { run_block(cfg, b, kernel, &mut stacks) } {
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

type Co = Coroutine<(), Event, (), DefaultStack>;

/// Runs one block to completion on this OS thread.
unsafe fn run_block<F: Fn() + Sync>(
    cfg: LaunchConfig,
    block_idx: u32,
    kernel: &F,
    stacks: &mut Vec<DefaultStack>,
) -> Result<(), EmuError> {
    let n = cfg.block as usize;
    // 16-byte aligned shared memory.
    let mut shared = vec![0u128; cfg.shared_bytes.div_ceil(16)];
    let shared_ptr = shared.as_mut_ptr() as *mut u8;
    let ctxs: Vec<ThreadCtx> = (0..cfg.block)
        .map(|t| ThreadCtx {
            thread_idx: t,
            block_idx,
            block_dim: cfg.block,
            grid_dim: cfg.grid,
            shared: shared_ptr,
            yielder: Cell::new(std::ptr::null()),
            shfl_in: Cell::new((0, 0)),
            shfl_out: Cell::new(0),
        })
        .collect();

    let mut cos: Vec<Co> = Vec::with_capacity(n);
    for ctx in &ctxs {
        let stack = match stacks.pop() {
            Some(s) => s,
            None => DefaultStack::new(STACK_BYTES).map_err(|e| EmuError::Stack(e.to_string()))?,
        };
        let ctx_ptr = ctx as *const ThreadCtx;
        let kernel_ptr = kernel as *const F;
        // SAFETY: the closure borrows `ctxs` and `kernel` through raw pointers; both outlive
        // every coroutine, which are all completed or dropped (unwound) before this function
        // returns.
        let co = unsafe {
            Co::with_stack_unchecked(stack, move |y: &Yielder<(), Event>, ()| {
                (*ctx_ptr).yielder.set(y as *const _);
                (*kernel_ptr)();
            })
        };
        cos.push(co);
    }

    let mut state = vec![State::Runnable; n];
    let result = catch_unwind(AssertUnwindSafe(|| {
        schedule(&mut cos, &mut state, &ctxs, block_idx)
    }));
    CURRENT.with(|c| c.set(std::ptr::null()));
    let outcome = match result {
        Ok(r) => r,
        Err(payload) => Err(EmuError::KernelPanic {
            block: block_idx,
            message: panic_message(&payload),
        }),
    };
    // Unfinished coroutines (after an error) are unwound here; finished ones give their stacks back.
    for co in cos {
        if co.done() {
            stacks.push(co.into_stack());
        }
    }
    drop(shared);
    outcome
}

fn schedule(
    cos: &mut [Co],
    state: &mut [State],
    ctxs: &[ThreadCtx],
    block_idx: u32,
) -> Result<(), EmuError> {
    let n = cos.len();
    let warps = n.div_ceil(32);
    loop {
        let mut ran = false;
        for i in 0..n {
            if state[i] != State::Runnable {
                continue;
            }
            ran = true;
            CURRENT.with(|c| c.set(&ctxs[i] as *const ThreadCtx));
            state[i] = match cos[i].resume(()) {
                CoroutineResult::Yield(Event::Barrier) => State::AtBarrier,
                CoroutineResult::Yield(Event::Shuffle) => State::AtShuffle,
                CoroutineResult::Return(()) => State::Done,
            };
        }
        if state.iter().all(|s| *s == State::Done) {
            return Ok(());
        }
        // Release complete warps at shuffles.
        let mut released = false;
        for w in 0..warps {
            let lanes = w * 32..((w + 1) * 32).min(n);
            let live: Vec<usize> = lanes.clone().filter(|&i| state[i] != State::Done).collect();
            if live.is_empty() || !live.iter().all(|&i| state[i] == State::AtShuffle) {
                continue;
            }
            for &i in &live {
                let (_, src) = ctxs[i].shfl_in.get();
                let src_idx = w * 32 + src as usize;
                if src_idx >= n || state[src_idx] != State::AtShuffle {
                    return Err(EmuError::KernelPanic {
                        block: block_idx,
                        message: format!(
                            "thread {i} shuffled from lane {src} of warp {w}, which {}",
                            if src_idx >= n {
                                "does not exist"
                            } else {
                                "has exited"
                            }
                        ),
                    });
                }
                ctxs[i].shfl_out.set(ctxs[src_idx].shfl_in.get().0);
            }
            for &i in &live {
                state[i] = State::Runnable;
            }
            released = true;
        }
        // Release the block barrier when every live thread is there.
        let live_count = state.iter().filter(|s| **s != State::Done).count();
        let at_barrier = state.iter().filter(|s| **s == State::AtBarrier).count();
        if live_count > 0 && at_barrier == live_count {
            for s in state.iter_mut() {
                if *s == State::AtBarrier {
                    *s = State::Runnable;
                }
            }
            released = true;
        }
        if !ran && !released {
            let shuffling = state.iter().filter(|s| **s == State::AtShuffle).count();
            return Err(EmuError::Deadlock {
                block: block_idx,
                detail: format!(
                    "{at_barrier} thread(s) at sync_threads, {shuffling} at a warp shuffle whose \
                     warp never converges, {} returned",
                    n - live_count
                ),
            });
        }
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

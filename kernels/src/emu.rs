//! A CPU emulator of the CUDA execution model, with a sanitizer, so the kernels' own source runs
//! in `cargo test` and the bugs GPUs punish are reported instead of passing by luck.
//!
//! Every GPU thread of a block is a stackful coroutine ([`corosensei`]) on one OS thread, scheduled
//! cooperatively:
//! - `sync_threads` suspends a thread until every live (not yet returned) thread of its block has
//!   arrived — `bar.sync` semantics, with exited threads counted as arrived as on sm_70+;
//! - `sync_warp` suspends a lane until every live lane of its warp has arrived;
//! - a warp shuffle deposits the lane's value and the lane it reads from, and suspends until every
//!   live lane of the warp has arrived; the scheduler then exchanges all values at once, so a lane
//!   never sees a value from a different shuffle. Reading a lane that does not exist or has exited,
//!   or a warp that never converges (a lane returns or waits at a barrier while others shuffle),
//!   is reported as an error instead of producing a value.
//!
//! **Schedules.** Each launch has a seed ([`Launch::schedule`]): the order in which blocks are
//! dispatched and, at every scheduling round, the order in which a block's runnable threads are
//! resumed are seeded permutations. A correct kernel gives bit-identical results under every seed;
//! [`launch_schedules`] runs a launch under several and the host's emulated backend compares them.
//!
//! **The sanitizer** (always on; see [`crate::gpu`] for the accessors it watches):
//! - *shared memory*: poisoned (0xff bytes) at launch; reading a byte no thread wrote is
//!   [`Violation::UninitShared`]; two threads touching the same byte between the same pair of block
//!   barriers — within a warp, between the same pair of `sync_warp`s — with at least one writing is
//!   [`Violation::SharedRace`] (compute-sanitizer's racecheck hazard: RAW, WAR or WAW), naming the
//!   kernel, the offset and both threads; an access past the launch's shared bytes is
//!   [`Violation::SharedOutOfBounds`]. Shuffles do not order memory (they are not fences in the
//!   CUDA memory model), so they do not separate accesses;
//! - *global memory*: a launch registers its buffers ([`Buffer`]) with their lengths and whether
//!   the kernel may write them; every access must fall inside one of them
//!   ([`Violation::UnknownPointer`], [`Violation::OutOfBounds`] naming the buffer and the element
//!   index), be aligned to its width ([`Violation::Misaligned`]), and not write an input or read
//!   through the read-only path a buffer the launch writes ([`Violation::WriteToInput`],
//!   [`Violation::NonCoherentWrite`]); two blocks, or two threads of a block between the same pair
//!   of barriers, storing to the same byte is [`Violation::GlobalRace`] (atomics excepted);
//! - *math*: [`Math::GpuApprox`] makes `ex2`, `lg2` and `rcp` behave like PTX's `.approx.ftz`
//!   forms — a deterministic error within each instruction's documented bound, subnormal inputs and
//!   outputs flushed to zero — so threshold decisions are also tested at GPU precision.
//!
//! What it cannot see: races through global memory between reads and writes of different threads
//! (only write/write is tracked), the memory-model subtleties of fences between blocks (blocks run
//! to completion one after another on each worker, a valid but forgiving schedule), timing,
//! occupancy and register pressure (see `scripts/ptx-check`), and bugs that need the exact PTX
//! instruction semantics of what rustc emits (the emulator runs the Rust source, not the PTX).
//!
//! Blocks are independent (no grid-wide synchronisation), so they are spread over the machine's
//! cores. A deadlock (threads waiting at different barriers), a sanitizer report or a panic inside
//! the kernel ends the launch with an [`EmuError`] instead of hanging.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// One emulated launch's shape (the sanitizer-free part of a [`Launch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: usize,
}

/// How `ex2` / `lg2` / `rcp` are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Math {
    /// Correctly rounded (libm); the default.
    #[default]
    Exact,
    /// Like PTX `ex2.approx.ftz.f32` (relative error ≤ 2^-22), `lg2.approx.ftz.f32` (absolute
    /// error ≤ 2^-22) and `rcp.approx.ftz.f32` (≤ 1 ulp): the exact value perturbed by a
    /// deterministic function of the input and the seed within that bound, subnormals flushed.
    GpuApprox { seed: u64 },
}

/// A global buffer a launch may touch.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub name: &'static str,
    pub addr: usize,
    pub bytes: usize,
    pub writable: bool,
}

impl Buffer {
    /// A buffer the kernel only reads.
    pub fn input<T>(name: &'static str, s: &[T]) -> Buffer {
        Buffer {
            name,
            addr: s.as_ptr() as usize,
            bytes: std::mem::size_of_val(s),
            writable: false,
        }
    }
    /// A buffer the kernel writes (and may read).
    pub fn output<T>(name: &'static str, s: &mut [T]) -> Buffer {
        Buffer {
            name,
            addr: s.as_mut_ptr() as usize,
            bytes: std::mem::size_of_val(s),
            writable: true,
        }
    }
    /// A raw region (for parameter blocks passed by pointer, such as a weight struct).
    pub fn raw(name: &'static str, addr: usize, bytes: usize, writable: bool) -> Buffer {
        Buffer {
            name,
            addr,
            bytes,
            writable,
        }
    }
}

/// Everything about one emulated launch.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The kernel's name, for reports.
    pub name: String,
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: usize,
    pub buffers: Vec<Buffer>,
    /// Seed of the block and thread orders.
    pub schedule: u64,
    pub math: Math,
}

impl Launch {
    pub fn new(name: impl Into<String>, grid: u32, block: u32, shared_bytes: usize) -> Launch {
        Launch {
            name: name.into(),
            grid,
            block,
            shared_bytes,
            buffers: Vec::new(),
            schedule: 0,
            math: Math::Exact,
        }
    }
    pub fn buffer(mut self, b: Buffer) -> Launch {
        self.buffers.push(b);
        self
    }
    pub fn input<T>(self, name: &'static str, s: &[T]) -> Launch {
        self.buffer(Buffer::input(name, s))
    }
    pub fn output<T>(self, name: &'static str, s: &mut [T]) -> Launch {
        self.buffer(Buffer::output(name, s))
    }
    pub fn schedule(mut self, seed: u64) -> Launch {
        self.schedule = seed;
        self
    }
    pub fn math(mut self, math: Math) -> Launch {
        self.math = math;
        self
    }
    pub fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid: self.grid,
            block: self.block,
            shared_bytes: self.shared_bytes,
        }
    }
}

/// A sanitizer finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two threads touched shared byte `offset` between the same synchronisation points, at least
    /// one writing. `first` happened before `second` in this schedule.
    SharedRace {
        offset: usize,
        hazard: &'static str,
        first: u32,
        second: u32,
    },
    /// A shared byte read before any thread wrote it.
    UninitShared { offset: usize, thread: u32 },
    /// A shared access past the launch's dynamic shared memory.
    SharedOutOfBounds {
        offset: isize,
        size: usize,
        shared_bytes: usize,
        thread: u32,
    },
    /// A global pointer inside no registered buffer.
    UnknownPointer { addr: usize, thread: u32 },
    /// A global access past the end of (or before) its buffer; `index` in elements of the access.
    OutOfBounds {
        buffer: &'static str,
        index: isize,
        len: usize,
        thread: u32,
    },
    /// A global access not aligned to its width.
    Misaligned {
        buffer: &'static str,
        offset: usize,
        align: usize,
        thread: u32,
    },
    /// A store to a buffer registered as an input.
    WriteToInput { buffer: &'static str, thread: u32 },
    /// A read-only-path load (`ld.global.nc`) of a buffer the launch may write.
    NonCoherentWrite { buffer: &'static str, thread: u32 },
    /// Two blocks, or two threads between the same barriers, stored to the same global byte.
    GlobalRace {
        buffer: &'static str,
        offset: usize,
        first: (u32, u32),
        second: (u32, u32),
    },
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
    /// The sanitizer reported `violation` in block `block` of kernel `kernel`.
    Sanitizer {
        kernel: String,
        block: u32,
        violation: Violation,
    },
    /// Two schedules of the same launch gave different results (a race the sanitizer cannot see,
    /// or order-dependent arithmetic).
    ScheduleDependent { kernel: String, detail: String },
    /// The OS refused a coroutine stack.
    Stack(String),
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::SharedRace {
                offset,
                hazard,
                first,
                second,
            } => write!(
                f,
                "{hazard} race on shared memory at byte {offset}: thread {first} then thread {second}, with no barrier between"
            ),
            Violation::UninitShared { offset, thread } => write!(
                f,
                "thread {thread} read shared byte {offset} before any thread wrote it"
            ),
            Violation::SharedOutOfBounds {
                offset,
                size,
                shared_bytes,
                thread,
            } => write!(
                f,
                "thread {thread} accessed {size} shared bytes at offset {offset}, past the launch's {shared_bytes}"
            ),
            Violation::UnknownPointer { addr, thread } => write!(
                f,
                "thread {thread} accessed global address {addr:#x}, inside no buffer registered for the launch"
            ),
            Violation::OutOfBounds {
                buffer,
                index,
                len,
                thread,
            } => write!(
                f,
                "thread {thread} accessed `{buffer}` at index {index}, out of bounds (length {len})"
            ),
            Violation::Misaligned {
                buffer,
                offset,
                align,
                thread,
            } => write!(
                f,
                "thread {thread} accessed `{buffer}` at byte {offset}, not {align}-byte aligned"
            ),
            Violation::WriteToInput { buffer, thread } => {
                write!(f, "thread {thread} wrote `{buffer}`, an input of the launch")
            }
            Violation::NonCoherentWrite { buffer, thread } => write!(
                f,
                "thread {thread} read `{buffer}` through the read-only path, but the launch may write it"
            ),
            Violation::GlobalRace {
                buffer,
                offset,
                first,
                second,
            } => write!(
                f,
                "global write race on `{buffer}` byte {offset}: block {} thread {} then block {} thread {}",
                first.0, first.1, second.0, second.1
            ),
        }
    }
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
            EmuError::Sanitizer {
                kernel,
                block,
                violation,
            } => write!(f, "sanitizer: kernel {kernel}, block {block}: {violation}"),
            EmuError::ScheduleDependent { kernel, detail } => write!(
                f,
                "kernel {kernel} gave different results under different schedules: {detail}"
            ),
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
    block: *const BlockState,
    launch: *const LaunchState,
    yielder: Cell<*const Yielder<(), Event>>,
    /// Shuffle mailbox of this lane: (value, source lane) in, exchanged value out.
    shfl_in: Cell<(u32, u32)>,
    shfl_out: Cell<u32>,
    /// `mma` mailbox of this lane: its A, B and C fragments in, D out.
    mma_in: Cell<([u32; 4], [u32; 2], [f32; 4])>,
    mma_out: Cell<[f32; 4]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Barrier,
    Shuffle,
    WarpSync,
    Mma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    AtBarrier,
    AtShuffle,
    AtWarpSync,
    AtMma,
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

pub fn sync_warp() {
    suspend(Event::WarpSync);
}

/// `mma.sync.m16n8k16` (f16 × f16 + f32): a warp-collective operation. Each lane deposits its
/// fragments (layout in `gpu::mma_layout`); when all 32 lanes have, the scheduler assembles A, B
/// and C, computes every D element as the exactly rounded f32 of C plus Σ A·B (products of f16
/// are exact), and hands each lane its D fragment. Fewer than 32 live lanes is an error (the
/// instruction needs the whole warp).
pub fn mma_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    with_thread(|t| t.mma_in.set((a, b, c)));
    suspend(Event::Mma);
    with_thread(|t| t.mma_out.get())
}

/// D = A·B + C for one warp's fragments (`ins[lane]`).
fn mma_compute(ins: &[([u32; 4], [u32; 2], [f32; 4]); 32]) -> [[f32; 4]; 32] {
    use crate::gpu::{f16_bits_to_f32, mma_layout};
    let mut am = [[0f64; 16]; 16];
    let mut bm = [[0f64; 8]; 16];
    let mut cm = [[0f64; 8]; 16];
    for (lane, (a, b, c)) in ins.iter().enumerate() {
        let lane = lane as u32;
        for h in 0..8u32 {
            let bits = (a[(h / 2) as usize] >> (16 * (h % 2))) as u16;
            let (r, col) = mma_layout::a(lane, h);
            am[r as usize][col as usize] = f16_bits_to_f32(bits) as f64;
        }
        for h in 0..4u32 {
            let bits = (b[(h / 2) as usize] >> (16 * (h % 2))) as u16;
            let (k, n) = mma_layout::b(lane, h);
            bm[k as usize][n as usize] = f16_bits_to_f32(bits) as f64;
        }
        for e in 0..4u32 {
            let (r, n) = mma_layout::c(lane, e);
            cm[r as usize][n as usize] = c[e as usize] as f64;
        }
    }
    let mut out = [[0f32; 4]; 32];
    for (lane, o) in out.iter_mut().enumerate() {
        for e in 0..4u32 {
            let (r, n) = mma_layout::c(lane as u32, e);
            let mut s = cm[r as usize][n as usize];
            for k in 0..16 {
                s += am[r as usize][k] * bm[k][n as usize];
            }
            o[e as usize] = s as f32;
        }
    }
    out
}

/// A 32-bit warp shuffle: lane `l` receives the value of lane `src(l)`.
pub fn shuffle(v: u32, src: impl FnOnce(u32) -> u32) -> u32 {
    let lane = with_thread(|t| t.thread_idx % 32);
    let s = src(lane);
    with_thread(|t| t.shfl_in.set((v, s)));
    suspend(Event::Shuffle);
    with_thread(|t| t.shfl_out.get())
}

// ---------------------------------------------------------------------------------------------
// sanitizer state

/// A sanitizer report travels as a panic payload from the access to the block's scheduler.
struct Report(Violation);

/// One access's place in the block's synchronisation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    thread: u32,
    /// Block barriers released before the access.
    bar: u32,
    /// `sync_warp`s of the thread's warp released before the access.
    warp: u32,
}

const NOBODY: u32 = u32::MAX;

impl Stamp {
    const NONE: Stamp = Stamp {
        thread: NOBODY,
        bar: 0,
        warp: 0,
    };
    /// Whether this earlier access and an access `now` by another thread are unordered.
    fn concurrent_with(&self, now: &Stamp) -> bool {
        self.thread != NOBODY
            && self.thread != now.thread
            && self.bar == now.bar
            && (self.thread / 32 != now.thread / 32 || self.warp == now.warp)
    }
}

/// What the sanitizer knows about one shared byte.
#[derive(Clone, Copy)]
struct ByteShadow {
    written: bool,
    write: Stamp,
    /// The distinct readers since the last write (up to three), and whether there were more.
    readers: [Stamp; 3],
    more_readers: bool,
}

impl ByteShadow {
    const FRESH: ByteShadow = ByteShadow {
        written: false,
        write: Stamp::NONE,
        readers: [Stamp::NONE; 3],
        more_readers: false,
    };
}

struct BlockState {
    shared_bytes: usize,
    shadow: RefCell<Vec<ByteShadow>>,
    bar: Cell<u32>,
    warp_epochs: Vec<Cell<u32>>,
}

struct BufferState {
    buf: Buffer,
    /// Per byte of a writable buffer: the last plain store's (block + 1, barrier epoch, thread).
    writers: Vec<AtomicU64>,
}

struct LaunchState {
    name: String,
    buffers: Vec<BufferState>,
    math: Math,
}

fn report(v: Violation) -> ! {
    std::panic::panic_any(Report(v))
}

fn now(t: &ThreadCtx) -> Stamp {
    // SAFETY: `block` points at the running block's state, alive for the whole block.
    let b = unsafe { &*t.block };
    Stamp {
        thread: t.thread_idx,
        bar: b.bar.get(),
        warp: b.warp_epochs[(t.thread_idx / 32) as usize].get(),
    }
}

/// Checks a shared access of `size` bytes at `addr` and updates the shadow.
fn shared_access(addr: usize, size: usize, write: bool) {
    with_thread(|t| {
        // SAFETY: as in `now`.
        let b = unsafe { &*t.block };
        let offset = addr as isize - t.shared as isize;
        if offset < 0 || offset as usize + size > b.shared_bytes {
            report(Violation::SharedOutOfBounds {
                offset,
                size,
                shared_bytes: b.shared_bytes,
                thread: t.thread_idx,
            });
        }
        let offset = offset as usize;
        if !addr.is_multiple_of(size.min(16)) {
            report(Violation::Misaligned {
                buffer: "shared memory",
                offset,
                align: size.min(16),
                thread: t.thread_idx,
            });
        }
        let st = now(t);
        let mut shadow = b.shadow.borrow_mut();
        for (k, s) in shadow[offset..offset + size].iter_mut().enumerate() {
            let at = offset + k;
            if s.write.concurrent_with(&st) {
                report(Violation::SharedRace {
                    offset: at,
                    hazard: if write {
                        "write-after-write"
                    } else {
                        "read-after-write"
                    },
                    first: s.write.thread,
                    second: st.thread,
                });
            }
            if write {
                let earlier = s
                    .readers
                    .iter()
                    .find(|r| r.concurrent_with(&st))
                    .map(|r| r.thread)
                    .or_else(|| {
                        // Readers beyond the three tracked: conservatively, any of them in this
                        // barrier interval may be another thread.
                        (s.more_readers && s.readers[0].bar == st.bar).then_some(NOBODY)
                    });
                if let Some(r) = earlier {
                    report(Violation::SharedRace {
                        offset: at,
                        hazard: "write-after-read",
                        first: r,
                        second: st.thread,
                    });
                }
                s.written = true;
                s.write = st;
                s.readers = [Stamp::NONE; 3];
                s.more_readers = false;
            } else {
                if !s.written {
                    report(Violation::UninitShared {
                        offset: at,
                        thread: st.thread,
                    });
                }
                if s.readers[0].thread != NOBODY && s.readers[0].bar != st.bar {
                    s.readers = [Stamp::NONE; 3];
                    s.more_readers = false;
                }
                match s
                    .readers
                    .iter_mut()
                    .find(|r| r.thread == st.thread || r.thread == NOBODY)
                {
                    Some(r) => *r = st,
                    None => s.more_readers = true,
                }
            }
        }
    })
}

/// A checked shared-memory load (see [`crate::gpu::sh_ld`]).
///
/// # Safety
/// Called by kernels running on the emulator; the check reports any access outside the block's
/// shared memory before it happens.
pub unsafe fn shared_load<T: Copy>(base: *const T, i: usize) -> T {
    let p = base.wrapping_add(i);
    shared_access(p as usize, std::mem::size_of::<T>(), false);
    // SAFETY: `shared_access` checked that the bytes are inside the block's shared memory,
    // aligned, and written.
    unsafe { std::ptr::read(p) }
}

/// A checked shared-memory store (see [`crate::gpu::sh_st`]).
///
/// # Safety
/// As [`shared_load`].
pub unsafe fn shared_store<T: Copy>(base: *mut T, i: usize, v: T) {
    let p = base.wrapping_add(i);
    shared_access(p as usize, std::mem::size_of::<T>(), true);
    // SAFETY: `shared_access` checked that the bytes are inside the block's shared memory and
    // aligned.
    unsafe { std::ptr::write(p, v) }
}

/// The registered buffer a global access at `addr` of `size` bytes falls in (by its first byte;
/// the whole access must fit).
fn global_buffer(t: &ThreadCtx, addr: usize, size: usize) -> &BufferState {
    // SAFETY: `launch` points at the launch's state, alive until every block has finished.
    let l = unsafe { &*t.launch };
    let hit = l
        .buffers
        .iter()
        .find(|b| addr >= b.buf.addr && addr < b.buf.addr + b.buf.bytes.max(1));
    let b = match hit {
        Some(b) => b,
        None => {
            // Name the nearest buffer when the access is just past one (a read past the end).
            let near = l
                .buffers
                .iter()
                .filter(|b| addr >= b.buf.addr && addr < b.buf.addr + b.buf.bytes + 4096)
                .min_by_key(|b| addr - b.buf.addr);
            match near {
                Some(b) => report(Violation::OutOfBounds {
                    buffer: b.buf.name,
                    index: ((addr - b.buf.addr) / size.max(1)) as isize,
                    len: b.buf.bytes / size.max(1),
                    thread: t.thread_idx,
                }),
                None => report(Violation::UnknownPointer {
                    addr,
                    thread: t.thread_idx,
                }),
            }
        }
    };
    let offset = addr - b.buf.addr;
    if offset + size > b.buf.bytes {
        report(Violation::OutOfBounds {
            buffer: b.buf.name,
            index: (offset / size.max(1)) as isize,
            len: b.buf.bytes / size.max(1),
            thread: t.thread_idx,
        });
    }
    if !addr.is_multiple_of(size.min(16)) {
        report(Violation::Misaligned {
            buffer: b.buf.name,
            offset,
            align: size.min(16),
            thread: t.thread_idx,
        });
    }
    b
}

/// A checked global load of one `T` (1, 2, 4, 8 or 16 bytes) at `p`.
///
/// # Safety
/// Called by kernels running on the emulator; the check reports any access outside the launch's
/// registered buffers before it happens.
pub unsafe fn global_load<T: Copy>(p: *const u8, nc: bool) -> T {
    with_thread(|t| {
        let b = global_buffer(t, p as usize, std::mem::size_of::<T>());
        if nc && b.buf.writable {
            report(Violation::NonCoherentWrite {
                buffer: b.buf.name,
                thread: t.thread_idx,
            });
        }
    });
    // SAFETY: the access lies inside a registered buffer and is aligned.
    unsafe { std::ptr::read(p as *const T) }
}

/// A checked global store of one `T` at `p`, recorded for the write-race check.
///
/// # Safety
/// As [`global_load`].
pub unsafe fn global_store<T: Copy>(p: *mut u8, v: T) {
    with_thread(|t| {
        let size = std::mem::size_of::<T>();
        let b = global_buffer(t, p as usize, size);
        if !b.buf.writable {
            report(Violation::WriteToInput {
                buffer: b.buf.name,
                thread: t.thread_idx,
            });
        }
        let st = now(t);
        let me = ((t.block_idx as u64 + 1) << 32)
            | ((st.bar as u64 & 0x3f_ffff) << 10)
            | st.thread as u64;
        let offset = p as usize - b.buf.addr;
        for k in 0..size {
            let prev = b.writers[offset + k].swap(me, Ordering::Relaxed);
            if prev == 0 || prev == me {
                continue;
            }
            let (pb, pbar, pt) = (
                (prev >> 32) as u32 - 1,
                ((prev >> 10) & 0x3f_ffff) as u32,
                (prev & 0x3ff) as u32,
            );
            if pb != t.block_idx || (pt != st.thread && pbar == st.bar & 0x3f_ffff) {
                report(Violation::GlobalRace {
                    buffer: b.buf.name,
                    offset: offset + k,
                    first: (pb, pt),
                    second: (t.block_idx, st.thread),
                });
            }
        }
    });
    // SAFETY: the access lies inside a registered, writable buffer and is aligned.
    unsafe { std::ptr::write(p as *mut T, v) }
}

/// A checked `atom.global.add.u32` (not recorded by the write-race check: atomics may collide).
///
/// # Safety
/// As [`global_load`].
pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
    with_thread(|t| {
        let b = global_buffer(t, p as usize, 4);
        if !b.buf.writable {
            report(Violation::WriteToInput {
                buffer: b.buf.name,
                thread: t.thread_idx,
            });
        }
    });
    // SAFETY: the word lies inside a registered, writable buffer and is 4-byte aligned; every
    // concurrent access to it goes through atomics.
    unsafe { AtomicU32::from_ptr(p).fetch_add(v, Ordering::SeqCst) }
}

/// The `.approx.ftz` math of the GPU, or exact math, as the launch asked.
pub mod math {
    use super::{with_thread, Math};

    fn mode() -> Math {
        // SAFETY: as in `global_buffer`.
        with_thread(|t| unsafe { (*t.launch).math })
    }

    /// A deterministic value in [−1, 1] from an input's bits and the seed (SplitMix64 finaliser).
    fn jitter(bits: u32, seed: u64, salt: u64) -> f64 {
        let mut z = (bits as u64) ^ seed.rotate_left(17) ^ salt;
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Flush-to-zero of a subnormal, keeping the sign.
    pub fn ftz(x: f32) -> f32 {
        if x.is_subnormal() {
            0.0f32.copysign(x)
        } else {
            x
        }
    }

    pub fn exp2(x: f32) -> f32 {
        match mode() {
            Math::Exact => x.exp2(),
            Math::GpuApprox { seed } => {
                let x = ftz(x);
                if !x.is_finite() {
                    return x.exp2();
                }
                let r = (x as f64).exp2() * (1.0 + jitter(x.to_bits(), seed, 1) * 2f64.powi(-22));
                ftz(r as f32)
            }
        }
    }

    pub fn log2(x: f32) -> f32 {
        match mode() {
            Math::Exact => x.log2(),
            Math::GpuApprox { seed } => {
                let x = ftz(x);
                if x <= 0.0 || !x.is_finite() {
                    return x.log2();
                }
                ((x as f64).log2() + jitter(x.to_bits(), seed, 2) * 2f64.powi(-22)) as f32
            }
        }
    }

    pub fn rcp(x: f32) -> f32 {
        match mode() {
            Math::Exact => 1.0 / x,
            Math::GpuApprox { seed } => {
                let x = ftz(x);
                let r = 1.0 / x;
                if !r.is_finite() || r == 0.0 {
                    return r;
                }
                let j = jitter(x.to_bits(), seed, 3);
                let r = if j > 0.5 {
                    f32::from_bits(r.to_bits() + 1)
                } else if j < -0.5 {
                    f32::from_bits(r.to_bits() - 1)
                } else {
                    r
                };
                ftz(r)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// launching

/// Coroutine stack size: generous, since host builds of kernel code may be unoptimised.
const STACK_BYTES: usize = 256 * 1024;

/// Most dynamic shared memory a block may have on sm_90 (227 KiB).
pub const MAX_SHARED_BYTES: usize = 227 * 1024;

/// A small seeded generator for the schedules (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Keeps sanitizer reports (which travel as panics) off standard error; other panics are printed
/// as usual.
fn quiet_reports() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Report>().is_none() {
                prev(info)
            }
        }));
    });
}

/// Runs `kernel` for every thread of a `cfg.grid` × `cfg.block` launch with no buffers registered:
/// for test kernels that touch only their own host memory. Kernels that use the global accessors
/// need [`launch_checked`].
///
/// # Safety
/// As [`launch_checked`].
pub unsafe fn launch<F>(cfg: LaunchConfig, kernel: F) -> Result<(), EmuError>
where
    F: Fn() + Sync,
{
    let l = Launch::new("kernel", cfg.grid, cfg.block, cfg.shared_bytes);
    // SAFETY: forwarded.
    unsafe { launch_checked(&l, kernel) }
}

/// Runs `kernel` for every thread of the launch, with the sanitizer watching every access through
/// the accessors of [`crate::gpu`].
///
/// # Safety
/// `kernel` runs with the GPU's memory model, not Rust's: the registered buffers must be valid for
/// the whole launch, their addresses and lengths true, and memory the kernel reaches without the
/// accessors (a raw dereference) is not checked.
pub unsafe fn launch_checked<F>(l: &Launch, kernel: F) -> Result<(), EmuError>
where
    F: Fn() + Sync,
{
    if l.grid == 0 || l.block == 0 || l.block > 1024 {
        return Err(EmuError::BadLaunch(format!(
            "grid {} × block {}: both must be positive and block at most 1024",
            l.grid, l.block
        )));
    }
    if l.shared_bytes > MAX_SHARED_BYTES {
        return Err(EmuError::BadLaunch(format!(
            "{} bytes of shared memory exceed the {} a block can have",
            l.shared_bytes, MAX_SHARED_BYTES
        )));
    }
    quiet_reports();
    LAUNCH_LOG.with(|log| {
        if let Some(v) = log.borrow_mut().as_mut() {
            v.push(RecordedLaunch {
                name: l.name.clone(),
                config: l.config(),
            });
        }
    });
    let state = LaunchState {
        name: l.name.clone(),
        buffers: l
            .buffers
            .iter()
            .map(|b| BufferState {
                buf: *b,
                writers: if b.writable {
                    (0..b.bytes).map(|_| AtomicU64::new(0)).collect()
                } else {
                    Vec::new()
                },
            })
            .collect(),
        math: l.math,
    };
    let mut order: Vec<u32> = (0..l.grid).collect();
    Rng(l.schedule ^ 0x5c4e_d01e).shuffle(&mut order);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(l.grid as usize);
    let next = AtomicU32::new(0);
    let first_error: Mutex<Option<EmuError>> = Mutex::new(None);
    let kernel = &kernel;
    let (state, order) = (&state, &order);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut stacks: Vec<DefaultStack> = Vec::new();
                loop {
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= l.grid {
                        return;
                    }
                    let b = order[k as usize];
                    // SAFETY: forwarded from this function's contract.
                    if let Err(e) = unsafe { run_block(l, state, b, kernel, &mut stacks) } {
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

/// One launch seen by [`record_launches`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedLaunch {
    pub name: String,
    pub config: LaunchConfig,
}

thread_local! {
    static LAUNCH_LOG: std::cell::RefCell<Option<Vec<RecordedLaunch>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, beside its result, every launch it made on this thread (name, grid,
/// block, shared bytes; repeated once per schedule): how a test proves the host launches exactly
/// the plan `speckv plan` prints.
pub fn record_launches<R>(f: impl FnOnce() -> R) -> (R, Vec<RecordedLaunch>) {
    let outer = LAUNCH_LOG.with(|log| log.borrow_mut().replace(Vec::new()));
    let r = f();
    let seen = LAUNCH_LOG.with(|log| std::mem::replace(&mut *log.borrow_mut(), outer));
    (r, seen.unwrap_or_default())
}

/// The schedule seeds [`launch_schedules`] uses: `SPECKV_EMU_SCHEDULES` of them (default 3).
pub fn schedule_seeds() -> Vec<u64> {
    let n = std::env::var("SPECKV_EMU_SCHEDULES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    (0..n).map(|k| 0x9e37_79b9u64.wrapping_mul(k + 1)).collect()
}

/// Runs a launch once per seed of [`schedule_seeds`]: `run(seed)` performs one launch into fresh
/// outputs and returns them; every schedule's outputs must have the same `fingerprint` (their
/// bytes: bit for bit, NaN payloads included), and the first schedule's are returned.
pub fn launch_schedules<O>(
    name: &str,
    mut run: impl FnMut(u64) -> Result<O, EmuError>,
    fingerprint: impl Fn(&O) -> Vec<u8>,
) -> Result<O, EmuError> {
    let seeds = schedule_seeds();
    let first = run(seeds[0])?;
    let want = fingerprint(&first);
    for &s in &seeds[1..] {
        let other = fingerprint(&run(s)?);
        if other != want {
            let at = other.iter().zip(&want).position(|(a, b)| a != b);
            return Err(EmuError::ScheduleDependent {
                kernel: name.to_string(),
                detail: format!(
                    "schedule seed {s:#x} differs from seed {:#x} at output byte {}",
                    seeds[0],
                    at.map(|a| a.to_string())
                        .unwrap_or_else(|| "(length)".to_string())
                ),
            });
        }
    }
    Ok(first)
}

type Co = Coroutine<(), Event, (), DefaultStack>;

/// Runs one block to completion on this OS thread.
unsafe fn run_block<F: Fn() + Sync>(
    l: &Launch,
    launch: &LaunchState,
    block_idx: u32,
    kernel: &F,
    stacks: &mut Vec<DefaultStack>,
) -> Result<(), EmuError> {
    let n = l.block as usize;
    // 16-byte aligned shared memory, poisoned: a read the shadow lets through (it never should)
    // would see 0xff bytes — NaN as f32.
    let mut shared = vec![u128::MAX; l.shared_bytes.div_ceil(16)];
    let shared_ptr = shared.as_mut_ptr() as *mut u8;
    let block = BlockState {
        shared_bytes: l.shared_bytes,
        shadow: RefCell::new(vec![ByteShadow::FRESH; l.shared_bytes]),
        bar: Cell::new(0),
        warp_epochs: (0..n.div_ceil(32)).map(|_| Cell::new(0)).collect(),
    };
    let ctxs: Vec<ThreadCtx> = (0..l.block)
        .map(|t| ThreadCtx {
            thread_idx: t,
            block_idx,
            block_dim: l.block,
            grid_dim: l.grid,
            shared: shared_ptr,
            block: &block,
            launch,
            yielder: Cell::new(std::ptr::null()),
            shfl_in: Cell::new((0, 0)),
            shfl_out: Cell::new(0),
            mma_in: Cell::new(([0; 4], [0; 2], [0.0; 4])),
            mma_out: Cell::new([0.0; 4]),
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
    let mut rng = Rng(l.schedule ^ (block_idx as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
    let result = catch_unwind(AssertUnwindSafe(|| {
        schedule(&mut cos, &mut state, &ctxs, &block, block_idx, &mut rng)
    }));
    CURRENT.with(|c| c.set(std::ptr::null()));
    let outcome = match result {
        Ok(r) => r,
        Err(payload) => Err(match payload.downcast::<Report>() {
            Ok(r) => EmuError::Sanitizer {
                kernel: launch.name.clone(),
                block: block_idx,
                violation: r.0,
            },
            Err(payload) => EmuError::KernelPanic {
                block: block_idx,
                message: panic_message(&payload),
            },
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
    block: &BlockState,
    block_idx: u32,
    rng: &mut Rng,
) -> Result<(), EmuError> {
    let n = cos.len();
    let warps = n.div_ceil(32);
    let mut order: Vec<usize> = (0..n).collect();
    loop {
        let mut ran = false;
        rng.shuffle(&mut order);
        for &i in &order {
            if state[i] != State::Runnable {
                continue;
            }
            ran = true;
            CURRENT.with(|c| c.set(&ctxs[i] as *const ThreadCtx));
            state[i] = match cos[i].resume(()) {
                CoroutineResult::Yield(Event::Barrier) => State::AtBarrier,
                CoroutineResult::Yield(Event::Shuffle) => State::AtShuffle,
                CoroutineResult::Yield(Event::WarpSync) => State::AtWarpSync,
                CoroutineResult::Yield(Event::Mma) => State::AtMma,
                CoroutineResult::Return(()) => State::Done,
            };
        }
        if state.iter().all(|s| *s == State::Done) {
            return Ok(());
        }
        let mut released = false;
        for w in 0..warps {
            let lanes = w * 32..((w + 1) * 32).min(n);
            let live: Vec<usize> = lanes.clone().filter(|&i| state[i] != State::Done).collect();
            if live.is_empty() {
                continue;
            }
            // Release complete warps at shuffles.
            if live.iter().all(|&i| state[i] == State::AtShuffle) {
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
            } else if live.iter().all(|&i| state[i] == State::AtMma) {
                if live.len() != 32 {
                    return Err(EmuError::KernelPanic {
                        block: block_idx,
                        message: format!(
                            "mma.sync in warp {w} with {} live lanes: it needs all 32",
                            live.len()
                        ),
                    });
                }
                let mut ins = [([0u32; 4], [0u32; 2], [0f32; 4]); 32];
                for (k, &i) in live.iter().enumerate() {
                    ins[k] = ctxs[i].mma_in.get();
                }
                let outs = mma_compute(&ins);
                for (k, &i) in live.iter().enumerate() {
                    ctxs[i].mma_out.set(outs[k]);
                    state[i] = State::Runnable;
                }
                released = true;
            } else if live.iter().all(|&i| state[i] == State::AtWarpSync) {
                // A warp barrier: accesses after it are ordered after those before it.
                let e = &block.warp_epochs[w];
                e.set(e.get() + 1);
                for &i in &live {
                    state[i] = State::Runnable;
                }
                released = true;
            }
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
            block.bar.set(block.bar.get() + 1);
            released = true;
        }
        if !ran && !released {
            let shuffling = state.iter().filter(|s| **s == State::AtShuffle).count();
            let warp_sync = state
                .iter()
                .filter(|s| matches!(**s, State::AtWarpSync | State::AtMma))
                .count();
            return Err(EmuError::Deadlock {
                block: block_idx,
                detail: format!(
                    "{at_barrier} thread(s) at sync_threads, {shuffling} at a warp shuffle and \
                     {warp_sync} at sync_warp or mma whose warp never converges, {} returned",
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

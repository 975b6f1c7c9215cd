//! The emulator's sanitizer, proved on deliberately broken kernels: each check must report its bug
//! (naming the kernel, the buffer or address, the index and the threads), and the corrected kernel
//! must pass. The kernels here are written against the same intrinsics as `kernels/`.

use speckv_kernels::emu::{self, EmuError, Launch, Math, Violation};
use speckv_kernels::gpu;
use speckv_kernels::reduce::{block_all_reduce, Reduce};

/// A raw pointer a test kernel may share between its emulated threads.
#[derive(Clone, Copy)]
struct P<T>(*mut T);
// SAFETY: the emulator runs every access through the sanitizer; these tests exist to see it
// report the bad ones.
unsafe impl<T> Send for P<T> {}
unsafe impl<T> Sync for P<T> {}

impl<T> P<T> {
    /// The pointer (a method, so closures capture the whole `P`, not its raw field).
    fn p(&self) -> *mut T {
        self.0
    }
}

fn violation(r: Result<(), EmuError>) -> (String, Violation) {
    match r {
        Err(EmuError::Sanitizer {
            kernel, violation, ..
        }) => (kernel, violation),
        other => panic!("expected a sanitizer report, got {other:?}"),
    }
}

/// A sum over the block through shared memory, with or without its barriers.
#[derive(Clone, Copy)]
struct Sum(u32);
impl Reduce for Sum {
    type Ctx = ();
    const EMPTY: Sum = Sum(0);
    fn merge(&mut self, o: &Self, _: ()) {
        self.0 += o.0;
    }
    fn shfl_xor(&self, mask: u32) -> Self {
        Sum(gpu::shfl_xor_u32(self.0, mask))
    }
}

/// `block_all_reduce` as `kernels/src/reduce.rs` writes it, with either barrier removable.
unsafe fn reduce_with(s: Sum, shared: *mut Sum, first_barrier: bool, second_barrier: bool) -> Sum {
    let s = speckv_kernels::reduce::warp_all_reduce(s, ());
    let warps = gpu::block_dim_x() / 32;
    if gpu::lane_id() == 0 {
        gpu::sh_st(shared, gpu::warp_id() as usize, s);
    }
    if first_barrier {
        gpu::sync_threads();
    }
    let mut r = gpu::sh_ld(shared, 0);
    for w in 1..warps {
        r.merge(&gpu::sh_ld(shared, w as usize), ());
    }
    if second_barrier {
        gpu::sync_threads();
    }
    r
}

fn two_reductions(first: bool, second: bool, seed: u64) -> Result<Vec<u32>, EmuError> {
    two_reductions_init(first, second, seed, false)
}

/// With `init`, shared memory is zeroed (behind a barrier) first, so a missing barrier shows as a
/// race whatever the order.
fn two_reductions_init(
    first: bool,
    second: bool,
    seed: u64,
    init: bool,
) -> Result<Vec<u32>, EmuError> {
    let mut out = vec![0u32; 256];
    let o = P(out.as_mut_ptr());
    let l = Launch::new("two_reductions", 1, 256, 8 * 4)
        .output("out", &mut out)
        .schedule(seed);
    // SAFETY: `out` is registered with its length; shared memory is the launch's.
    unsafe {
        emu::launch_checked(&l, || {
            let t = gpu::thread_idx_x();
            let sh = gpu::dynamic_shared::<Sum>();
            if init {
                if t < 8 {
                    gpu::sh_st(sh, t as usize, Sum(0));
                }
                gpu::sync_threads();
            }
            let a = reduce_with(Sum(t), sh, first, second);
            let b = reduce_with(Sum(1), sh, first, second);
            gpu::st(o.p(), t as usize, a.0 + b.0);
        })
    }?;
    Ok(out)
}

#[test]
fn sanitizer_reports_a_missing_second_barrier() {
    // The second reduction's writes race with the first one's reads.
    let (kernel, v) = violation(two_reductions(true, false, 1).map(|_| ()));
    assert_eq!(kernel, "two_reductions");
    assert!(
        matches!(
            v,
            Violation::SharedRace {
                hazard: "write-after-read",
                ..
            }
        ),
        "{v:?}"
    );
    // Reported the same way whatever the schedule.
    for seed in 2..6 {
        assert!(two_reductions(true, false, seed).is_err());
    }
    // With both barriers: no report, and the right sums under every schedule.
    for seed in 0..4 {
        let out = two_reductions(true, true, seed).unwrap();
        assert!(
            out.iter().all(|&x| x == (0..256).sum::<u32>() + 256),
            "seed {seed}"
        );
    }
}

#[test]
fn sanitizer_reports_a_missing_first_barrier() {
    // A reader runs before the writers: the slot was never written.
    for seed in 0..4 {
        let (_, v) = violation(two_reductions(false, true, seed).map(|_| ()));
        assert!(
            matches!(v, Violation::UninitShared { .. }),
            "seed {seed}: {v:?}"
        );
    }
    // With the slots zeroed first, the same bug is a race in every schedule, in either order.
    for seed in 0..8 {
        let (_, v) = violation(two_reductions_init(false, true, seed, true).map(|_| ()));
        assert!(
            matches!(
                v,
                Violation::SharedRace {
                    hazard: "read-after-write" | "write-after-read",
                    ..
                }
            ),
            "seed {seed}: {v:?}"
        );
    }
    assert!(two_reductions_init(true, true, 0, true).is_ok());
}

#[test]
fn the_real_block_reduction_is_clean() {
    let mut out = vec![0u32; 1024];
    let o = P(out.as_mut_ptr());
    for seed in 0..3 {
        let l = Launch::new("block_all_reduce", 1, 1024, 32 * 4)
            .output("out", &mut out)
            .schedule(seed);
        // SAFETY: as above.
        unsafe {
            emu::launch_checked(&l, || {
                let sh = gpu::dynamic_shared::<Sum>();
                let a = block_all_reduce(Sum(gpu::thread_idx_x()), (), sh);
                let b = block_all_reduce(Sum(a.0 & 7), (), sh);
                gpu::st(o.p(), gpu::thread_idx_x() as usize, b.0);
            })
        }
        .unwrap();
        assert!(out
            .iter()
            .all(|&x| x == ((0..1024u32).sum::<u32>() & 7) * 1024));
    }
}

#[test]
fn sanitizer_reports_a_read_past_the_end() {
    let x = vec![1.0f32; 100];
    let mut y = vec![0.0f32; 100];
    let (xp, yp) = (P(x.as_ptr() as *mut f32), P(y.as_mut_ptr()));
    let l = Launch::new("shift_left", 1, 128, 0)
        .input("x", &x)
        .output("y", &mut y);
    // SAFETY: the accesses are checked; the bad one is reported before it happens.
    let r = unsafe {
        emu::launch_checked(&l, || {
            let i = gpu::thread_idx_x() as usize;
            if i < 100 {
                // Off by one: thread 99 reads x[100].
                gpu::st(yp.p(), i, gpu::ld(xp.p(), i + 1));
            }
        })
    };
    let (kernel, v) = violation(r);
    assert_eq!(kernel, "shift_left");
    assert_eq!(
        v,
        Violation::OutOfBounds {
            buffer: "x",
            index: 100,
            len: 100,
            thread: 99
        }
    );
    assert!(v.to_string().contains("`x` at index 100"), "{v}");
}

#[test]
fn sanitizer_reports_an_uninitialised_shared_read() {
    let l = Launch::new("uninit", 1, 64, 64 * 4);
    // SAFETY: only shared memory is touched.
    let r = unsafe {
        emu::launch_checked(&l, || {
            let sh = gpu::dynamic_shared::<u32>();
            let t = gpu::thread_idx_x() as usize;
            if t < 32 {
                gpu::sh_st(sh, t, 1);
            }
            gpu::sync_threads();
            // Threads 32..64 read slots nobody wrote.
            let _ = gpu::sh_ld(sh, t);
        })
    };
    let (_, v) = violation(r);
    assert!(
        matches!(v, Violation::UninitShared { offset, thread } if offset >= 128 && thread >= 32),
        "{v:?}"
    );
}

fn warp_handoff(sync: bool, seed: u64) -> Result<(), EmuError> {
    let l = Launch::new("warp_handoff", 1, 32, 4).schedule(seed);
    // SAFETY: only shared memory is touched.
    unsafe {
        emu::launch_checked(&l, || {
            let sh = gpu::dynamic_shared::<u32>();
            if gpu::lane_id() == 0 {
                gpu::sh_st(sh, 0, 42);
            }
            if sync {
                gpu::sync_warp();
            }
            // Warp-synchronous code assumed lane 0's store is visible without __syncwarp.
            let _ = gpu::sh_ld(sh, 0);
        })
    }
}

#[test]
fn sanitizer_reports_a_warp_synchronous_assumption() {
    // Lanes of one warp are independent threads (sm_70+): without __syncwarp the read races with
    // lane 0's store, whichever ran first.
    let mut races = 0;
    for seed in 0..8 {
        match violation(warp_handoff(false, seed)).1 {
            Violation::SharedRace {
                offset: 0,
                hazard: "read-after-write",
                first: 0,
                ..
            } => races += 1,
            Violation::UninitShared { offset: 0, .. } => {}
            v => panic!("seed {seed}: {v:?}"),
        }
        warp_handoff(true, seed).expect("__syncwarp orders the lanes");
    }
    assert!(races > 0, "no schedule ran lane 0 first");
}

#[test]
fn sanitizer_reports_misaligned_and_out_of_shared_accesses_and_writes_to_inputs() {
    let bytes = vec![0u8; 64];
    let bp = P(bytes.as_ptr() as *mut u8);
    let l = Launch::new("misaligned", 1, 32, 16).input("bytes", &bytes);
    // SAFETY: checked accesses.
    let r = unsafe {
        emu::launch_checked(&l, || {
            let _: u32 = gpu::ld(bp.p().add(2) as *const u32, 0);
        })
    };
    assert!(matches!(
        violation(r).1,
        Violation::Misaligned {
            buffer: "bytes",
            offset: 2,
            align: 4,
            ..
        }
    ));
    // SAFETY: checked accesses.
    let r = unsafe {
        emu::launch_checked(&l, || {
            gpu::st(bp.p(), 3, 7u8);
        })
    };
    assert!(matches!(
        violation(r).1,
        Violation::WriteToInput {
            buffer: "bytes",
            ..
        }
    ));
    // SAFETY: checked accesses.
    let r = unsafe {
        emu::launch_checked(&l, || {
            gpu::sh_st(gpu::dynamic_shared::<u32>(), 4, 1);
        })
    };
    assert!(matches!(
        violation(r).1,
        Violation::SharedOutOfBounds {
            offset: 16,
            shared_bytes: 16,
            ..
        }
    ));
    // A pointer into no registered buffer (a static, far from the heap buffers).
    static STRAY: [u32; 4] = [0; 4];
    let sp = P(STRAY.as_ptr() as *mut u32);
    // SAFETY: checked accesses.
    let r = unsafe {
        emu::launch_checked(&l, || {
            let _ = gpu::ld(sp.p(), 0);
        })
    };
    assert!(matches!(violation(r).1, Violation::UnknownPointer { .. }));
}

#[test]
fn sanitizer_reports_two_blocks_writing_one_output() {
    let mut y = vec![0u32; 8];
    let yp = P(y.as_mut_ptr());
    let l = Launch::new("overlap", 4, 32, 0).output("y", &mut y);
    // SAFETY: checked accesses.
    let r = unsafe {
        emu::launch_checked(&l, || {
            if gpu::thread_idx_x() == 0 {
                // Block b writes y[2b] and y[2b + 2]: neighbours overlap.
                let b = gpu::block_idx_x() as usize;
                gpu::st(yp.p(), 2 * b, 1);
                gpu::st(yp.p(), (2 * b + 2) % 8, 1);
            }
        })
    };
    let (_, v) = violation(r);
    assert!(
        matches!(v, Violation::GlobalRace { buffer: "y", .. }),
        "{v:?}"
    );
}

#[test]
fn schedules_differ_and_order_dependence_is_caught() {
    // Tickets from an atomic counter depend on the order threads run in: a correct kernel must not
    // do this, and comparing schedules shows it.
    let r = emu::launch_schedules(
        "tickets",
        |seed| {
            let mut counter = vec![0u32; 1];
            let mut out = vec![0u32; 64];
            let (cp, op) = (P(counter.as_mut_ptr()), P(out.as_mut_ptr()));
            let l = Launch::new("tickets", 2, 32, 0)
                .output("counter", &mut counter)
                .output("out", &mut out)
                .schedule(seed);
            // SAFETY: checked accesses.
            unsafe {
                emu::launch_checked(&l, || {
                    let i = (gpu::block_idx_x() * 32 + gpu::thread_idx_x()) as usize;
                    gpu::st(op.p(), i, gpu::atomic_add_u32(cp.p(), 1));
                })
            }?;
            Ok(out)
        },
        |o| o.iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    assert!(
        matches!(r, Err(EmuError::ScheduleDependent { ref kernel, .. }) if kernel == "tickets"),
        "{r:?}"
    );
}

#[test]
fn gpu_math_stays_within_the_ptx_bounds_and_flushes_subnormals() {
    let xs: Vec<f32> = (0..2000).map(|i| -60.0 + i as f32 * 0.0613).collect();
    let mut out = vec![0f32; xs.len() * 3];
    let (xp, op) = (P(xs.as_ptr() as *mut f32), P(out.as_mut_ptr()));
    let n = xs.len();
    let l = Launch::new("math", (n as u32).div_ceil(128), 128, 0)
        .input("x", &xs)
        .output("out", &mut out)
        .math(Math::GpuApprox { seed: 3 });
    // SAFETY: checked accesses.
    unsafe {
        emu::launch_checked(&l, || {
            let i = (gpu::block_idx_x() * 128 + gpu::thread_idx_x()) as usize;
            if i < n {
                let x = gpu::ld(xp.p(), i);
                gpu::st(op.p(), 3 * i, gpu::exp2_approx(x));
                gpu::st(op.p(), 3 * i + 1, gpu::log2_approx(x.abs() + 1e-3));
                gpu::st(op.p(), 3 * i + 2, gpu::rcp_approx(x + 0.5));
            }
        })
    }
    .unwrap();
    let (mut differs, mut max_rel, mut max_abs) = (0, 0f64, 0f64);
    for (i, &x) in xs.iter().enumerate() {
        let e = (x as f64).exp2();
        let rel = (out[3 * i] as f64 - e).abs() / e;
        max_rel = max_rel.max(rel);
        differs += (out[3 * i] != x.exp2()) as usize;
        let l = ((x.abs() + 1e-3) as f64).log2();
        max_abs = max_abs.max((out[3 * i + 1] as f64 - l).abs());
        let r = 1.0 / (x + 0.5);
        let ulps = (out[3 * i + 2].to_bits() as i64 - r.to_bits() as i64).abs();
        assert!(ulps <= 1, "rcp({}) off by {ulps} ulps", x + 0.5);
    }
    // Within the documented bounds (plus f32 rounding), and not the exact answer: it is a model.
    assert!(
        max_rel <= 2f64.powi(-22) + 2f64.powi(-24),
        "ex2 relative error {max_rel}"
    );
    assert!(
        max_abs <= 2f64.powi(-22) + 2f64.powi(-21),
        "lg2 absolute error {max_abs}"
    );
    assert!(
        differs > 100,
        "only {differs} of {} differ from libm",
        xs.len()
    );
    // Flush-to-zero: a subnormal input is 0 (ex2 → 1, lg2 → −inf), a subnormal result is 0.
    let sub = f32::from_bits(1);
    let mut o = vec![0f32; 3];
    let op = P(o.as_mut_ptr());
    let l = Launch::new("ftz", 1, 32, 0)
        .output("o", &mut o)
        .math(Math::GpuApprox { seed: 1 });
    // SAFETY: checked accesses.
    unsafe {
        emu::launch_checked(&l, || {
            if gpu::thread_idx_x() == 0 {
                gpu::st(op.p(), 0, gpu::exp2_approx(sub));
                gpu::st(op.p(), 1, gpu::log2_approx(sub));
                gpu::st(op.p(), 2, gpu::exp2_approx(-140.0));
            }
        })
    }
    .unwrap();
    assert!((o[0] - 1.0).abs() <= 2f32.powi(-22), "{}", o[0]);
    assert_eq!(o[1], f32::NEG_INFINITY);
    assert_eq!(o[2], 0.0, "2^-140 is subnormal: flushed");
}

//! The CPU emulator of the CUDA execution model: the semantics the kernels rely on.

use std::sync::atomic::{AtomicU32, Ordering};

use speckv_kernels::emu::{self, EmuError, LaunchConfig};
use speckv_kernels::gpu;

fn cfg(grid: u32, block: u32, shared_bytes: usize) -> LaunchConfig {
    LaunchConfig {
        grid,
        block,
        shared_bytes,
    }
}

/// Runs a kernel writing one u32 per thread and returns the buffer.
fn per_thread(grid: u32, block: u32, shared: usize, f: impl Fn() -> u32 + Sync) -> Vec<u32> {
    let out: Vec<AtomicU32> = (0..grid * block)
        .map(|_| AtomicU32::new(u32::MAX))
        .collect();
    // SAFETY: the kernel only touches the atomics through safe code.
    unsafe {
        emu::launch(cfg(grid, block, shared), || {
            let g = gpu::block_idx_x() * gpu::block_dim_x() + gpu::thread_idx_x();
            out[g as usize].store(f(), Ordering::Relaxed);
        })
        .unwrap();
    }
    out.into_iter().map(|a| a.into_inner()).collect()
}

#[test]
fn emulator_indices_cover_the_grid() {
    let v = per_thread(3, 64, 0, || {
        gpu::block_idx_x() * 1000 + gpu::thread_idx_x() + gpu::grid_dim_x() * 1_000_000
    });
    for b in 0..3u32 {
        for t in 0..64u32 {
            assert_eq!(v[(b * 64 + t) as usize], 3_000_000 + b * 1000 + t);
        }
    }
}

#[test]
fn emulator_shuffles_have_cuda_semantics() {
    let xor = per_thread(1, 64, 0, || gpu::shfl_xor_u32(gpu::thread_idx_x() * 10, 5));
    let down = per_thread(1, 64, 0, || gpu::shfl_down_u32(gpu::thread_idx_x(), 4));
    let idx = per_thread(1, 64, 0, || gpu::shfl_idx_u32(gpu::thread_idx_x(), 35)); // 35 mod 32 = 3
    for t in 0..64u32 {
        let lane = t % 32;
        let warp = t / 32 * 32;
        assert_eq!(xor[t as usize], (warp + (lane ^ 5)) * 10);
        let want_down = if lane + 4 < 32 { t + 4 } else { t };
        assert_eq!(down[t as usize], want_down, "thread {t}");
        assert_eq!(idx[t as usize], warp + 3);
    }
    let f = per_thread(1, 32, 0, || {
        gpu::shfl_xor_f32(gpu::thread_idx_x() as f32 + 0.5, 1).to_bits()
    });
    assert_eq!(f32::from_bits(f[6]), 7.5);
}

#[test]
fn emulator_warp_reduction_by_butterfly() {
    let v = per_thread(2, 96, 0, || {
        let mut s = gpu::thread_idx_x() + 1;
        let mut m = 16;
        while m > 0 {
            s += gpu::shfl_xor_u32(s, m);
            m /= 2;
        }
        s
    });
    for (i, &s) in v.iter().enumerate() {
        let warp = (i % 96) / 32;
        let base = warp as u32 * 32;
        let want: u32 = (base + 1..=base + 32).sum();
        assert_eq!(s, want, "thread {i}");
    }
}

#[test]
fn emulator_barrier_orders_shared_memory() {
    // Each thread writes its slot, syncs, then reads its neighbour's: only correct with a real barrier.
    for block in [32u32, 33, 256, 1024] {
        let v = per_thread(2, block, block as usize * 4, || {
            let t = gpu::thread_idx_x();
            let s = gpu::dynamic_shared::<u32>();
            // SAFETY: slot t is this thread's; the barrier orders the read of slot t+1 after its
            // write (the sanitizer would report the race without it: tests/sanitizer.rs).
            unsafe {
                gpu::sh_st(s, t as usize, t * 3 + gpu::block_idx_x());
                gpu::sync_threads();
                gpu::sh_ld(s, ((t + 1) % gpu::block_dim_x()) as usize)
            }
        });
        for b in 0..2u32 {
            for t in 0..block {
                assert_eq!(
                    v[(b * block + t) as usize],
                    ((t + 1) % block) * 3 + b,
                    "block {block}"
                );
            }
        }
    }
}

#[test]
fn emulator_counts_exited_threads_as_arrived() {
    let v = per_thread(1, 64, 0, || {
        if gpu::thread_idx_x() >= 40 {
            return 1;
        }
        gpu::sync_threads();
        2
    });
    assert_eq!(v.iter().filter(|&&x| x == 2).count(), 40);
}

#[test]
fn emulator_reports_a_shuffle_from_an_exited_lane() {
    // SAFETY: no memory is touched.
    let r = unsafe {
        emu::launch(cfg(1, 32, 0), || {
            if gpu::thread_idx_x() == 7 {
                return;
            }
            gpu::shfl_idx_u32(1, 7);
        })
    };
    assert!(
        matches!(r, Err(EmuError::KernelPanic { ref message, .. }) if message.contains("exited")),
        "{r:?}"
    );
}

#[test]
fn emulator_reports_a_shuffle_from_a_missing_lane() {
    // SAFETY: no memory is touched.
    let r = unsafe {
        emu::launch(cfg(1, 40, 0), || {
            gpu::shfl_xor_u32(1, 16);
        })
    };
    assert!(
        matches!(r, Err(EmuError::KernelPanic { ref message, .. }) if message.contains("does not exist")),
        "{r:?}"
    );
}

#[test]
fn emulator_reports_deadlock_instead_of_hanging() {
    // Half the warp shuffles while the other half waits at the block barrier.
    // SAFETY: no memory is touched.
    let r = unsafe {
        emu::launch(cfg(1, 32, 0), || {
            if gpu::thread_idx_x() < 16 {
                gpu::shfl_xor_u32(1, 1);
            } else {
                gpu::sync_threads();
            }
        })
    };
    assert!(matches!(r, Err(EmuError::Deadlock { .. })), "{r:?}");
}

#[test]
fn emulator_turns_kernel_panics_into_errors() {
    // SAFETY: no memory is touched.
    let r = unsafe {
        emu::launch(cfg(4, 64, 0), || {
            if gpu::block_idx_x() == 2 && gpu::thread_idx_x() == 9 {
                panic!("boom at 2/9");
            }
            gpu::sync_threads();
        })
    };
    assert!(
        matches!(r, Err(EmuError::KernelPanic { block: 2, ref message }) if message.contains("boom")),
        "{r:?}"
    );
}

#[test]
fn emulator_rejects_impossible_launches() {
    for c in [
        cfg(0, 32, 0),
        cfg(1, 0, 0),
        cfg(1, 1025, 0),
        cfg(1, 32, 300 * 1024),
    ] {
        // SAFETY: nothing runs.
        let r = unsafe { emu::launch(c, || {}) };
        assert!(matches!(r, Err(EmuError::BadLaunch(_))), "{c:?}: {r:?}");
    }
}

#[test]
#[should_panic(expected = "outside an emulated kernel")]
fn intrinsics_outside_a_launch_panic_with_a_message() {
    gpu::thread_idx_x();
}

/// `mma_m16n8k16` on the emulator computes D = A·B + C with the documented fragment layout
/// (`gpu::mma_layout`): random f16 A, B and f32 C distributed to the lanes by the layout, D
/// gathered back by it, against a float64 product.
#[test]
fn emulator_mma_follows_the_fragment_layout() {
    use rand::{Rng, SeedableRng};
    use speckv_kernels::gpu::{f16_bits_to_f32, f32_to_f16_bits, mma_layout};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let a: Vec<u16> = (0..256)
        .map(|_| f32_to_f16_bits(rng.gen_range(-2.0..2.0)))
        .collect();
    let b: Vec<u16> = (0..128)
        .map(|_| f32_to_f16_bits(rng.gen_range(-2.0..2.0)))
        .collect();
    let c: Vec<f32> = (0..128).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (a, b, c) = (&a, &b, &c);
    let d: Vec<AtomicU32> = (0..128).map(|_| AtomicU32::new(0)).collect();
    // SAFETY: the kernel touches only the atomics and the read-only inputs through safe code.
    unsafe {
        emu::launch(cfg(1, 32, 0), || {
            let lane = gpu::lane_id();
            let mut ar = [0u32; 4];
            for h in 0..8u32 {
                let (r, k) = mma_layout::a(lane, h);
                ar[(h / 2) as usize] |= (a[(r * 16 + k) as usize] as u32) << (16 * (h % 2));
            }
            let mut br = [0u32; 2];
            for h in 0..4u32 {
                let (k, n) = mma_layout::b(lane, h);
                br[(h / 2) as usize] |= (b[(k * 8 + n) as usize] as u32) << (16 * (h % 2));
            }
            let mut cr = [0f32; 4];
            for e in 0..4u32 {
                let (r, n) = mma_layout::c(lane, e);
                cr[e as usize] = c[(r * 8 + n) as usize];
            }
            let dr = gpu::mma_m16n8k16(ar, br, cr);
            for e in 0..4u32 {
                let (r, n) = mma_layout::c(lane, e);
                d[(r * 8 + n) as usize].store(dr[e as usize].to_bits(), Ordering::Relaxed);
            }
        })
        .unwrap();
    }
    for r in 0..16 {
        for n in 0..8 {
            let mut want = c[r * 8 + n] as f64;
            for k in 0..16 {
                want +=
                    f16_bits_to_f32(a[r * 16 + k]) as f64 * f16_bits_to_f32(b[k * 8 + n]) as f64;
            }
            let got = f32::from_bits(d[r * 8 + n].load(Ordering::Relaxed)) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "D[{r}][{n}] = {got}, want {want}"
            );
        }
    }
    // Every (row, col) of A, (k, n) of B and (row, n) of C is held by exactly one lane and half.
    let mut seen_a = [0u8; 256];
    let mut seen_c = [0u8; 128];
    for lane in 0..32 {
        for h in 0..8 {
            let (r, k) = mma_layout::a(lane, h);
            seen_a[(r * 16 + k) as usize] += 1;
        }
        for e in 0..4 {
            let (r, n) = mma_layout::c(lane, e);
            seen_c[(r * 8 + n) as usize] += 1;
        }
    }
    assert!(seen_a.iter().all(|&x| x == 1) && seen_c.iter().all(|&x| x == 1));
}

#[test]
fn f32_to_f16_rounds_to_nearest_even_like_half() {
    use speckv_kernels::gpu::f32_to_f16_bits;
    let mut x = 1e-9f32;
    let mut cases = vec![
        0.0f32,
        -0.0,
        65504.0,
        65520.0,
        1e9,
        -1e9,
        f32::INFINITY,
        5.96e-8,
        2.98e-8,
        1.0 + 1.0 / 2048.0,
    ];
    while x < 1e6 {
        cases.push(x);
        cases.push(-x * 1.37);
        x *= 1.7;
    }
    for v in cases {
        assert_eq!(f32_to_f16_bits(v), half::f16::from_f32(v).to_bits(), "{v}");
    }
    assert!(half::f16::from_bits(f32_to_f16_bits(f32::NAN)).is_nan());
}

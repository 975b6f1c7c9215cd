//! The weight regimes: formats (FP16, INT8 per-row, NF4 bitsandbytes layout), safetensors files,
//! `speckv quantize`, and the fused dequantise-GEMV kernels on the emulator, the CPU backend and the
//! CUDA backend against a float64 reference over awkward shapes.

mod common;

use half::f16;
use rand::{Rng, SeedableRng};
use speckv::weights::gemv;
use speckv::weights::quant::{nf4_code, relative_rms_error, Format, QMatrix};
use speckv_kernels::params::NF4_CODE;

fn weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    common::normal_logits(out * inp, 0.05, seed)
}

/// y = x · Ŵᵀ in f64 with Ŵ the dequantised matrix, plus Σ|x·w| per output for the tolerance.
fn reference(q: &QMatrix, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (out, inp) = q.shape();
    let w = q.dequantize();
    let mut y = vec![0f64; m * out];
    let mut mag = vec![0f64; m * out];
    for i in 0..m {
        for o in 0..out {
            for k in 0..inp {
                let t = x[i * inp + k] as f64 * w[o * inp + k] as f64;
                y[i * out + o] += t;
                mag[i * out + o] += t.abs();
            }
        }
    }
    (y, mag)
}

type Run<'a> = &'a dyn Fn(&QMatrix, &[f32], usize) -> speckv::Result<Vec<f32>>;

fn check(run: Run<'_>, q: &QMatrix, m: usize, seed: u64, label: &str) {
    let (_, inp) = q.shape();
    let x = common::normal_logits(m * inp, 1.0, seed);
    let got = run(q, &x, m).unwrap_or_else(|e| panic!("{label}: {e}"));
    let (want, mag) = reference(q, &x, m);
    assert_eq!(got.len(), want.len(), "{label}");
    // The tensor-core path (v2, M ≥ 2, K a multiple of 64) multiplies f16 weights and f16 x: each
    // product carries up to 2 × 2^-11 relative rounding, so its tolerance is in those units.
    // v3 takes v2's tensor-core path there too.
    let tensor = (label.contains("v2") || label.contains("v3")) && m >= 2 && inp % 64 == 0;
    let rel = if tensor { 1.1e-3 } else { 2e-6 };
    for (i, ((g, w), a)) in got.iter().zip(&want).zip(&mag).enumerate() {
        let tol = rel * a + 1e-6 + 1e-5 * w.abs();
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{label}: y[{i}] = {g}, reference {w} (tolerance {tol})"
        );
    }
}

macro_rules! per_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn emulator() {
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        speckv::backend::emulate::gemv(q, x, m, 128)
                    },
                    "emulator",
                    true,
                );
            }
            /// v2 on a 7-SM plan (K split across blocks even for small matrices).
            #[test]
            fn emulator_v2() {
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        speckv::backend::emulate::Emulator::new(32).gemv_v2(q, x, m, 7)
                    },
                    "emulator_v2",
                    true,
                );
            }
            /// v3 (the streaming kernel at M = 1, v2 elsewhere) on a 7-SM plan.
            #[test]
            fn emulator_v3() {
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        speckv::backend::emulate::Emulator::new(32).gemv_v3(q, x, m, 7)
                    },
                    "emulator_v3",
                    true,
                );
            }
            #[test]
            fn cpu() {
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| gemv::cpu(q, x, m),
                    "cpu",
                    false,
                );
            }
            #[test]
            fn cuda() {
                let Some(c) = common::cuda() else { return };
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        let d = c.upload_matrix(q)?;
                        c.gemv(&d, x, m)
                    },
                    // `gemv` is v2 (tensor cores for M ≥ 2): the label says so, as the tolerance
                    // reads it.
                    "cuda v2",
                    false,
                );
            }
            /// v3, what the device forward pass launches.
            #[test]
            fn cuda_v3() {
                let Some(c) = common::cuda() else { return };
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        let d = c.upload_matrix(q)?;
                        c.gemv_v3(&d, x, m)
                    },
                    "cuda v3",
                    false,
                );
            }
            /// v1, the oracle kernel, on the device too.
            #[test]
            fn cuda_v1() {
                let Some(c) = common::cuda() else { return };
                ($body)(
                    &|q: &QMatrix, x: &[f32], m: usize| {
                        let d = c.upload_matrix(q)?;
                        c.gemv_v1(&d, x, m)
                    },
                    "cuda_v1",
                    false,
                );
            }
        }
    };
}

per_backend!(
    awkward_shapes_every_format,
    |run: Run<'_>, label: &str, slow: bool| {
        // (out, in): in not a multiple of 64 wherever the format allows; NF4 needs out·in % 64 == 0.
        let shapes: &[(usize, usize)] = &[
            (1, 64),
            (7, 64),
            (1, 33),
            (7, 100),
            (64, 33),
            (32, 100),
            (13, 4096),
            (4096, 64),
        ];
        for (s, &(out, inp)) in shapes.iter().enumerate() {
            let w = weights(out, inp, 10 + s as u64);
            for format in Format::ALL {
                if format == Format::Nf4 && (out * inp) % 64 != 0 {
                    continue;
                }
                let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
                for m in [1usize, 3, 5, 9, 16] {
                    if slow && out * inp > 100_000 && m > 1 {
                        continue; // the emulator is slow; the big shape runs at M = 1 there
                    }
                    check(
                        run,
                        &q,
                        m,
                        100 + m as u64,
                        &format!("{label} {format:?} {out}×{inp} M={m}"),
                    );
                }
            }
        }
    }
);

per_backend!(
    model_shaped_layer,
    |run: Run<'_>, label: &str, slow: bool| {
        let (out, inp) = if slow { (64, 4096) } else { (1024, 4096) };
        let w = weights(out, inp, 77);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            check(run, &q, 5, 78, &format!("{label} {format:?} {out}×{inp}"));
        }
    }
);

per_backend!(
    double_quantised_nf4,
    |run: Run<'_>, label: &str, _slow: bool| {
        let (out, inp) = (40, 1024); // 640 blocks: three double-quant blocks, the last partial
        let w = weights(out, inp, 5);
        let q = QMatrix::quantize(&w, out, inp, Format::Nf4, true).unwrap();
        check(run, &q, 4, 6, &format!("{label} nf4+dq"));
    }
);

per_backend!(
    bad_shapes_are_errors,
    |run: Run<'_>, label: &str, _slow: bool| {
        let w = weights(4, 64, 1);
        let q = QMatrix::quantize(&w, 4, 64, Format::Int8, false).unwrap();
        assert!(run(&q, &vec![0.0; 63], 1).is_err(), "{label}: x too short");
        assert!(run(&q, &vec![0.0; 17 * 64], 17).is_err(), "{label}: M = 17");
        assert!(run(&q, &[], 0).is_err(), "{label}: M = 0");
    }
);

#[test]
fn emulator_every_block_size_agrees() {
    let w = weights(9, 200, 3);
    let q = QMatrix::quantize(&w, 9, 200, Format::Int8, false).unwrap();
    let x = common::normal_logits(3 * 200, 1.0, 4);
    let first = speckv::backend::emulate::gemv(&q, &x, 3, 32).unwrap();
    for block in [64u32, 96, 128, 256, 512, 1024] {
        let y = speckv::backend::emulate::gemv(&q, &x, 3, block).unwrap();
        assert_eq!(
            y, first,
            "block {block}: one warp per row gives the same sums"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// formats

#[test]
fn int8_is_per_row_absmax_over_127() {
    let w = vec![
        0.5f32, -1.27, 0.0, 0.635, /* row 1 */ 0.0, 0.0, 0.0, 0.0,
    ];
    let QMatrix::Int8 { q, scale, .. } = QMatrix::quantize(&w, 2, 4, Format::Int8, false).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        scale,
        vec![0.01, 0.0],
        "scale = absmax / 127; an all-zero row has scale 0"
    );
    assert_eq!(q, vec![50, -127, 0, 64, 0, 0, 0, 0]); // 63.5 rounds away from zero
}

#[test]
fn nf4_layout_matches_bitsandbytes() {
    // Block of 64: absmax 2.0; element 0 = −2 → code 0 (−1), element 1 = 2 → code 15 (1): byte 0x0F.
    let mut w = vec![0f32; 128];
    w[0] = -2.0;
    w[1] = 2.0;
    w[2] = 2.0 * 0.079_580_3; // code 8
    w[3] = 0.0; // code 7
    w[64] = 0.5; // second block: absmax 0.5, code 15 in the high nibble of byte 32
    let QMatrix::Nf4 { packed, absmax, .. } =
        QMatrix::quantize(&w, 2, 64, Format::Nf4, false).unwrap()
    else {
        panic!()
    };
    assert_eq!(absmax, vec![2.0, 0.5]);
    assert_eq!(packed.len(), 64);
    assert_eq!(packed[0], 0x0F, "first element in the high nibble");
    assert_eq!(packed[1], 0x87);
    assert_eq!(packed[32] >> 4, 15);
    assert_eq!(packed[33], 0x77, "zeros are code 7");
}

#[test]
fn nf4_code_is_the_nearest_code_value() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..20_000 {
        let v: f32 = rng.gen_range(-1.0..=1.0);
        let c = nf4_code(v) as usize;
        let d = (v - NF4_CODE[c]).abs();
        for (j, cj) in NF4_CODE.iter().enumerate() {
            assert!(
                d <= (v - cj).abs() + 1e-7,
                "v={v}: code {c} but {j} is nearer"
            );
        }
    }
    for (i, c) in NF4_CODE.iter().enumerate() {
        assert_eq!(nf4_code(*c) as usize, i);
    }
}

#[test]
fn nf4_needs_whole_blocks() {
    let w = weights(3, 10, 1);
    let e = QMatrix::quantize(&w, 3, 10, Format::Nf4, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("multiple of the block size 64") && e.contains("3×10"),
        "{e}"
    );
    assert!(
        QMatrix::quantize(&w, 3, 10, Format::Int8, true).is_err(),
        "double quant is nf4-only"
    );
    assert!(QMatrix::quantize(&[f32::NAN; 64], 1, 64, Format::Fp16, false).is_err());
    assert!(QMatrix::quantize(&w, 3, 11, Format::Fp16, false).is_err());
}

#[test]
fn quantisation_error_orders_the_regimes() {
    let (out, inp) = (64, 1024);
    let w = weights(out, inp, 9);
    let e: Vec<f64> = Format::ALL
        .iter()
        .map(|&f| relative_rms_error(&w, &QMatrix::quantize(&w, out, inp, f, false).unwrap()))
        .collect();
    assert!(e[0] < 1e-3 && e[0] < e[1] && e[1] < e[2], "{e:?}");
    assert!(e[1] < 0.02 && e[2] < 0.15, "{e:?}");
    let dq = relative_rms_error(
        &w,
        &QMatrix::quantize(&w, out, inp, Format::Nf4, true).unwrap(),
    );
    assert!(
        dq < e[2] * 1.05,
        "double quantisation adds little error: {dq} vs {}",
        e[2]
    );
}

#[test]
fn safetensors_round_trip_with_the_documented_tensors() {
    let dir = std::env::temp_dir().join(format!("speckv-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, inp) = (12, 64);
    let w = weights(out, inp, 2);
    for (format, dq, names) in [
        (Format::Fp16, false, vec![("weight", "F16", vec![12, 64])]),
        (
            Format::Int8,
            false,
            vec![("weight", "I8", vec![12, 64]), ("scale", "F32", vec![12])],
        ),
        (
            Format::Nf4,
            false,
            vec![("weight", "U8", vec![384]), ("absmax", "F32", vec![12])],
        ),
        (
            Format::Nf4,
            true,
            vec![
                ("weight", "U8", vec![384]),
                ("absmax_q", "U8", vec![12]),
                ("absmax_scale", "F32", vec![1]),
            ],
        ),
    ] {
        let q = QMatrix::quantize(&w, out, inp, format, dq).unwrap();
        let p = dir.join(format!("{}-{dq}.safetensors", format.name()));
        q.save(&p).unwrap();
        assert_eq!(QMatrix::load(&p).unwrap(), q, "{format:?}");
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, dtype, shape) in names {
            let t = st.tensor(name).unwrap();
            assert_eq!(format!("{:?}", t.dtype()), dtype, "{format:?} {name}");
            assert_eq!(t.shape(), shape.as_slice(), "{format:?} {name}");
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().clone().unwrap();
        assert_eq!(md["format"], format.name());
        assert_eq!(md["shape"], "[12, 64]");
        assert!(md.contains_key("blocksize"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A float32 C-order .npy, written by hand (v1.0 header).
fn npy_f32(out: usize, inp: usize, w: &[f32]) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({out}, {inp}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(bytemuck::cast_slice(w));
    npy
}

#[test]
fn quantize_cli_reads_npy_and_writes_safetensors() {
    let dir = std::env::temp_dir().join(format!("speckv-qcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, inp) = (8, 128);
    let w = weights(out, inp, 3);
    let input = dir.join("w.npy");
    std::fs::write(&input, npy_f32(out, inp, &w)).unwrap();
    for format in ["fp16", "int8", "nf4"] {
        let output = dir.join(format!("w-{format}.safetensors"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
            .args([
                "quantize",
                "--format",
                format,
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--json",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["shape"], serde_json::json!([out, inp]));
        let q = QMatrix::load(&output).unwrap();
        assert_eq!(
            q,
            QMatrix::quantize(&w, out, inp, Format::parse(format).unwrap(), false).unwrap()
        );
    }
    // A matrix NF4 cannot block: a clear error, non-zero exit.
    let bad = dir.join("bad.npy");
    std::fs::write(&bad, npy_f32(3, 5, &[0.5f32; 15])).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_speckv"))
        .args([
            "quantize",
            "--format",
            "nf4",
            "--input",
            bad.to_str().unwrap(),
            "--output",
            dir.join("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of the block size"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fp16_weights_are_the_f16_rounding() {
    let w = vec![1.0f32 / 3.0, 65504.0, -0.0001];
    let QMatrix::Fp16 { w: h, .. } = QMatrix::quantize(&w, 1, 3, Format::Fp16, false).unwrap()
    else {
        panic!()
    };
    assert_eq!(h, w.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>());
}

/// The v2 paths on the plans a real GPU gets (132 SMs) and on small ones: the tensor-core kernel
/// at every M 2..16 and every format, the CUDA-core kernel at M = 1 and where K is not a multiple
/// of 64, K split into many blocks or none, against the float64 reference and v1.
#[test]
fn emulator_v2_paths_and_splits() {
    for (s, &(out, inp)) in [(64usize, 512usize), (100, 1024), (16, 64), (70, 192)]
        .iter()
        .enumerate()
    {
        let w = weights(out, inp, 300 + s as u64);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            for m in [1usize, 2, 3, 8, 9, 16] {
                for sms in [1u32, 7, 132] {
                    let (lp, plan) = speckv::plan::GemvVersion::V2
                        .plan(format, out as u32, inp as u32, m as u32, sms);
                    let label = format!(
                        "v2 {} {out}x{inp} m {m} sms {sms} ({})",
                        format.name(),
                        lp.entry
                    );
                    let run = |q: &QMatrix, x: &[f32], m: usize| {
                        speckv::backend::emulate::Emulator::new(32).gemv_v2(q, x, m, sms)
                    };
                    check(&run, &q, m, 40 + m as u64, &label);
                    assert_eq!(lp.entry.starts_with("gemv_tc"), m >= 2, "{label}");
                    assert!(plan.ksplits >= 1 && plan.kt % 64 == 0, "{label}: {plan:?}");
                }
            }
        }
    }
}

/// The plans: M = 1 on CUDA cores, the verification batch on tensor cores, and a narrow matrix
/// (Qwen 1.5B's down projection, 1536 × 8960) split along K so an H200's SMs are all busy.
#[test]
fn v2_plans_split_narrow_outputs() {
    let (lp, p) = speckv::plan::GemvVersion::V2.plan(Format::Fp16, 1536, 8960, 1, 132);
    assert_eq!(lp.entry, "gemv_v2_fp16_m1");
    assert!(p.grid >= 264, "{p:?}");
    assert!(
        p.ksplits > 1 && p.kt % 64 == 0 && p.kt * p.ksplits >= 8960,
        "{p:?}"
    );
    let (lp, p) = speckv::plan::GemvVersion::V2.plan(Format::Nf4, 1536, 8960, 5, 132);
    assert_eq!(lp.entry, "gemv_tc_nf4_n8");
    assert!(p.grid >= 264 && p.shared_bytes <= 48 * 1024, "{p:?}");
    let (lp, _) = speckv::plan::GemvVersion::V2.plan(Format::Int8, 4096, 4096, 16, 132);
    assert_eq!(lp.entry, "gemv_tc_int8_n16");
    let (lp, _) = speckv::plan::GemvVersion::V2.plan(Format::Int8, 4096, 100, 16, 132);
    assert_eq!(
        lp.entry, "gemv_v2_int8_m16",
        "K % 64 != 0 stays on CUDA cores"
    );
}

/// v3's streaming kernel at M = 1 on the plans a real GPU gets and on small ones: rows that fill
/// a block's 32 or leave it ragged, K split into many blocks or none (splits of 512 and more),
/// every format, against the float64 reference; an x that is not 16-byte aligned is read alike.
#[test]
fn emulator_v3_streams_decode_shapes() {
    let shapes = [
        (1usize, 64usize),
        (31, 512),
        (32, 576),
        (33, 1536),
        (70, 4160),
    ];
    let mut split = false;
    for (s, &(out, inp)) in shapes.iter().enumerate() {
        let w = weights(out, inp, 500 + s as u64);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            for sms in [1u32, 7, 132] {
                let (lp, plan) =
                    speckv::plan::GemvVersion::V3.plan(format, out as u32, inp as u32, 1, sms);
                let label = format!(
                    "v3 {} {out}x{inp} sms {sms} ({}, {} splits)",
                    format.name(),
                    lp.entry,
                    plan.ksplits
                );
                assert_eq!(lp.entry, format!("gemv_v3_{}", format.name()), "{label}");
                assert!(
                    plan.kt % 64 == 0 && plan.kt * plan.ksplits >= inp as u32,
                    "{label}: {plan:?}"
                );
                assert!(
                    plan.ksplits == 1 || plan.kt >= speckv_kernels::gemv::V3_MIN_SPLIT,
                    "{label}: {plan:?}"
                );
                split |= plan.ksplits > 2;
                let run = |q: &QMatrix, x: &[f32], m: usize| {
                    speckv::backend::emulate::Emulator::new(32).gemv_v3(q, x, m, sms)
                };
                check(&run, &q, 1, 60 + s as u64, &label);
            }
            // x one float into a buffer: not 16-byte aligned, copied for the 16-byte loads.
            let x = common::normal_logits(inp + 1, 1.0, 61);
            let emu = speckv::backend::emulate::Emulator::new(32);
            let shifted = emu.gemv_v3(&q, &x[1..], 1, 7).unwrap();
            let mut xa = vec![[0f32; 4]; inp.div_ceil(4)];
            bytemuck::cast_slice_mut::<[f32; 4], f32>(&mut xa)[..inp].copy_from_slice(&x[1..]);
            let aligned = bytemuck::cast_slice::<[f32; 4], f32>(&xa);
            assert_eq!(aligned.as_ptr() as usize % 16, 0);
            let aligned = emu.gemv_v3(&q, &aligned[..inp], 1, 7).unwrap();
            assert_eq!(
                shifted,
                aligned,
                "{} {out}x{inp}: unaligned x",
                format.name()
            );
        }
    }
    assert!(split, "some plan splits K into more than two blocks");
}

/// v3's plans: the streaming kernel only at M = 1 with K a multiple of 64 (v2's plan otherwise,
/// launch for launch), the grid at least two blocks per SM where K allows.
#[test]
fn v3_plans_stream_decode_and_keep_v2_elsewhere() {
    for (out, inp) in [
        (1536u32, 8960u32),
        (1536, 1536),
        (8960, 1536),
        (151936, 1536),
        (256, 1536),
    ] {
        let (lp, p) = speckv::plan::GemvVersion::V3.plan(Format::Fp16, out, inp, 1, 132);
        assert_eq!(lp.entry, "gemv_v3_fp16");
        assert_eq!(p.rows_per_block, 32);
        let room = (inp / speckv_kernels::gemv::V3_MIN_SPLIT).max(1);
        assert!(
            p.grid >= 264 || p.ksplits == room,
            "{out}x{inp}: fewer than two blocks per SM while K could split further: {p:?}"
        );
        assert!(
            p.kt * p.ksplits >= inp && p.kt * (p.ksplits - 1) < inp,
            "{p:?}"
        );
    }
    for (format, out, inp, m) in [
        (Format::Nf4, 1536u32, 8960u32, 5u32),
        (Format::Int8, 4096, 4096, 16),
        (Format::Fp16, 4096, 4100, 1),
        (Format::Int8, 7, 100, 1),
    ] {
        assert_eq!(
            speckv::plan::GemvVersion::V3.plan(format, out, inp, m, 132),
            speckv::plan::GemvVersion::V2.plan(format, out, inp, m, 132),
            "{format:?} {out}x{inp} M = {m}"
        );
    }
}

/// The CPU integer path's product, term for term, in float64: x quantised per 32 (scale absmax /
/// 127, codes rounded half away from zero), each 16-element half's integer dot scaled by the f32
/// (weight scale · x scale); also Σ|term| for the tolerance.
fn reference_q8(q: &QMatrix, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (out, inp) = q.shape();
    let mut xq = vec![0i32; inp];
    let mut dx = vec![0f32; inp / 32];
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (j, v) in xb.iter().enumerate() {
            xq[32 * b + j] = (v * id).round().clamp(-127.0, 127.0) as i32;
        }
        dx[b] = d;
    }
    let t = speckv::weights::cpu::nf4_i8();
    let (mut y, mut mag) = (vec![0f64; out], vec![0f64; out]);
    for r in 0..out {
        for (b, &db) in dx.iter().enumerate() {
            for h in 0..2 {
                let ks = 32 * b + 16 * h..32 * b + 16 * h + 16;
                let (s, dot): (f32, i32) = match q {
                    QMatrix::Int8 { q, scale, .. } => {
                        (scale[r], ks.map(|k| q[r * inp + k] as i32 * xq[k]).sum())
                    }
                    QMatrix::Nf4 { packed, absmax, .. } => {
                        let e0 = r * inp + 32 * b;
                        let code = |e: usize| {
                            let byte = packed[e / 2];
                            let nib = if e.is_multiple_of(2) {
                                byte >> 4
                            } else {
                                byte & 15
                            };
                            t[nib as usize] as i32
                        };
                        (
                            absmax[e0 / 64] / 127.0,
                            ks.map(|k| code(r * inp + k) * xq[k]).sum(),
                        )
                    }
                    QMatrix::Fp16 { .. } => unreachable!("FP16 has no integer path"),
                };
                let term = (s * db) as f64 * dot as f64;
                y[r] += term;
                mag[r] += term.abs();
            }
        }
    }
    (y, mag)
}

/// A v4 run: y of one x for a matrix on a plan for the given SM count.
type RunV4<'a> = &'a dyn Fn(&QMatrix, &[f32], u32) -> speckv::Result<Vec<f32>>;

/// v4 (INT8 and NF4 at M = 1 by integer dot products) is the CPU's integer product: against the
/// float64 of its terms and against `weights::cpu` itself (scalar), on plans with K split into
/// many blocks or none, with x that ties at a half (2.5 after scaling rounds away from zero) and an
/// all-zero group; and it is not the float product (x really is quantised).
#[test]
fn emulator_v4_is_the_cpu_integer_product() {
    v4_is_the_cpu_integer_product(
        &|q: &QMatrix, x: &[f32], sms: u32| {
            speckv::backend::emulate::Emulator::new(32).gemv_v4(q, x, 1, sms)
        },
        &[1, 7, 132],
        "emulator",
    );
}

/// The same on a CUDA device (its own SM count); skips without one.
#[test]
fn cuda_v4_is_the_cpu_integer_product() {
    let Some(c) = common::cuda() else { return };
    v4_is_the_cpu_integer_product(
        &|q: &QMatrix, x: &[f32], _sms: u32| {
            let d = c.upload_matrix(q)?;
            c.gemv_v4(&d, x, 1)
        },
        &[c.sm_count()],
        "cuda",
    );
}

fn v4_is_the_cpu_integer_product(run: RunV4<'_>, sms_list: &[u32], backend: &str) {
    use speckv::weights::cpu::{matmul_with, Acts, Isa, Linear};
    let shapes = [(1usize, 64usize), (31, 512), (33, 1536), (70, 4160)];
    let mut split = false;
    let mut differs_from_float = false;
    for (s, &(out, inp)) in shapes.iter().enumerate() {
        let w = weights(out, inp, 700 + s as u64);
        let mut x = common::normal_logits(inp, 1.0, 701 + s as u64);
        // Group 0: absmax 127 (scale 1), so 2.5 and -3.5 are ties; group 1 (if any): all zero.
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        if inp >= 64 {
            x[32..64].iter_mut().for_each(|v| *v = 0.0);
        }
        for format in [Format::Int8, Format::Nf4] {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            let (want, mag) = reference_q8(&q, &x);
            let cpu = {
                let l = Linear::Regime(q.clone());
                let mut acts = Acts::new(inp);
                acts.quantize(&x, 1, inp).unwrap();
                let (mut y, mut yt) = (vec![0f32; out], vec![0f32; out]);
                matmul_with(Isa::Scalar, &l, &x, &acts, 1, &mut y, &mut yt).unwrap();
                y
            };
            let float = speckv::backend::emulate::Emulator::new(32)
                .gemv_v3(&q, &x, 1, 7)
                .unwrap();
            for &sms in sms_list {
                let (lp, plan) =
                    speckv::plan::GemvVersion::V4.plan(format, out as u32, inp as u32, 1, sms);
                let label = format!(
                    "{backend} v4 {} {out}x{inp} sms {sms} ({}, {} splits)",
                    format.name(),
                    lp.entry,
                    plan.ksplits
                );
                assert_eq!(lp.entry, format!("gemv_v4_{}", format.name()), "{label}");
                split |= plan.ksplits > 2;
                let got = run(&q, &x, sms).unwrap_or_else(|e| panic!("{label}: {e}"));
                for r in 0..out {
                    let tol = 1e-6 * mag[r] + 1e-7;
                    assert!(
                        (got[r] as f64 - want[r]).abs() <= tol,
                        "{label}: y[{r}] = {}, reference {} (tolerance {tol})",
                        got[r],
                        want[r]
                    );
                    assert!(
                        (got[r] - cpu[r]).abs() as f64 <= 2.0 * tol,
                        "{label}: y[{r}] = {}, the CPU integer path {}",
                        got[r],
                        cpu[r]
                    );
                    differs_from_float |= (got[r] - float[r]).abs() as f64 > 1e-4 * mag[r];
                }
            }
        }
    }
    assert!(split, "some plan splits K into more than two blocks");
    assert!(
        differs_from_float,
        "v4 equals the float product: x was not quantised"
    );
}

/// v4's plans: INT8 and NF4 at M = 1 with K a multiple of 64 (v3's grid, x's codes in shared
/// memory under 32 KiB, K split further for very wide rows); FP16 and everything else is v3's plan.
#[test]
fn v4_plans_take_int8_and_nf4_decode_only() {
    for format in [Format::Int8, Format::Nf4] {
        for (out, inp) in [(1536u32, 8960u32), (151936, 1536), (64, 65536)] {
            let (lp, p) = speckv::plan::GemvVersion::V4.plan(format, out, inp, 1, 132);
            assert_eq!(lp.entry, format!("gemv_v4_{}", format.name()));
            assert!(p.kt <= speckv_kernels::gemv::V4_MAX_SPLIT, "{p:?}");
            assert!(p.shared_bytes <= 32 * 1024, "{p:?}");
            assert!(p.kt * p.ksplits >= inp && p.kt % 64 == 0, "{p:?}");
            assert_eq!(p.grid, p.row_tiles * p.ksplits, "{p:?}");
        }
        assert_eq!(
            speckv::plan::GemvVersion::V4.plan(format, 1536, 8960, 5, 132),
            speckv::plan::GemvVersion::V3.plan(format, 1536, 8960, 5, 132)
        );
        assert_eq!(
            speckv::plan::GemvVersion::V4.plan(format, 4096, 4100, 1, 132),
            speckv::plan::GemvVersion::V3.plan(format, 4096, 4100, 1, 132)
        );
    }
    assert_eq!(
        speckv::plan::GemvVersion::V4.plan(Format::Fp16, 1536, 8960, 1, 132),
        speckv::plan::GemvVersion::V3.plan(Format::Fp16, 1536, 8960, 1, 132)
    );
}

/// The emulator's `dp4a` and `prmt` are the PTX ISA's (the GPU runs the instructions themselves):
/// signed bytes at the extremes, and `prmt`'s byte selection and sign replication.
#[test]
fn dp4a_and_prmt_follow_the_ptx_isa() {
    use speckv_kernels::gpu::{dp4a_bits, prmt_bits};
    let bytes = |v: [i8; 4]| u32::from_le_bytes(v.map(|b| b as u8));
    assert_eq!(
        dp4a_bits(bytes([1, 2, 3, 4]), bytes([5, 6, 7, 8]), 10),
        10 + 70
    );
    assert_eq!(
        dp4a_bits(bytes([-128, 127, -1, 0]), bytes([-128, -128, 127, 5]), -3),
        -3 + 16384 - 16256 - 127
    );
    let (a, b) = (0x8877_6655u32, 0x4433_2211u32);
    assert_eq!(prmt_bits(a, b, 0x3210), a);
    assert_eq!(prmt_bits(a, b, 0x7654), b);
    assert_eq!(prmt_bits(a, b, 0x0415), 0x5511_6622);
    // Bit 3 of a selector replicates the chosen byte's sign bit: 0x88 → 0xff, 0x11 and 0x55 → 0x00.
    assert_eq!(prmt_bits(a, b, 0x8c0b), 0x0000_55ff);
}

/// Every tensor-core entry issues exactly one `mma.sync.aligned` per tile and n-tile: a copy in a
/// branch (LLVM may duplicate inline asm into both arms) hangs a warp whose lanes take different
/// arms, as NF4 at M = 16 did on an H200 before the staged x was padded (`TC_PAD`).
#[test]
fn tensor_core_entries_issue_one_mma_per_tile() {
    use speckv_kernels::gemv::{FormatV2, Fp16, Int8, Nf4};
    let tiles = [
        ("fp16", Fp16::TILES),
        ("int8", Int8::TILES),
        ("nf4", Nf4::TILES),
    ];
    let mut checked = 0;
    for arch in speckv::ptx::Arch::ALL {
        let Ok(ptx) = arch.ptx() else { continue };
        for (fmt, t) in tiles {
            for (suffix, nt) in [("n8", 1), ("n16", 2)] {
                let entry = format!(".entry gemv_tc_{fmt}_{suffix}(");
                let start = ptx
                    .find(&entry)
                    .unwrap_or_else(|| panic!("{}: no {entry}", arch.name()));
                let body = &ptx[start..];
                let body = &body[..body.find("\n}\n").expect("entry body ends")];
                assert_eq!(
                    body.matches("mma.sync.aligned").count(),
                    t * nt,
                    "{} gemv_tc_{fmt}_{suffix}: mma instructions",
                    arch.name()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "no PTX was checked");
}

/// A fused run: y0 `[m, out]` updated as the fusion says, by a version's plan for an SM count.
type FusedFn = dyn Fn(
    &QMatrix,
    &[f32],
    &[f32],
    usize,
    speckv::plan::GemvVersion,
    gemv::Fusion<&[f32]>,
    u32,
) -> speckv::Result<Vec<f32>>;
type RunFused<'a> = &'a FusedFn;

fn emulator_fused(
    q: &QMatrix,
    x: &[f32],
    y0: &[f32],
    m: usize,
    v: speckv::plan::GemvVersion,
    f: gemv::Fusion<&[f32]>,
    sms: u32,
) -> speckv::Result<Vec<f32>> {
    let mut y = y0.to_vec();
    speckv::backend::emulate::Emulator::new(32).gemv_into(q, x, &mut y, m, sms, v, f)?;
    Ok(y)
}

/// The norm fused into v3 / v4 (`_norm` entries) is `rms_norm_f32` at its launch's block size (256)
/// followed by the plain GEMV: bit for bit on the emulator, and within rounding on CUDA (ptxas may
/// contract differently in two kernels). Shapes with K split into three blocks and into one.
fn fused_norm_is_the_norm_launch_then_the_gemv(run: RunFused<'_>, sms_list: &[u32], exact: bool) {
    use speckv::plan::GemvVersion;
    let norm_emu = speckv::backend::emulate::Emulator::new(256);
    let mut split = false;
    for (s, &(out, inp)) in [(33usize, 512usize), (70, 1536)].iter().enumerate() {
        let w = weights(out, inp, 900 + s as u64);
        let x: Vec<f32> = common::normal_logits(inp, 3.0, 901 + s as u64);
        let gains: Vec<f32> = (0..inp).map(|i| 0.5 + (i % 17) as f32 / 16.0).collect();
        let eps = 1e-6;
        let (_, xn) = norm_emu.rms_norm(&x, None, &gains, eps).unwrap();
        let zeros = vec![0f32; out];
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            for version in [GemvVersion::V3, GemvVersion::V4] {
                for &sms in sms_list {
                    let norm = speckv::plan::XRead::Norm;
                    let (lp, plan) =
                        speckv::plan::plan_fused(version, format, out, inp, 1, sms, norm, None)
                            .expect("v3 and v4 fuse the norm at M = 1");
                    assert!(lp.entry.ends_with("_norm"), "{}", lp.entry);
                    split |= plan.ksplits > 1;
                    let label = format!("{} {out}x{inp} sms {sms} {}", format.name(), lp.entry);
                    let unfused =
                        emulator_fused(&q, &xn, &zeros, 1, version, gemv::Fusion::NONE, sms)
                            .unwrap();
                    let fusion = gemv::Fusion {
                        norm: Some((gains.as_slice(), eps)),
                        ..gemv::Fusion::NONE
                    };
                    let fused = run(&q, &x, &zeros, 1, version, fusion, sms).unwrap();
                    assert_fused_is_unfused(&fused, &unfused, exact, &label);
                }
            }
        }
    }
    assert!(split || !exact, "some plan splits K");
}

/// A fused launch against the unfused ones: bit for bit (`exact`, the emulator), or within 1e-5
/// of the output's scale (CUDA, where ptxas may contract the two kernels differently).
fn assert_fused_is_unfused(fused: &[f32], unfused: &[f32], exact: bool, label: &str) {
    if exact {
        assert_eq!(fused, unfused, "{label}");
        return;
    }
    let scale = unfused.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (a, b) in fused.iter().zip(unfused) {
        assert!((a - b).abs() <= 1e-5 * scale, "{label}: {a} vs {b}");
    }
}

/// The CUDA backend as a fused run (matrix uploaded, its own SM count).
fn cuda_fused(c: &'static speckv::backend::cuda::CudaBackend) -> Box<FusedFn> {
    Box::new(move |q, x, y0, m, v, f, _sms| c.gemv_fused(&c.upload_matrix(q)?, x, y0, m, v, f))
}

#[test]
fn emulator_fused_norm_is_the_norm_launch_then_the_gemv() {
    fused_norm_is_the_norm_launch_then_the_gemv(&emulator_fused, &[1, 132], true);
}

#[test]
fn cuda_fused_norm_is_the_norm_launch_then_the_gemv() {
    let Some(c) = common::cuda() else { return };
    fused_norm_is_the_norm_launch_then_the_gemv(&*cuda_fused(c), &[c.sm_count()], false);
}

/// `GEMV_ACCUMULATE` adds the product into y (y + product, in that order) on every planned path —
/// v2 on CUDA cores and tensor cores, v3, v4 — with K split across blocks (the add after the
/// merge) and not.
fn accumulate_adds_the_product(run: RunFused<'_>, sms_list: &[u32]) {
    use speckv::plan::GemvVersion;
    use speckv_kernels::gemv::PathV2;
    let mut seen = (false, false, false, false);
    let cases = [
        (GemvVersion::V2, 1usize, 96usize),
        (GemvVersion::V2, 3, 96),
        (GemvVersion::V2, 3, 1536),
        (GemvVersion::V3, 1, 1536),
        (GemvVersion::V4, 1, 1536),
    ];
    for (c, &(version, m, inp)) in cases.iter().enumerate() {
        let out = 70;
        let w = weights(out, inp, 950 + c as u64);
        let x = common::normal_logits(m * inp, 1.0, 951 + c as u64);
        let y0 = common::normal_logits(m * out, 2.0, 952 + c as u64);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            for &sms in sms_list {
                let (lp, plan) = version.plan(format, out as u32, inp as u32, m as u32, sms);
                let label = format!("{} m {m} K {inp} sms {sms} {}", format.name(), lp.entry);
                match plan.path {
                    PathV2::Cores { .. } => seen.0 = true,
                    PathV2::Tensor { .. } => seen.1 = true,
                    PathV2::Stream | PathV2::Integer => seen.2 = true,
                }
                seen.3 |= plan.ksplits > 1;
                let zeros = vec![0f32; m * out];
                let product = run(&q, &x, &zeros, m, version, gemv::Fusion::NONE, sms).unwrap();
                let acc = gemv::Fusion {
                    accumulate: true,
                    ..gemv::Fusion::NONE
                };
                let added = run(&q, &x, &y0, m, version, acc, sms).unwrap();
                let want: Vec<f32> = y0.iter().zip(&product).map(|(a, b)| a + b).collect();
                assert_eq!(added, want, "{label}");
            }
        }
    }
    assert!(seen.0 && seen.1 && seen.2, "every path: {seen:?}");
    assert!(seen.3 || sms_list.len() == 1, "K split somewhere: {seen:?}");
}

#[test]
fn emulator_accumulate_adds_the_product() {
    accumulate_adds_the_product(&emulator_fused, &[1, 132]);
}

#[test]
fn cuda_accumulate_adds_the_product() {
    let Some(c) = common::cuda() else { return };
    accumulate_adds_the_product(&*cuda_fused(c), &[c.sm_count()]);
}

/// A norm fused where the plan has no such prologue, gains of the wrong length and a bad eps are
/// typed errors, not a silently unnormalised product.
#[test]
fn a_fused_norm_is_refused_where_it_cannot_run() {
    use speckv::plan::GemvVersion;
    let (out, inp) = (40usize, 512usize);
    let q = QMatrix::quantize(&weights(out, inp, 990), out, inp, Format::Int8, false).unwrap();
    let gains = vec![1f32; inp];
    let norm = |g: &'static [f32], eps: f32| gemv::Fusion {
        norm: Some((g, eps)),
        ..gemv::Fusion::NONE
    };
    let g: &'static [f32] = Box::leak(gains.into_boxed_slice());
    let x2 = common::normal_logits(2 * inp, 1.0, 991);
    let x1 = &x2[..inp];
    let y = |m: usize| vec![0f32; m * out];
    for (what, r) in [
        (
            "v2 at M = 1",
            emulator_fused(&q, x1, &y(1), 1, GemvVersion::V2, norm(g, 1e-6), 7),
        ),
        (
            "v4 at M = 2",
            emulator_fused(&q, &x2, &y(2), 2, GemvVersion::V4, norm(g, 1e-6), 7),
        ),
        (
            "short gains",
            emulator_fused(&q, x1, &y(1), 1, GemvVersion::V4, norm(&g[1..], 1e-6), 7),
        ),
        (
            "NaN eps",
            emulator_fused(&q, x1, &y(1), 1, GemvVersion::V4, norm(g, f32::NAN), 7),
        ),
        (
            "y too short",
            emulator_fused(&q, x1, &y(0), 1, GemvVersion::V4, gemv::Fusion::NONE, 7),
        ),
    ] {
        assert!(r.is_err(), "{what}: {r:?}");
    }
    assert!(matches!(
        emulator_fused(&q, x1, &y(1), 1, GemvVersion::V2, norm(g, 1e-6), 7),
        Err(speckv::Error::Unsupported(_))
    ));
    assert!(emulator_fused(&q, x1, &y(1), 1, GemvVersion::V4, norm(g, 1e-6), 7).is_ok());
}

/// The gate fused into v3 / v4 (`_silu` entries) is `silu_mul_f32` followed by the plain GEMV, bit
/// for bit on the emulator (the same `silu_times`), within rounding on CUDA; added into y as the
/// down projection does; a gate / up row of the wrong width and a gate with a norm are refused.
fn fused_gate_is_silu_mul_then_the_gemv(run: RunFused<'_>, sms_list: &[u32], exact: bool) {
    use speckv::plan::GemvVersion;
    let emu = speckv::backend::emulate::Emulator::new(64);
    for (s, &(out, inp)) in [(33usize, 512usize), (70, 1536)].iter().enumerate() {
        let w = weights(out, inp, 930 + s as u64);
        let gu = common::normal_logits(2 * inp, 2.0, 931 + s as u64);
        let ffn = emu.silu_mul(&gu, inp).unwrap();
        let y0 = common::normal_logits(out, 1.0, 932 + s as u64);
        for format in Format::ALL {
            let q = QMatrix::quantize(&w, out, inp, format, false).unwrap();
            for version in [GemvVersion::V3, GemvVersion::V4] {
                for &sms in sms_list {
                    let label = format!("{} {out}x{inp} sms {sms} {version:?}", format.name());
                    let acc = gemv::Fusion {
                        accumulate: true,
                        ..gemv::Fusion::NONE
                    };
                    let unfused = emulator_fused(&q, &ffn, &y0, 1, version, acc, sms).unwrap();
                    let gate = gemv::Fusion { silu: true, ..acc };
                    let fused = run(&q, &gu, &y0, 1, version, gate, sms).unwrap();
                    assert_fused_is_unfused(&fused, &unfused, exact, &label);
                }
            }
            let gate = gemv::Fusion {
                silu: true,
                ..gemv::Fusion::NONE
            };
            let sms = sms_list[0];
            let zeros = vec![0f32; out];
            assert!(run(&q, &gu[..inp], &zeros, 1, GemvVersion::V4, gate, sms).is_err());
            let g = vec![1f32; inp];
            let both = gemv::Fusion {
                norm: Some((g.as_slice(), 1e-6)),
                ..gate
            };
            assert!(run(&q, &gu, &zeros, 1, GemvVersion::V4, both, sms).is_err());
            assert!(run(&q, &gu, &zeros, 1, GemvVersion::V2, gate, sms).is_err());
        }
    }
}

#[test]
fn emulator_fused_gate_is_silu_mul_then_the_gemv() {
    fused_gate_is_silu_mul_then_the_gemv(&emulator_fused, &[1, 132], true);
}

#[test]
fn cuda_fused_gate_is_silu_mul_then_the_gemv() {
    let Some(c) = common::cuda() else { return };
    fused_gate_is_silu_mul_then_the_gemv(&*cuda_fused(c), &[c.sm_count()], false);
}

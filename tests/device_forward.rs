//! The device forward pass (the launch program the GPU runs: `embed`, `rms_norm`, v2 GEMV,
//! `qkv_rope`, `attention`, `silu_mul`, LM head) on the emulator, against the CPU forward pass on
//! tiny llama and qwen2 models written as GGUF, in every speckv regime: logits within a stated
//! tolerance, and the same greedy tokens.

mod common;

use candle_core::quantized::gguf_file::Value;
use speckv::backend::cpu::CpuBackend;
use speckv::backend::emulate::Emulator;
use speckv::model::device::{program, Act, EmulatedForward, Fuse, Lin, Norm, Op};
use speckv::model::{BatchPass, CpuPass, KvCache, Model, Pass};
use speckv::stats::{Accumulate, Logits, LogitsData, StatsOptions};
use speckv::verify::{DraftDist, VerifyBatch, VerifyOutput, VerifyStep};
use speckv::weights::quant::Format;
use speckv::weights::Regime;
use speckv::FeatureAccum;

fn tmp(name: &str) -> std::path::PathBuf {
    common::tmp("device-forward", name)
}

/// The tiny llama model as qwen2: its metadata under `qwen2.`, q/k/v biases added.
fn qwen2_spec(seed: u64) -> common::tiny::Spec {
    use common::tiny::*;
    let mut s = spec(seed);
    let md = std::mem::take(&mut s.metadata);
    for (k, v) in md {
        let k = k.replacen("llama.", "qwen2.", 1);
        s.metadata.insert(k, v);
    }
    s.metadata
        .insert("general.architecture".into(), Value::String("qwen2".into()));
    let kv = KV_HEADS * HIDDEN / HEADS;
    for l in 0..LAYERS {
        for (n, w, k) in [("q", HIDDEN, 1), ("k", kv, 2), ("v", kv, 3)] {
            s.tensors.insert(
                format!("blk.{l}.attn_{n}.bias"),
                (
                    vec![w],
                    common::normal_logits(w, 0.3, seed * 100 + l as u64 * 10 + k),
                ),
            );
        }
    }
    s
}

fn model(arch: &str, format: Format) -> Model {
    let spec = if arch == "qwen2" {
        qwen2_spec(3)
    } else {
        common::tiny::spec(3)
    };
    let p = tmp(&format!("{arch}.gguf"));
    common::tiny::write(&spec, &p);
    Model::load(&p, format).unwrap()
}

/// The prompt: 21 tokens, so the pass runs a chunk of 16 and one of 5.
fn prompt() -> Vec<u32> {
    (0..21u32).map(|i| (i * 97 + 13) % 512).collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Max |device − CPU| over the logits, and the logits' scale (max |CPU|).
fn gap(dev: &[f32], cpu: &[f32]) -> (f32, f32) {
    let d = dev
        .iter()
        .zip(cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (d, cpu.iter().map(|v| v.abs()).fold(0f32, f32::max))
}

/// Max |device − CPU| logit over the logit scale allowed per regime: the CPU's products differ from
/// the GPU's (the tensor-core path rounds x to f16 for M ≥ 2; the CPU's INT8 and NF4 products
/// quantise activations to 8 bits). Measured on the tiny models (`--nocapture` prints it): FP16
/// 2.7e-4 / 3.5e-4, INT8 6.0e-3 / 6.6e-3, NF4 9.8e-3 / 1.2e-2 (llama / qwen2); the bounds are
/// about twice the largest.
fn tolerance(format: Format) -> f32 {
    match format {
        Format::Fp16 => 1e-3,
        Format::Int8 => 1.5e-2,
        Format::Nf4 => 2.5e-2,
    }
}

#[test]
fn device_pass_matches_the_cpu_pass_in_every_regime() {
    for arch in ["llama", "qwen2"] {
        for format in [Format::Fp16, Format::Int8, Format::Nf4] {
            let m = model(arch, format);
            let tokens = prompt();
            let mut cache = KvCache::new(&m.cfg);
            let cpu = m.forward(&tokens, &mut cache, tokens.len()).unwrap();
            let mut dev = EmulatedForward::new(&m, Emulator::new(128), 132, 64).unwrap();
            let got = dev.forward(&tokens, tokens.len()).unwrap();
            assert_eq!(got.len(), cpu.len());
            let (d, scale) = gap(&got, &cpu);
            let tol = tolerance(format) * scale;
            eprintln!("{arch} {format:?}: max |device − cpu| = {d:.2e} (logit scale {scale:.2})");
            assert!(d <= tol, "{arch} {format:?}: {d} > {tol}");

            // Greedy decoding, one token at a time on both: the same tokens while the CPU's top
            // two are further apart than the measured gap.
            let (mut t_cpu, mut t_dev) = (
                argmax(&cpu[cpu.len() - m.cfg.vocab..]),
                argmax(&got[got.len() - m.cfg.vocab..]),
            );
            for step in 0..6 {
                assert_eq!(t_dev, t_cpu, "{arch} {format:?}: step {step}");
                let c = m.forward(&[t_cpu], &mut cache, 1).unwrap();
                let g = dev.forward(&[t_dev], 1).unwrap();
                let (d, scale) = gap(&g, &c);
                assert!(
                    d <= tolerance(format) * scale,
                    "{arch} {format:?} step {step}: {d}"
                );
                t_cpu = argmax(&c);
                t_dev = argmax(&g);
            }
            assert_eq!(dev.len(), tokens.len() + 6);
        }
    }
}

/// Token by token (M = 1 throughout, so every GEMV is v3 for FP16 and v4 for INT8 and NF4), the
/// device pass computes what the CPU pass computes in every regime: v4's integer products on 8-bit
/// x are the CPU's, so INT8 and NF4 stay as close as FP16 (`--nocapture` prints the gaps; with
/// f32 x at M = 1, as v3 computes INT8 and NF4, the gap was the 8-bit quantisation's).
#[test]
fn decode_steps_match_the_cpu_as_closely_in_every_regime() {
    for arch in ["llama", "qwen2"] {
        for format in [Format::Fp16, Format::Int8, Format::Nf4] {
            let m = model(arch, format);
            let tokens = prompt();
            let mut cache = KvCache::new(&m.cfg);
            let mut dev = EmulatedForward::new(&m, Emulator::new(128), 132, 64).unwrap();
            let mut worst = 0f32;
            for &t in &tokens[..8] {
                let c = m.forward(&[t], &mut cache, 1).unwrap();
                let g = dev.forward(&[t], 1).unwrap();
                let (d, scale) = gap(&g, &c);
                worst = worst.max(d / scale);
            }
            eprintln!("{arch} {format:?}, M = 1: max |device − cpu| / logit scale = {worst:.2e}");
            assert!(worst <= 1e-3, "{arch} {format:?}: {worst:.2e}");
        }
    }
}

#[test]
fn rollback_then_redo_gives_the_same_logits() {
    let m = model("qwen2", Format::Fp16);
    let mut dev = EmulatedForward::new(&m, Emulator::new(64), 132, 40).unwrap();
    let tokens = prompt();
    dev.forward(&tokens[..10], 1).unwrap();
    let first = dev.forward(&tokens[10..14], 4).unwrap();
    // Reject the last three (a verification that accepted one of four), then redo them.
    dev.truncate(11);
    let again = dev.forward(&tokens[11..14], 3).unwrap();
    assert_eq!(again, first[m.cfg.vocab..].to_vec());
}

#[test]
fn the_program_is_the_layers_in_order() {
    let p = program(&[true, false, true], true, Fuse::NONE);
    // Embed, 9 launches per active layer, the final norm and the LM head.
    assert_eq!(p.len(), 1 + 2 * 9 + 2);
    assert_eq!(p[0], Op::Embed);
    assert_eq!(
        p[1],
        Op::RmsNorm {
            norm: Norm::Attn(0)
        }
    );
    assert_eq!(
        p[5],
        Op::Gemv {
            w: Lin::O(0),
            x: Act::Att,
            y: Act::X,
            accumulate: true
        },
        "the attention output adds itself into the residual stream"
    );
    assert_eq!(
        p[10],
        Op::RmsNorm {
            norm: Norm::Attn(2)
        },
        "the skipped layer runs nothing"
    );
    assert_eq!(
        p[p.len() - 1],
        Op::Gemv {
            w: Lin::LmHead,
            x: Act::Xn,
            y: Act::Logits,
            accumulate: false
        }
    );
    assert_eq!(
        program(&[true], false, Fuse::NONE).len(),
        10,
        "no LM head without logits"
    );
    // Norms fused: each inside the GEMV after it — two launches fewer a layer, one fewer at the end.
    let both = Fuse {
        norm: true,
        silu: true,
    };
    let f = program(
        &[true, false, true],
        true,
        Fuse {
            silu: false,
            ..both
        },
    );
    assert_eq!(f.len(), 1 + 2 * 7 + 1);
    assert_eq!(
        f[1],
        Op::NormGemv {
            norm: Norm::Attn(0),
            w: Lin::Qkv(0),
            y: Act::Qkv
        }
    );
    assert_eq!(
        f[f.len() - 1],
        Op::NormGemv {
            norm: Norm::Out,
            w: Lin::LmHead,
            y: Act::Logits
        }
    );
    assert!(!f.iter().any(|op| matches!(op, Op::RmsNorm { .. })));
    assert_eq!(
        f.iter()
            .filter(|op| !matches!(op, Op::NormGemv { .. }))
            .count(),
        p.iter()
            .filter(|op| !matches!(op, Op::RmsNorm { .. }))
            .count()
            - 5,
        "the fused program is the unfused one with each norm and its GEMV as one launch"
    );
    // And the gate: silu_mul inside the down projection's read, which still adds into X.
    let g = program(&[true, false, true], true, both);
    assert_eq!(g.len(), 1 + 2 * 6 + 1);
    assert!(!g
        .iter()
        .any(|op| matches!(op, Op::SiluMul | Op::RmsNorm { .. })));
    assert_eq!(
        g[6],
        Op::SiluGemv {
            w: Lin::Down(0),
            y: Act::X,
            accumulate: true
        }
    );
    assert_eq!(g[6].gemv().map(|o| (o.x, o.silu)), Some((Act::Gu, true)));
}

/// One-row steps run the fused program (norms and gates inside the GEMVs), and its logits are the
/// unfused program's bit for bit when the norm launch has the fused kernels' block size (256,
/// CUDA's): the prompt runs unfused in both (16 and 5 rows), every decode step after it fused in
/// one.
#[test]
fn fused_decode_steps_are_the_unfused_bit_for_bit() {
    use speckv::model::device::Shape;
    for arch in ["llama", "qwen2"] {
        for format in [Format::Fp16, Format::Int8, Format::Nf4] {
            let m = model(arch, format);
            let shape = Shape::of(&m.cfg).unwrap();
            let all = Fuse {
                norm: true,
                silu: true,
            };
            assert_eq!(Fuse::for_step(&shape, 1), all, "{arch}");
            assert_eq!(Fuse::for_step(&shape, 2), Fuse::NONE, "{arch}");
            let mut fused = EmulatedForward::new(&m, Emulator::new(256), 132, 64).unwrap();
            let mut plain = EmulatedForward::new(&m, Emulator::new(256), 132, 64).unwrap();
            plain.set_fusion(Fuse::NONE);
            // The executors run the fused program at one row only, and not when told not to.
            let layers = vec![true; m.cfg.layers];
            for rows in 1..=16 {
                for logits in [false, true] {
                    let can = if rows == 1 { all } else { Fuse::NONE };
                    let want = program(&layers, logits, can);
                    assert_eq!(fused.program_for(rows, logits), &want[..], "{arch} {rows}");
                    let unfused = program(&layers, logits, Fuse::NONE);
                    assert_eq!(plain.program_for(rows, logits), &unfused[..]);
                }
            }
            assert!(fused.program_for(1, true).len() < plain.program_for(1, true).len());
            let tokens = prompt();
            let a = fused.forward(&tokens, 1).unwrap();
            let b = plain.forward(&tokens, 1).unwrap();
            assert_eq!(a, b, "{arch} {format:?}: the prompt");
            let mut t = argmax(&a);
            for step in 0..4 {
                let a = fused.forward(&[t], 1).unwrap();
                let b = plain.forward(&[t], 1).unwrap();
                assert_eq!(a, b, "{arch} {format:?}: decode step {step}");
                t = argmax(&a);
            }
        }
    }
}

#[test]
fn the_gguf_regime_and_bad_capacities_are_refused() {
    let p = tmp("plain.gguf");
    common::tiny::write(&common::tiny::spec(1), &p);
    let g = Model::load(&p, Regime::Gguf).unwrap();
    assert!(matches!(
        EmulatedForward::new(&g, Emulator::new(64), 132, 16),
        Err(speckv::Error::Unsupported(_))
    ));
    let m = Model::load(&p, Format::Fp16).unwrap();
    assert!(EmulatedForward::new(&m, Emulator::new(64), 132, 0).is_err());
    assert!(EmulatedForward::new(&m, Emulator::new(64), 132, 100_000).is_err());
    let mut dev = EmulatedForward::new(&m, Emulator::new(64), 132, 8).unwrap();
    assert!(dev.forward(&[1; 9], 1).is_err(), "past the cache");
    assert!(dev.forward(&[600], 1).is_err(), "past the vocabulary");
    assert!(dev.forward(&[1, 2], 3).is_err(), "keep more than given");
    assert_eq!(dev.len(), 0, "a refused call leaves the cache as it was");
}

#[test]
fn decode_loops_on_the_device_program_are_lossless() {
    use speckv::controller::records::Compression;
    use speckv::decode::{plain_on, speculative_on, GenConfig, Policy};
    let target = model("qwen2", Format::Fp16);
    let p = tmp("draft.gguf");
    let mut spec = qwen2_spec(4);
    // A draft that agrees with the target often: the target's weights, one layer fewer applied.
    spec.tensors = qwen2_spec(3).tensors;
    common::tiny::write(&spec, &p);
    let draft = Model::load(&p, Format::Fp16).unwrap();
    let prompt = prompt();
    let cfg = GenConfig {
        max_tokens: 10,
        temperature: 0.0,
        seed: 0,
        gamma_max: 3,
        compression: Compression::Fp16,
        draft_catch_up: None,
    };
    let room = prompt.len() + 10 + 3 + 2;
    let emu = || Emulator::new(128);
    let mut t = EmulatedForward::new(&target, emu(), 132, room).unwrap();
    let plain = plain_on(&mut t, &prompt, &[], &cfg, &mut |_| {}).unwrap();
    let mut t = EmulatedForward::new(&target, emu(), 132, room).unwrap();
    let mut d = EmulatedForward::new(&draft, emu(), 132, room).unwrap();
    d.set_active_layers(vec![true, false]).unwrap();
    let spec_out = speculative_on(
        &mut t,
        &mut d,
        &prompt,
        &[],
        &Policy::Fixed(3),
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        spec_out.tokens, plain.tokens,
        "greedy speculative decoding is lossless"
    );
    assert!(
        spec_out.steps < plain.tokens.len(),
        "the draft was accepted at least once"
    );
    // `auto`, its stopping rule deciding in the draft's statistics kernel: lossless too.
    let mut t = EmulatedForward::new(&target, emu(), 132, room).unwrap();
    let mut d = EmulatedForward::new(&draft, emu(), 132, room).unwrap();
    d.set_active_layers(vec![true, false]).unwrap();
    let mut drafted = 0;
    let auto = speculative_on(
        &mut t,
        &mut d,
        &prompt,
        &[],
        &Policy::Auto(Box::new(speckv::decode::Auto::shipped().unwrap())),
        &cfg,
        &mut |s| drafted += s.gamma,
    )
    .unwrap();
    assert_eq!(auto.tokens, plain.tokens, "auto is lossless");
    assert!(drafted > 0, "auto drafted");
    // And the CPU pass decodes the same tokens.
    let cpu = plain_on(
        &mut CpuPass::new(&target, None),
        &prompt,
        &[],
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(cpu.tokens, plain.tokens);
}

/// The same program on a CUDA device (skipped without one): logits against the CPU pass within
/// the emulator test's tolerance, and the CUDA and emulated passes within float rounding of each
/// other (their kernels are the same source; only `ex2.approx` and FMA contraction differ).
#[test]
fn cuda_forward_matches_the_cpu_pass() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    for arch in ["llama", "qwen2"] {
        for format in [Format::Fp16, Format::Int8, Format::Nf4] {
            let m = model(arch, format);
            let tokens = prompt();
            let mut cache = KvCache::new(&m.cfg);
            let cpu = m.forward(&tokens, &mut cache, tokens.len()).unwrap();
            let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 64).unwrap();
            let mut dev = CudaForward::new(cuda, &w, 64).unwrap();
            let got = dev.forward(&tokens, tokens.len()).unwrap();
            let (d, scale) = gap(&got, &cpu);
            let tol = tolerance(format) * scale;
            eprintln!("cuda {arch} {format:?}: max |device − cpu| = {d:.2e}");
            assert!(d <= tol, "{arch} {format:?}: {d} > {tol}");
            let mut emu =
                EmulatedForward::new(&m, Emulator::new(128).gpu_math(1), cuda.sm_count(), 64)
                    .unwrap();
            let e = emu.forward(&tokens, tokens.len()).unwrap();
            let (d2, _) = gap(&got, &e);
            assert!(
                d2 <= 1e-3 * scale,
                "{arch} {format:?}: cuda vs emulator {d2}"
            );
            // Rollback and one more token on both.
            dev.truncate(15);
            cache.truncate(15);
            let g = dev.forward(&[7], 1).unwrap();
            let c = m.forward(&[7], &mut cache, 1).unwrap();
            assert!(gap(&g, &c).0 <= tol);
        }
    }
}

/// A draft step and a verification step of a pass whose logits stay where they are computed
/// (`run_stats`, `run_verify`) against the host's statistics and verification of the same rows,
/// read back from a twin pass: the row itself bit-identical, the argmax, the sampled token and
/// every verdict exact, entropy and confidence within float rounding. Greedy and sampled.
fn resident_steps_match_the_host(a: &mut dyn Pass, b: &mut dyn Pass, label: &str) {
    let cpu = CpuBackend::new();
    let vocab = a.cfg().vocab;
    let head = prompt();
    a.run(&head, 1).unwrap();
    b.run(&head, 1).unwrap();
    let at = a.len();
    for temperature in [0.0f32, 0.8] {
        let ctx = format!("{label}, T = {temperature}");
        // A draft step from a non-empty accumulator (the step's second draft).
        let opts = StatsOptions {
            temperature,
            sample: temperature > 0.0,
            seed: 11,
            step: 5,
            accumulate: Accumulate::Add,
        };
        let start = FeatureAccum {
            count: 1,
            flags: 0,
            entropy_sum: 2.5,
            entropy_max: 2.5,
            confidence_sum: 0.25,
            confidence_min: 0.25,
        };
        let row = a.run(&[9, 300], 1).unwrap().to_vec();
        let mut want_acc = [start];
        let want = cpu
            .softmax_stats(
                &Logits::dense(LogitsData::F32(&row), vocab).unwrap(),
                &opts,
                Some(&mut want_acc),
            )
            .unwrap()[0];
        let mut acc = [start];
        let (got, got_row) = b.run_stats(&[9, 300], &opts, &mut acc, true, None).unwrap();
        assert_eq!(got_row.unwrap(), &row[..], "{ctx}: the row");
        assert_eq!(got.argmax, want.argmax, "{ctx}: argmax");
        assert_eq!(got.sampled, want.sampled, "{ctx}: sampled token");
        assert_eq!(got.flags, 0, "{ctx}");
        for (g, w, what) in [
            (got.entropy, want.entropy, "entropy"),
            (got.confidence, want.confidence, "confidence"),
            (acc[0].entropy_sum, want_acc[0].entropy_sum, "entropy sum"),
            (
                acc[0].confidence_min,
                want_acc[0].confidence_min,
                "min conf",
            ),
        ] {
            assert!(
                common::close(g as f64, w as f64, 1e-5, 1e-6),
                "{ctx}: {what} {g} vs {w}"
            );
        }
        assert_eq!(acc[0].count, 2, "{ctx}: accumulated");
        let (_, none) = b.run_stats(&[4], &opts, &mut acc, false, None).unwrap();
        assert!(none.is_none(), "{ctx}: no row unless wanted");
        a.truncate(at);
        b.truncate(at);
        // Plain decoding's step chooses the same token.
        let plain = StatsOptions {
            accumulate: Accumulate::No,
            ..opts
        };
        let want_tok = if temperature == 0.0 {
            want.argmax
        } else {
            want.sampled
        };
        assert_eq!(
            b.next_token(&[9, 300], &plain).unwrap() as i32,
            want_tok,
            "{ctx}: next token"
        );
        b.truncate(at);

        // Verification of three drafts: the first the target's own choice, so some are accepted.
        let pending = 21u32;
        let p0 = a.run(&[pending], 1).unwrap().to_vec();
        a.truncate(at);
        let x0 = want_token(&p0);
        let drafts = [x0 as i32, 77, 400];
        let tokens = [pending, x0, 77, 400];
        let p = a.run(&tokens, 4).unwrap().to_vec();
        // Draft rows: any distributions; the target's shifted ones keep q close to p.
        let q: Vec<f32> = p[vocab..].iter().map(|x| x * 0.9).collect();
        let step = VerifyStep {
            draft_tokens: &drafts,
            draft_rows: (temperature > 0.0).then_some(&q[..]),
            temperature,
            seed: 3,
            step: 8,
        };
        let mut want = VerifyOutput::new(1, 3);
        let temps = [temperature];
        let gammas = [3];
        let batch = VerifyBatch {
            target: LogitsData::F32(&p),
            target_stride: vocab,
            draft: DraftDist::Logits {
                data: LogitsData::F32(if temperature > 0.0 {
                    &q
                } else {
                    &p[..3 * vocab]
                }),
                temperature: &temps,
            },
            draft_stride: vocab,
            draft_tokens: &drafts,
            gammas: &gammas,
            target_temperature: &temps,
            batch: 1,
            gamma_max: 3,
            vocab,
            seed: 3,
            step: 8,
        };
        cpu.verify_into(&batch, &mut want).unwrap();
        let mut got = VerifyOutput::new(1, 1);
        b.run_verify(&tokens, &step, &mut got).unwrap();
        assert_eq!(got.accepted, want.accepted, "{ctx}: accepted");
        assert_eq!(got.emitted, want.emitted, "{ctx}: emitted");
        assert_eq!(got.counterfactual, want.counterfactual, "{ctx}");
        assert_eq!(got.flags, want.flags, "{ctx}");
        assert_eq!(got.emitted_count[0], got.accepted[0] + 1, "{ctx}");
        if temperature == 0.0 {
            assert!(
                got.accepted[0] >= 1,
                "{ctx}: the target's own token is accepted"
            );
        }
        assert_eq!(b.len(), at + 4, "{ctx}: the positions are in the cache");
        a.truncate(at);
        b.truncate(at);
    }
    // Misuse is an error, not a wrong verdict: more positions than drafts + 1, a sampled step
    // without the draft's rows.
    let mut out = VerifyOutput::new(1, 1);
    let bad = VerifyStep {
        draft_tokens: &[1],
        draft_rows: None,
        temperature: 0.0,
        seed: 0,
        step: 0,
    };
    assert!(b.run_verify(&[1, 2, 3], &bad, &mut out).is_err(), "{label}");
    let sampled = VerifyStep {
        temperature: 0.5,
        ..bad
    };
    assert!(
        b.run_verify(&[1, 2], &sampled, &mut out).is_err(),
        "{label}"
    );
    let bad_opts = StatsOptions {
        temperature: -1.0,
        sample: true,
        seed: 0,
        step: 0,
        accumulate: Accumulate::No,
    };
    let mut acc = [FeatureAccum::EMPTY];
    assert!(
        b.run_stats(&[1], &bad_opts, &mut acc, false, None).is_err(),
        "{label}"
    );
    assert!(b.next_token(&[1], &bad_opts).is_err(), "{label}");
    assert_eq!(
        b.len(),
        at,
        "{label}: a refused step leaves the cache as it was"
    );
}

fn want_token(row: &[f32]) -> u32 {
    argmax(row)
}

#[test]
fn draft_and_verify_steps_run_where_the_logits_are() {
    let m = model("qwen2", Format::Int8);
    let mut a = EmulatedForward::new(&m, Emulator::new(128), 132, 64).unwrap();
    let mut b = EmulatedForward::new(&m, Emulator::new(64), 132, 64).unwrap();
    resident_steps_match_the_host(&mut a, &mut b, "emulator");
    let mut a = CpuPass::new(&m, None);
    let mut b = CpuPass::new(&m, None);
    resident_steps_match_the_host(&mut a, &mut b, "cpu");
}

#[test]
fn cuda_draft_and_verify_steps_run_where_the_logits_are() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    let m = model("qwen2", Format::Int8);
    let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 64).unwrap();
    let mut a = CudaForward::new(cuda, &w, 64).unwrap();
    let mut b = CudaForward::new(cuda, &w, 64).unwrap();
    resident_steps_match_the_host(&mut a, &mut b, "cuda");
    // A step replayed from its captured graph computes what its launches do one by one: the same
    // kernels in the same order, so the same bits — also after a rollback, where the replayed
    // graph reads the new length from device memory.
    let mut graph = CudaForward::new(cuda, &w, 64).unwrap();
    let mut eager = CudaForward::new(cuda, &w, 64).unwrap();
    eager.set_graphs(false);
    let tokens = prompt();
    assert_eq!(
        graph.forward(&tokens, tokens.len()).unwrap(),
        eager.forward(&tokens, tokens.len()).unwrap()
    );
    for (cut, t) in [(10, 3u32), (15, 8), (12, 40)] {
        graph.truncate(cut);
        eager.truncate(cut);
        assert_eq!(
            graph.forward(&[t], 1).unwrap(),
            eager.forward(&[t], 1).unwrap(),
            "after a rollback to {cut}"
        );
    }
}

/// A batched decode state against one single-sequence state per sequence: three sequences stepped
/// together (five positions each, then one each after rolling two of them back to different
/// lengths) give each sequence the logits its own pass gives, within the FP16 tolerance (the batch's
/// GEMVs run at M ≥ 2, which rounds activations to f16), with the same argmax per row. Single-
/// sequence calls on a batched state, and uneven or overfull steps, are errors that leave it alone.
fn batch_matches_single_sequences<'a>(
    batch: &mut dyn BatchPass,
    single: &mut dyn FnMut() -> Box<dyn Pass + 'a>,
    label: &str,
) {
    let vocab = 512;
    let seqs = 3;
    let first: Vec<Vec<u32>> = (0..seqs as u32)
        .map(|b| (0..5).map(|i| (b * 131 + i * 17 + 3) % 512).collect())
        .collect();
    let flat: Vec<u32> = first.concat();
    let got = batch.step_batch(&flat).unwrap();
    assert_eq!(got.len(), 15 * vocab);
    // The same step's rows read back by index (any order, runs and single rows).
    let mut some = Vec::new();
    batch.logits_rows(&[14, 0, 1, 2, 7], &mut some).unwrap();
    for (k, r) in [14, 0, 1, 2, 7].into_iter().enumerate() {
        assert_eq!(
            some[k * vocab..(k + 1) * vocab],
            got[r * vocab..(r + 1) * vocab],
            "{label}: row {r}"
        );
    }
    assert!(batch.logits_rows(&[15], &mut some).is_err(), "{label}");
    // Statistics where the logits are, each row with its own temperature, seed, random step and
    // accumulate mode, against the CPU backend's statistics of the same rows: the same argmax and
    // draw, the same numbers within f32 rounding.
    let rows = [14usize, 0, 7];
    let modes = [Accumulate::Reset, Accumulate::Add, Accumulate::No];
    let opts: Vec<StatsOptions> = (0..3)
        .map(|k| StatsOptions {
            temperature: [0.0, 0.7, 1.3][k],
            sample: k > 0,
            seed: 11 + k as u64,
            step: 3 * k as u64,
            accumulate: modes[k],
        })
        .collect();
    let cpu = CpuBackend::new();
    let row = |r: usize| Logits::dense(LogitsData::F32(&got[r * vocab..(r + 1) * vocab]), vocab);
    let mut held = [FeatureAccum::EMPTY];
    let reset = StatsOptions {
        accumulate: Accumulate::Reset,
        ..opts[1]
    };
    cpu.softmax_stats(&row(3).unwrap(), &reset, Some(&mut held))
        .unwrap();
    let start = [FeatureAccum::EMPTY, held[0], FeatureAccum::EMPTY];
    let mut accs = start.to_vec();
    let mut stats = Vec::new();
    batch
        .rows_stats(&rows, &opts, &mut accs, &mut stats)
        .unwrap();
    assert_eq!(stats.len(), 3, "{label}");
    for k in 0..3 {
        let mut a = [start[k]];
        let want = cpu
            .softmax_stats(&row(rows[k]).unwrap(), &opts[k], Some(&mut a))
            .unwrap()[0];
        let (g, w) = (stats[k], want);
        assert_eq!(
            (g.argmax, g.sampled, g.flags),
            (w.argmax, w.sampled, w.flags),
            "{label} {k}"
        );
        for (what, x, y) in [
            ("entropy", g.entropy, w.entropy),
            ("confidence", g.confidence, w.confidence),
            ("lse", g.lse, w.lse),
            ("accumulated entropy", accs[k].entropy_sum, a[0].entropy_sum),
            (
                "least confidence",
                accs[k].confidence_min,
                a[0].confidence_min,
            ),
        ] {
            assert!(
                x == y || (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{label} {k} {what}: {x} vs {y}"
            );
        }
        assert_eq!(accs[k].count, a[0].count, "{label} {k}");
    }
    assert_eq!(
        accs[1].count, 2,
        "{label}: added to the accumulator it was given"
    );
    assert_eq!(accs[2].count, 0, "{label}: not accumulated");
    // One options and accumulator per row, rows the step left.
    assert!(
        batch
            .rows_stats(&rows[..2], &opts, &mut accs, &mut stats)
            .is_err(),
        "{label}"
    );
    let (o1, a1) = (&opts[..1], &mut accs[..1]);
    assert!(
        batch.rows_stats(&[15], o1, a1, &mut stats).is_err(),
        "{label}"
    );
    // The step verified where its logits are (3 sequences of γmax 4, γ_b 4, 0 and 2, greedy)
    // gives the verdict of the CPU backend's verification of the same rows.
    let drafts: Vec<i32> = (0..12).map(|i| (i * 37 % vocab) as i32).collect();
    let (gammas, temps) = ([4, 0, 2], [0.0f32; 3]);
    let mut v = VerifyBatch::resident(vocab, 4, &drafts, &gammas, &temps);
    (v.seed, v.step) = (9, 2);
    let mut out = VerifyOutput::new(3, 4);
    batch.verify_step(&v, &mut out).unwrap();
    let mut host = v;
    host.target = LogitsData::F32(&got);
    host.draft = DraftDist::Logits {
        data: LogitsData::F32(&got[..12 * vocab]),
        temperature: &temps,
    };
    let want = CpuBackend::new().verify(&host).unwrap();
    assert_eq!(out.accepted, want.accepted, "{label}");
    assert_eq!(out.emitted, want.emitted, "{label}");
    assert_eq!(out.counterfactual, want.counterfactual, "{label}");
    // Not the step's shape (γmax 3 over 15 rows), sampled without the draft's rows: refused.
    v.gamma_max = 3;
    assert!(batch.verify_step(&v, &mut out).is_err(), "{label}");
    v.gamma_max = 4;
    let hot = [0.8f32; 3];
    v.target_temperature = &hot;
    v.draft = DraftDist::Logits {
        data: LogitsData::F32(&[]),
        temperature: &hot,
    };
    assert!(batch.verify_step(&v, &mut out).is_err(), "{label}");
    let cut = [5usize, 2, 4];
    let next = [40u32, 41, 300];
    let mut want_first = Vec::new();
    let mut want_next = Vec::new();
    for b in 0..seqs {
        let mut p = single();
        want_first.push(p.run(&first[b], 5).unwrap().to_vec());
        p.truncate(cut[b]);
        want_next.push(p.run(&[next[b]], 1).unwrap().to_vec());
    }
    for (b, &len) in cut.iter().enumerate() {
        batch.truncate_seq(b, len).unwrap();
    }
    assert_eq!(batch.lens(), &cut[..], "{label}");
    let got_next = batch.step_batch(&next).unwrap();
    let tol = tolerance(Format::Fp16);
    for b in 0..seqs {
        for (what, g, w) in [
            (
                "first step",
                &got[b * 5 * vocab..(b + 1) * 5 * vocab],
                &want_first[b][..],
            ),
            (
                "after rollback",
                &got_next[b * vocab..(b + 1) * vocab],
                &want_next[b][..],
            ),
        ] {
            let (d, scale) = gap(g, w);
            assert!(
                d <= tol * scale,
                "{label} seq {b} {what}: {d} > {tol} × {scale}"
            );
            for (r, (gr, wr)) in g.chunks(vocab).zip(w.chunks(vocab)).enumerate() {
                assert_eq!(argmax(gr), argmax(wr), "{label} seq {b} {what} row {r}");
            }
        }
    }
    assert_eq!(batch.lens(), &[6, 3, 5][..]);
    // 4 tokens over 3 sequences; 6 each (18 rows, past one step); a sequence out of range.
    assert!(batch.step_batch(&[1, 2, 3, 4]).is_err(), "{label}");
    assert!(batch.step_batch(&[1; 18]).is_err(), "{label}");
    assert!(
        batch.step_batch(&[1, 2, 512]).is_err(),
        "{label}: token past the vocabulary"
    );
    assert!(batch.truncate_seq(3, 0).is_err(), "{label}");
    assert_eq!(
        batch.lens(),
        &[6, 3, 5][..],
        "{label}: refusals change nothing"
    );
    assert!(
        batch.run(&[1], 1).is_err(),
        "{label}: Pass calls on a batch"
    );
    // A step without the LM head advances every sequence and leaves no rows to read.
    batch.step_batch_resident(&[1, 2, 3], false).unwrap();
    assert_eq!(batch.lens(), &[7, 4, 6][..], "{label}");
    assert!(batch.logits_rows(&[0], &mut some).is_err(), "{label}");
}

#[test]
fn batched_sequences_step_as_each_alone() {
    let m = model("qwen2", Format::Fp16);
    let mut batch = EmulatedForward::new_batch(&m, Emulator::new(128), 132, 32, 3).unwrap();
    let mut single = || {
        Box::new(EmulatedForward::new(&m, Emulator::new(128), 132, 32).unwrap()) as Box<dyn Pass>
    };
    batch_matches_single_sequences(&mut batch, &mut single, "emulator");
    assert!(EmulatedForward::new_batch(&m, Emulator::new(128), 132, 32, 0).is_err());
    assert!(EmulatedForward::new_batch(&m, Emulator::new(128), 132, 32, 17).is_err());
}

/// The CPU's batched state (every sequence's rows in one product per weight matrix, attention per
/// sequence) against the CPU pass of one sequence.
#[test]
fn cpu_batched_sequences_step_as_each_alone() {
    let m = model("qwen2", Format::Fp16);
    let mut batch = CpuPass::new_batch(&m, None, 3).unwrap();
    let mut single = || Box::new(CpuPass::new(&m, None)) as Box<dyn Pass>;
    batch_matches_single_sequences(&mut batch, &mut single, "cpu");
    assert!(CpuPass::new_batch(&m, None, 0).is_err());
    assert!(CpuPass::new_batch(&m, None, 17).is_err());
}

#[test]
fn cuda_batched_sequences_step_as_each_alone() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    let m = model("qwen2", Format::Fp16);
    let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 64).unwrap();
    for graphs in [true, false] {
        let mut batch = CudaForward::new_batch(cuda, &w, 32, 3).unwrap();
        batch.set_graphs(graphs);
        let mut single = || Box::new(CudaForward::new(cuda, &w, 32).unwrap()) as Box<dyn Pass>;
        batch_matches_single_sequences(&mut batch, &mut single, &format!("cuda, graphs {graphs}"));
    }
}

/// A draft phase (`Pass::draft_run`: γ chosen up front; on CUDA enqueued at once, each token fed
/// from the previous pass's statistics on the device) against the same drafts made one
/// `run_stats` at a time on a twin pass: the same tokens, statistics, accumulator and rows, bit for
/// bit, and the same cache afterwards (the next step's logits equal). Greedy and sampled, fed one
/// token and two. Misuse is an error that leaves the cache as it was.
fn draft_phase_matches_stepwise(a: &mut dyn Pass, b: &mut dyn Pass, label: &str) {
    use speckv::model::DraftRun;
    let head = prompt();
    a.run(&head, 1).unwrap();
    b.run(&head, 1).unwrap();
    let at = a.len();
    for (temperature, feed) in [
        (0.0f32, vec![21u32]),
        (0.8, vec![5, 77]),
        (0.0, vec![9, 300]),
    ] {
        let ctx = format!("{label}, T = {temperature}, feed {feed:?}");
        let opts = StatsOptions {
            temperature,
            sample: temperature > 0.0,
            seed: 4,
            step: 10,
            accumulate: Accumulate::Reset,
        };
        let gamma = 4;
        let mut run = DraftRun::default();
        a.draft_run(&feed, gamma, &opts, temperature > 0.0, &mut run)
            .unwrap();
        // The twin, one pass at a time.
        let mut acc = [FeatureAccum::EMPTY];
        let mut input = feed.clone();
        let mut rows = Vec::new();
        for j in 0..gamma {
            let o = StatsOptions {
                step: 10 + j as u64,
                accumulate: if j == 0 {
                    Accumulate::Reset
                } else {
                    Accumulate::Add
                },
                ..opts
            };
            let (st, row) = b.run_stats(&input, &o, &mut acc, true, None).unwrap();
            rows.extend_from_slice(row.unwrap());
            let x = if temperature == 0.0 {
                st.argmax
            } else {
                st.sampled
            };
            assert_eq!(run.tokens[j] as i32, x, "{ctx}: token {j}");
            assert_eq!(run.stats[j], st, "{ctx}: statistics {j}");
            input = vec![x as u32];
        }
        assert_eq!(run.accum, acc[0], "{ctx}: accumulator");
        if temperature > 0.0 {
            assert_eq!(run.rows, rows, "{ctx}: rows");
        } else {
            assert!(run.rows.is_empty(), "{ctx}: no rows unless asked");
        }
        let len = at + feed.len() + gamma - 1;
        assert_eq!(
            (a.len(), b.len()),
            (len, len),
            "{ctx}: the last draft is not fed"
        );
        let last = *run.tokens.last().unwrap();
        assert_eq!(
            a.run(&[last], 1).unwrap().to_vec(),
            b.run(&[last], 1).unwrap().to_vec(),
            "{ctx}: the caches agree"
        );
        a.truncate(at);
        b.truncate(at);
    }
    let mut run = DraftRun::default();
    let greedy = StatsOptions {
        temperature: 0.0,
        sample: false,
        seed: 0,
        step: 0,
        accumulate: Accumulate::Reset,
    };
    let unsampled = StatsOptions {
        temperature: 0.5,
        ..greedy
    };
    for (feed, gamma, o) in [
        (vec![1u32], 0usize, greedy),
        (vec![1], 16, greedy),
        (vec![], 2, greedy),
        (vec![1], 2, unsampled),
        (vec![512], 2, greedy),
    ] {
        assert!(
            a.draft_run(&feed, gamma, &o, false, &mut run).is_err(),
            "{label}: {feed:?} γ {gamma}"
        );
    }
    assert_eq!(a.len(), at, "{label}: refusals leave the cache alone");
}

#[test]
fn draft_phases_equal_their_drafts_one_by_one() {
    let m = model("qwen2", Format::Nf4);
    let mut a = EmulatedForward::new(&m, Emulator::new(128), 132, 64).unwrap();
    let mut b = EmulatedForward::new(&m, Emulator::new(64), 132, 64).unwrap();
    draft_phase_matches_stepwise(&mut a, &mut b, "emulator");
    let mut a = CpuPass::new(&m, None);
    let mut b = CpuPass::new(&m, None);
    draft_phase_matches_stepwise(&mut a, &mut b, "cpu");
}

#[test]
fn cuda_draft_phases_equal_their_drafts_one_by_one() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    let m = model("qwen2", Format::Nf4);
    let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 64).unwrap();
    for graphs in [true, false] {
        let mut a = CudaForward::new(cuda, &w, 64).unwrap();
        let mut b = CudaForward::new(cuda, &w, 64).unwrap();
        a.set_graphs(graphs);
        draft_phase_matches_stepwise(&mut a, &mut b, &format!("cuda, graphs {graphs}"));
    }
}

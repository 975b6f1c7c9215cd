//! `auto`'s per-token stopping decided by the pass that computed the draft's statistics
//! (`Pass::run_stats` with a `DraftStop`): on a device pass that is `softmax_stats_v2`'s
//! `STATS_STOP` epilogue on the logits the forward pass left on the device, on the CPU pass the same
//! f32 rule on the host. Every decision and state equals the host rule's (`StopRule::decide`) on the
//! statistics the step returned, bit for bit; a stopped sequence stays put; misuse is an error that
//! leaves the cache as it was. The emulator's pass here, CUDA's when a device is present.

mod common;

use speckv::backend::emulate::Emulator;
use speckv::controller::hazard::{HazardModel, StopRule};
use speckv::controller::records::Compression;
use speckv::model::device::EmulatedForward;
use speckv::model::{CpuPass, DraftStop, Model, Pass};
use speckv::weights::quant::Format;
use speckv::{Accumulate, FeatureAccum, StatsOptions};
use speckv_kernels::params::{StepCosts, StopState, STOP_TIMES};

fn model(format: Format) -> Model {
    let p = common::tmp("draft-stop", &format!("llama-{format:?}.gguf"));
    common::tiny::write(&common::tiny::spec(5), &p);
    Model::load(&p, format).unwrap()
}

fn opts(j: usize, temperature: f32) -> StatsOptions {
    StatsOptions {
        temperature,
        sample: temperature > 0.0,
        seed: 9,
        step: j as u64,
        accumulate: if j == 0 {
            Accumulate::Reset
        } else {
            Accumulate::Add
        },
    }
}

/// A draft pass costing `draft`, verifying γ drafts `1 + per · γ`.
fn costs(draft: f32, per: f32) -> StepCosts {
    let mut verify = [0f32; STOP_TIMES];
    for (g, v) in verify.iter_mut().enumerate() {
        *v = 1.0 + per * g as f32;
    }
    StepCosts { draft, verify }
}

/// Drafts until the pass's rule stops, under several costs and calibrations, checking each
/// decision against the host rule; returns the γ of every step.
fn decisions_match_the_host_rule(b: &mut dyn Pass, label: &str) -> Vec<u32> {
    let w = HazardModel::default_model().unwrap().weights();
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 53 + 7) % 512).collect();
    b.run(&prompt, 1).unwrap();
    let at = b.len();
    let comp = Compression::Int8;
    let gmax = 6;
    let mut gammas = Vec::new();
    // Cheap drafts (draft on), dear verification (discard the first), in between; as trained and
    // calibrated; greedy and sampled.
    for (i, c) in [costs(0.01, 0.01), costs(0.01, 5.0), costs(0.5, 0.3)]
        .iter()
        .enumerate()
    {
        for (odds, temperature) in [(1.0f32, 0.0f32), (1.7, 0.7), (0.5, 0.0)] {
            let ctx = format!("{label}, costs {i}, odds {odds}, T {temperature}");
            let mut on_pass = StopRule::calibrated(odds);
            let mut on_host = StopRule::calibrated(odds);
            let mut acc = [FeatureAccum::EMPTY];
            let mut feed = vec![prompt[0]];
            let mut kept = 0;
            for j in 0..gmax {
                let o = opts(j, temperature);
                let mut ds = on_pass.draft_stop(&w, comp, c, gmax);
                let (st, _) = b
                    .run_stats(&feed, &o, &mut acc, false, Some(&mut ds))
                    .unwrap();
                assert_eq!(st.flags, 0, "{ctx}");
                let want = on_host.decide(&w, &acc[0], &st, comp, c, gmax);
                let got = on_pass.observe(&w, &acc[0], &st, comp, ds.state);
                assert_eq!(got, want, "{ctx}, draft {j}");
                assert_eq!(on_pass.state, on_host.state, "{ctx}, draft {j}");
                assert_eq!(acc[0].count as usize, j + 1, "{ctx}: pushed once");
                kept += got.keep as u32;
                if !got.more {
                    // A stopped sequence stays put: neither the accumulator nor the state moves.
                    let (before, state) = (acc[0], ds.state);
                    let mut again = ds;
                    b.run_stats(
                        &[1],
                        &opts(j + 1, temperature),
                        &mut acc,
                        false,
                        Some(&mut again),
                    )
                    .unwrap();
                    assert_eq!(acc[0], before, "{ctx}: stopped accumulator");
                    assert_eq!(again.state, state, "{ctx}: stopped state");
                    break;
                }
                let x = if temperature == 0.0 {
                    st.argmax
                } else {
                    st.sampled
                };
                feed = vec![x as u32];
            }
            assert_eq!(on_pass.state.kept, kept, "{ctx}");
            assert_eq!(on_pass.state.stopped, 1, "{ctx}: every step ends");
            gammas.push(kept);
            b.truncate(at);
        }
    }
    // Misuse: stopping without accumulators, or γmax past the rule's table.
    let mut ds = StopRule::new().draft_stop(&w, comp, &costs(0.1, 0.1), gmax);
    let no_acc = StatsOptions {
        accumulate: Accumulate::No,
        ..opts(0, 0.0)
    };
    let mut acc = [FeatureAccum::EMPTY];
    assert!(b
        .run_stats(&[1], &no_acc, &mut acc, false, Some(&mut ds))
        .is_err());
    let mut wide = DraftStop {
        gamma_max: STOP_TIMES as u32,
        ..ds
    };
    assert!(b
        .run_stats(&[1], &opts(0, 0.0), &mut acc, false, Some(&mut wide))
        .is_err());
    assert_eq!(
        b.len(),
        at,
        "{label}: a refused step leaves the cache as it was"
    );
    assert_eq!(ds.state, StopState::START, "{label}: nor the state");
    gammas
}

/// The costs make the rule discard the first draft, stop early, and draft on to γmax (6).
fn assert_both_ways(gammas: &[u32], label: &str) {
    eprintln!("{label}: γ per step {gammas:?}");
    assert!(gammas.contains(&0), "{label}: {gammas:?}");
    assert!(
        gammas.iter().any(|&g| g > 0 && g < 6),
        "{label}: {gammas:?}"
    );
    assert!(gammas.contains(&6), "{label}: {gammas:?}");
}

#[test]
fn the_pass_decides_as_the_host_rule() {
    let m = model(Format::Int8);
    for block in [32, 256] {
        let mut e = EmulatedForward::new(&m, Emulator::new(block), 132, 64).unwrap();
        let g = decisions_match_the_host_rule(&mut e, &format!("emulator, block {block}"));
        assert_both_ways(&g, "emulator");
    }
    let mut c = CpuPass::new(&m, None);
    let g = decisions_match_the_host_rule(&mut c, "cpu");
    assert_both_ways(&g, "cpu");
}

#[test]
fn cuda_pass_decides_as_the_host_rule() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    let m = model(Format::Int8);
    let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 64).unwrap();
    for graphs in [true, false] {
        let mut d = CudaForward::new(cuda, &w, 64).unwrap();
        d.set_graphs(graphs);
        let g = decisions_match_the_host_rule(&mut d, &format!("cuda, graphs {graphs}"));
        assert_both_ways(&g, "cuda");
    }
}

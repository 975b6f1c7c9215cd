//! Batched decoding ([`speckv::decode::batch`]) with the tiny model, on the CPU's batched state and
//! on the emulated device program (one test body per backend, expanded by `batch_tests!`):
//! several prompts of different lengths decoded together, each sequence its own γ per step, give
//! each prompt what decoding it alone gives; a batch of one is the single-sequence loop token for
//! token, sampled too; misuse is refused before anything runs. The CUDA twin runs in the gpu-check
//! bundle (skipped here).

mod common;

use speckv::backend::emulate::Emulator;
use speckv::controller::records::Compression;
use speckv::decode::batch::{
    batch_room, plain_batch, speculative_batch, speculative_batch_traced, BatchStats,
};
use speckv::decode::{plain_on, speculative_on, GenConfig, Policy};
use speckv::model::device::EmulatedForward;
use speckv::model::{BatchPass, CpuPass, Model, Pass};
use speckv::weights::quant::Format;

/// A fresh batched state of `seqs` sequences holding `cap` positions each, on one backend.
type State = for<'m> fn(&'m Model, usize, usize) -> Box<dyn BatchPass + Send + 'm>;

fn cpu_state(m: &Model, _cap: usize, seqs: usize) -> Box<dyn BatchPass + Send + '_> {
    Box::new(CpuPass::new_batch(m, None, seqs).unwrap())
}

fn emulated_state(m: &Model, cap: usize, seqs: usize) -> Box<dyn BatchPass + Send + '_> {
    Box::new(EmulatedForward::new_batch(m, Emulator::new(128), 132, cap, seqs).unwrap())
}

/// Each test body below, once per backend.
macro_rules! batch_tests {
    ($($backend:ident: $state:expr;)*) => {$(
        mod $backend {
            #[test]
            fn plain_batches_decode_each_prompt_as_alone() {
                super::plain_batches_decode_each_prompt_as_alone($state)
            }
            #[test]
            fn speculative_batches_are_lossless_with_a_gamma_per_sequence() {
                super::speculative_batches_are_lossless_with_a_gamma_per_sequence($state)
            }
            #[test]
            fn a_batch_of_one_is_the_single_sequence_loop() {
                super::a_batch_of_one_is_the_single_sequence_loop($state)
            }
            #[test]
            fn a_catch_up_window_skips_old_tokens_losslessly() {
                super::a_catch_up_window_skips_old_tokens_losslessly($state)
            }
            #[test]
            fn batched_decodes_refuse_misuse_before_running() {
                super::batched_decodes_refuse_misuse_before_running($state)
            }
        }
    )*};
}

batch_tests! {
    cpu: super::cpu_state;
    emulator: super::emulated_state;
}

/// The tiny model with an output head of its own: with the embedding tied, its greedy tokens
/// repeat the last one, and every draft would be accepted.
fn spec() -> common::tiny::Spec {
    use common::tiny::{HIDDEN, VOCAB};
    let mut s = common::tiny::spec(3);
    let head = common::normal_logits(VOCAB * HIDDEN, 0.5, 77);
    s.tensors
        .insert("output.weight".into(), (vec![VOCAB, HIDDEN], head));
    s
}

fn model() -> Model {
    let p = common::tmp("batch-decode", "tiny.gguf");
    common::tiny::write(&spec(), &p);
    Model::load(&p, Format::Fp16).unwrap()
}

/// Three prompts: 21 tokens (prefilled in two passes of five per sequence and more), 6, and 1
/// (nothing to prefill).
fn prompts() -> Vec<Vec<u32>> {
    let p = |n: u32, k: u32| (0..n).map(|i| (i * 97 + k) % 512).collect::<Vec<u32>>();
    vec![p(21, 13), p(6, 40), p(1, 7)]
}

fn cfg(temperature: f32, gamma_max: u32) -> GenConfig {
    GenConfig {
        max_tokens: 12,
        temperature,
        seed: 5,
        gamma_max,
        compression: Compression::Fp16,
        draft_catch_up: None,
    }
}

/// The draft model: the target's weights with noise added to its output head (it agrees with the
/// target on some tokens, not all).
fn draft_model() -> Model {
    let p = common::tmp("batch-decode", "draft.gguf");
    let mut spec = spec();
    let head = &mut spec.tensors.get_mut("output.weight").unwrap().1;
    let noise = common::normal_logits(head.len(), DRAFT_NOISE, 78);
    for (x, n) in head.iter_mut().zip(noise) {
        *x += n;
    }
    common::tiny::write(&spec, &p);
    Model::load(&p, Format::Fp16).unwrap()
}

const DRAFT_NOISE: f32 = 0.15;

/// A batched state of one sequence as the single-sequence loops' pass.
fn as_pass<'a>(b: &'a mut Box<dyn BatchPass + Send + '_>) -> &'a mut (dyn Pass + Send) {
    &mut **b
}

fn tokens(s: &BatchStats) -> Vec<Vec<u32>> {
    s.sequences.iter().map(|q| q.tokens.clone()).collect()
}

fn plain_batches_decode_each_prompt_as_alone(state: State) {
    let m = model();
    let ps = prompts();
    for t in [0.0, 0.9] {
        let c = cfg(t, 3);
        let cap = batch_room(21, &c, 3);
        let got = plain_batch(&mut *state(&m, cap, 3), &ps, &[], &c).unwrap();
        for (b, p) in ps.iter().enumerate() {
            // Sequence b draws with seed + b.
            let mut cb = c.clone();
            cb.seed += b as u64;
            let mut one = state(&m, cap, 1);
            let want = plain_on(as_pass(&mut one), p, &[], &cb, &mut |_| {}).unwrap();
            assert_eq!(got.sequences[b].tokens, want.tokens, "T {t}, seq {b}");
        }
        assert_eq!(got.target_passes, 11, "one pass per token after the first");
        // A stop token ends its sequence only.
        let stop = got.sequences[1].tokens[2];
        let cut = plain_batch(&mut *state(&m, cap, 3), &ps, &[stop], &c).unwrap();
        for (b, (g, w)) in tokens(&cut).iter().zip(tokens(&got)).enumerate() {
            let end = w.iter().position(|&x| x == stop).unwrap_or(w.len());
            assert_eq!(g[..], w[..end], "T {t}, seq {b} stopped");
        }
    }
}

fn speculative_batches_are_lossless_with_a_gamma_per_sequence(state: State) {
    let m = model();
    let dm = draft_model();
    let ps = prompts();
    let c = cfg(0.0, 3);
    let cap = batch_room(21, &c, 3);
    let plain = tokens(&plain_batch(&mut *state(&m, cap, 3), &ps, &[], &c).unwrap());
    for policy in [
        Policy::Fixed(3),
        Policy::Heuristic,
        Policy::Confidence(0.3),
        Policy::HfThreshold(0.4),
        Policy::AdaEdl {
            lambda: 0.5,
            kappa: 0.5,
        },
        Policy::Auto(Box::new(speckv::decode::Auto::shipped().unwrap())),
    ] {
        let name = policy_name(&policy);
        let (mut t, mut d) = (state(&m, cap, 3), state(&dm, cap, 3));
        let got = speculative_batch(&mut *t, &mut *d, &ps, &[], &policy, &c).unwrap();
        assert_eq!(tokens(&got), plain, "{name}: greedy is lossless");
        for (b, q) in got.sequences.iter().enumerate() {
            assert!(q.accepted <= q.drafted, "{name} seq {b}");
            assert_eq!(q.gamma_histogram.values().sum::<usize>(), q.steps);
            assert!(q.steps <= got.target_passes, "{name} seq {b}");
        }
        let accepted: usize = got.sequences.iter().map(|q| q.accepted).sum();
        println!(
            "{name}: {} target passes, {} draft passes; per sequence (drafted, accepted) {:?}",
            got.target_passes,
            got.draft_passes,
            got.sequences
                .iter()
                .map(|q| (q.drafted, q.accepted))
                .collect::<Vec<_>>()
        );
        if let Policy::Auto(_) = policy {
            // `auto` decides from the times it measures (here a draft as dear as its target, so
            // plain steps win): only its first step, before any hazard is known, surely drafts.
            assert!(got.draft_passes > 0, "auto's first step drafts");
        } else {
            assert!(accepted > 0, "{name}: the draft was accepted");
        }
        assert!(
            got.target_passes <= 12,
            "{name}: more target passes ({}) than tokens",
            got.target_passes
        );
        // Each sequence's target cache holds its prompt and tokens but the last (the step that
        // reached 12 may have verified drafts past it: up to γmax more); the draft's never more.
        for (b, p) in ps.iter().enumerate() {
            let l = t.lens()[b];
            let least = p.len() + 11;
            assert!((least..=least + 3).contains(&l), "{name} seq {b}: {l}");
            assert!(d.lens()[b] <= l + 1, "{name} seq {b}");
        }
    }
    // `auto` sampling: the batch decides per step, every sequence decodes its tokens.
    let auto = Policy::Auto(Box::new(speckv::decode::Auto::shipped().unwrap()));
    let c = cfg(0.9, 3);
    let (mut t, mut d) = (state(&m, cap, 3), state(&dm, cap, 3));
    let got = speculative_batch(&mut *t, &mut *d, &ps, &[], &auto, &c).unwrap();
    for (b, q) in got.sequences.iter().enumerate() {
        assert_eq!(q.tokens.len(), 12, "seq {b}");
        assert!(q.accepted <= q.drafted, "seq {b}");
        assert!(q.drafted <= 3 * q.steps, "seq {b}: γmax 3");
    }
}

/// A policy's name for messages (`auto`'s Debug would print its model).
fn policy_name(p: &Policy) -> String {
    match p {
        Policy::Auto(_) => "auto".into(),
        _ => format!("{p:?}"),
    }
}

fn a_batch_of_one_is_the_single_sequence_loop(state: State) {
    let (m, dm) = (model(), draft_model());
    let p = prompts().swap_remove(0);
    let every = Policy::Every {
        period: 3,
        gamma: 4,
    };
    for (t, policy, window) in [
        (0.9, Policy::Fixed(4), None),
        (0.9, Policy::Confidence(0.3), None),
        (0.0, Policy::Heuristic, None),
        // Plain steps between drafting ones: both loops catch up on the same window.
        (0.9, every.clone(), Some(2)),
        (0.9, every, None),
    ] {
        // The windowed run is long enough for drafts rejected after a skip.
        let c = GenConfig {
            draft_catch_up: window,
            max_tokens: if window.is_some() { 48 } else { 12 },
            ..cfg(t, 4)
        };
        let cap = batch_room(p.len(), &c, 1);
        let (mut tb, mut db) = (state(&m, cap, 1), state(&dm, cap, 1));
        let ps = std::slice::from_ref(&p);
        // Each step's (γ, accepted, verified positions, draft passes, tokens fed to the draft, in
        // its first feed), as the observers see them.
        let mut batch_log = Vec::new();
        let got = speculative_batch_traced(&mut *tb, &mut *db, ps, &[], &policy, &c, &mut |s| {
            assert_eq!((s.active, s.gammas.len()), (&[true][..], 1));
            let fed = (s.draft.passes, s.draft_tokens[0], s.first_tokens[0]);
            batch_log.push((
                s.gammas[0] as u32,
                s.accepted[0] as u32,
                s.verify_positions,
                fed,
            ));
        })
        .unwrap();
        let (mut ts, mut ds) = (state(&m, cap, 1), state(&dm, cap, 1));
        let (ts, ds) = (as_pass(&mut ts), as_pass(&mut ds));
        let mut single_log = Vec::new();
        let want = speculative_on(ts, ds, &p, &[], &policy, &c, &mut |s| {
            let fed = (s.draft.passes, s.draft_tokens, s.draft.first_tokens);
            single_log.push((s.gamma, s.accepted, s.gamma as usize + 1, fed));
        })
        .unwrap();
        assert_eq!(batch_log, single_log, "T {t} {policy:?} {window:?}");
        let q = &got.sequences[0];
        assert_eq!(q.tokens, want.tokens, "T {t} {policy:?}");
        assert_eq!(
            (q.steps, q.drafted, q.accepted),
            (want.steps, want.drafted, want.accepted),
            "T {t} {policy:?}"
        );
        assert_eq!(q.gamma_histogram, want.gamma_histogram, "T {t} {policy:?}");
        assert_eq!(
            q.draft_tokens, want.draft_tokens,
            "T {t} {policy:?} {window:?}"
        );
        // Both leave the caches alike: the draft's cut back to its accepted tokens, less what it
        // skipped.
        let lens = (tb.lens()[0], db.lens()[0]);
        assert_eq!(lens, (ts.len(), ds.len()), "T {t} {policy:?} {window:?}");
        assert_eq!(
            got.draft_tokens, want.draft_tokens,
            "the batch's are its one sequence's"
        );
    }
}

/// A draft that drafts every 4th step catches up on only the newest `window` tokens of the plain
/// steps between: greedy decoding stays lossless, the draft is fed fewer tokens, its cache trails
/// the target's by what it skipped, and a window that holds every backlog changes nothing.
fn a_catch_up_window_skips_old_tokens_losslessly(state: State) {
    let (m, dm) = (model(), draft_model());
    let ps = prompts();
    let every = Policy::Every {
        period: 4,
        gamma: 3,
    };
    let run = |window: Option<usize>| {
        let c = GenConfig {
            draft_catch_up: window,
            ..cfg(0.0, 3)
        };
        let cap = batch_room(21, &c, 3);
        let (mut t, mut d) = (state(&m, cap, 3), state(&dm, cap, 3));
        let got = speculative_batch(&mut *t, &mut *d, &ps, &[], &every, &c).unwrap();
        (got, t.lens().to_vec(), d.lens().to_vec())
    };
    let c = cfg(0.0, 3);
    let cap = batch_room(21, &c, 3);
    let plain = tokens(&plain_batch(&mut *state(&m, cap, 3), &ps, &[], &c).unwrap());
    let (all, t_all, d_all) = run(None);
    assert_eq!(tokens(&all), plain, "greedy is lossless");
    // Drafting steps (3 drafts each, the draft fed what it caught up on and the first 2) per
    // sequence, and the most tokens they may feed with a window of w.
    let drafting = |s: &BatchStats| -> Vec<usize> {
        let q = s.sequences.iter();
        q.map(|q| q.steps - q.gamma_histogram.get(&0).copied().unwrap_or(0))
            .collect()
    };
    let bound = |s: &BatchStats, w: usize| drafting(s).iter().map(|n| n * (w + 2)).sum::<usize>();
    assert!(
        drafting(&all).iter().all(|&n| n >= 2),
        "{:?}",
        drafting(&all)
    );
    // A window of 5 holds the 3 plain steps' tokens, an unseen draft and the pending one.
    let (five, t5, d5) = run(Some(5));
    assert_eq!(tokens(&five), plain);
    assert_eq!(
        (five.draft_tokens, five.target_passes, &t5, &d5),
        (all.draft_tokens, all.target_passes, &t_all, &d_all),
        "a window that drops nothing changes nothing"
    );
    for w in [1, 2] {
        // Every token caught up on feeds more than a window of w allows.
        assert!(all.draft_tokens > bound(&all, w), "{}", all.draft_tokens);
        let (win, t_win, d_win) = run(Some(w));
        assert_eq!(tokens(&win), plain, "window {w}: greedy is lossless");
        assert!(
            win.draft_tokens <= bound(&win, w),
            "window {w}: {} draft tokens over {:?} drafting steps",
            win.draft_tokens,
            drafting(&win)
        );
        for b in 0..ps.len() {
            // The draft's cache trails the target's (it skipped tokens) and keeps the prompt's.
            assert!(
                d_win[b] < t_win[b],
                "window {w} seq {b}: {d_win:?} {t_win:?}"
            );
            assert!(d_win[b] >= ps[b].len() - 1, "window {w} seq {b}");
        }
    }
}

fn batched_decodes_refuse_misuse_before_running(state: State) {
    let (m, dm) = (model(), draft_model());
    let ps = prompts();
    let c = cfg(0.0, 3);
    let cap = batch_room(21, &c, 3);
    type Boxed<'m> = Box<dyn BatchPass + Send + 'm>;
    fn spec(
        t: &mut Boxed,
        d: &mut Boxed,
        ps: &[Vec<u32>],
        pol: &Policy,
        c: &GenConfig,
    ) -> speckv::Result<BatchStats> {
        speculative_batch(&mut **t, &mut **d, ps, &[], pol, c)
    }
    let (mut t, mut d) = (state(&m, cap, 3), state(&dm, cap, 3));
    // γmax 4 over 4 sequences: 20 verification rows > 16.
    let four = [ps.clone(), vec![vec![1]]].concat();
    let (mut t4, mut d4) = (state(&m, cap, 4), state(&dm, cap, 4));
    let e = spec(&mut t4, &mut d4, &four, &Policy::Fixed(4), &cfg(0.0, 4)).unwrap_err();
    assert!(e.to_string().contains("γmax 4 over 4"), "{e}");
    // A catch-up window of no tokens has no room for the pending one: refused by both loops.
    let no_window = GenConfig {
        draft_catch_up: Some(0),
        ..c.clone()
    };
    let e = spec(&mut t, &mut d, &ps, &Policy::Fixed(3), &no_window).unwrap_err();
    assert!(
        matches!(e, speckv::Error::Empty { what } if what.contains("catch-up")),
        "{e}"
    );
    let (mut t1, mut d1) = (state(&m, cap, 1), state(&dm, cap, 1));
    let (t1, d1) = (as_pass(&mut t1), as_pass(&mut d1));
    let e = speculative_on(
        t1,
        d1,
        &ps[0],
        &[],
        &Policy::Fixed(3),
        &no_window,
        &mut |_| {},
    );
    assert!(matches!(e, Err(speckv::Error::Empty { .. })));
    // Nine sequences leave no room for a draft (2 · 9 rows > 16), whatever γmax.
    let nine: Vec<Vec<u32>> = (0..9).map(|i| vec![i + 1]).collect();
    let (mut t9, mut d9) = (state(&m, cap, 9), state(&dm, cap, 9));
    let e = spec(&mut t9, &mut d9, &nine, &Policy::Fixed(1), &cfg(0.0, 1)).unwrap_err();
    assert!(e.to_string().contains("at most 8 sequences"), "{e}");
    for (what, ps) in [
        ("two prompts for three", ps[..2].to_vec()),
        (
            "an empty prompt",
            vec![ps[0].clone(), vec![], ps[2].clone()],
        ),
    ] {
        assert!(
            spec(&mut t, &mut d, &ps, &Policy::Fixed(3), &c).is_err(),
            "{what}"
        );
        assert!(plain_batch(&mut *t, &ps, &[], &c).is_err(), "{what}");
    }
    // Caches too small: the emulator's hold `cap`, the CPU's the model's context.
    let mut small = state(&m, cap, 3);
    let long = GenConfig {
        max_tokens: small.capacity(),
        ..c.clone()
    };
    let e = plain_batch(&mut *small, &ps, &[], &long).unwrap_err();
    assert!(e.to_string().contains("batch_room"), "{e}");
    assert_eq!(t.lens(), &[0, 0, 0][..], "refusals leave the caches empty");
    assert_eq!(d.lens(), &[0, 0, 0][..]);
    // A state that has run is not fresh.
    plain_batch(&mut *t, &ps, &[], &c).unwrap();
    let e = plain_batch(&mut *t, &ps, &[], &c).unwrap_err();
    assert!(e.to_string().contains("empty caches"), "{e}");
}

/// The same decodes on a CUDA device (skipped without one): greedy batches lossless, and a batch
/// of one the single-sequence loop.
#[test]
fn cuda_speculative_batches_are_lossless() {
    use speckv::model::device::{CudaForward, DeviceView, DeviceWeights};
    let Some(cuda) = common::cuda() else { return };
    let m = model();
    let w = DeviceWeights::upload(cuda, &DeviceView::new(&m).unwrap(), 256).unwrap();
    let ps = prompts();
    let c = cfg(0.0, 3);
    let cap = batch_room(21, &c, 3);
    let st = || CudaForward::new_batch(cuda, &w, cap, 3).unwrap();
    let plain = tokens(&plain_batch(&mut st(), &ps, &[], &c).unwrap());
    for (b, p) in ps.iter().enumerate() {
        let mut one = CudaForward::new(cuda, &w, cap).unwrap();
        let want = plain_on(&mut one, p, &[], &c, &mut |_| {}).unwrap();
        assert_eq!(plain[b], want.tokens, "seq {b}");
    }
    let auto = Policy::Auto(Box::new(speckv::decode::Auto::shipped().unwrap()));
    for policy in [Policy::Fixed(3), Policy::Confidence(0.3), auto] {
        let mut d = st();
        d.set_active_layers(vec![true, false]).unwrap();
        let got = speculative_batch(&mut st(), &mut d, &ps, &[], &policy, &c).unwrap();
        assert_eq!(tokens(&got), plain, "{}", policy_name(&policy));
    }
}

/// `bench step --batch-sizes`' whole plain decode step: it runs on every batched state, leaves each
/// cache at the length it timed (whatever the state held before), and refuses what it cannot time.
#[test]
fn plain_decode_step_timing_runs_on_every_batched_state() {
    use speckv::measure::batch_step::time_plain_decode_step;
    let m = model();
    let states: [(&str, State); 2] = [("cpu", cpu_state), ("emulator", emulated_state)];
    for (name, state) in states {
        let mut s = state(&m, 12, 3);
        s.step_batch_resident(&[1, 2, 3, 4, 5, 6], false).unwrap();
        let t = time_plain_decode_step(&mut *s, 7, 2).unwrap();
        assert!(t > std::time::Duration::ZERO, "{name}");
        assert_eq!(s.lens(), &[7, 7, 7][..], "{name}");
        for (at, iters) in [(s.capacity(), 1), (3, 0)] {
            let e = time_plain_decode_step(&mut *s, at, iters).unwrap_err();
            assert!(
                e.to_string().contains("timing a decode step"),
                "{name}: {e}"
            );
        }
    }
}

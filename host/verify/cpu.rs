//! The CPU twin of the `verify` kernel: the same decisions (same Philox sub-streams, same acceptance
//! rule, same emission formulas), probabilities in f64, sequences in parallel (rayon).

use rayon::prelude::*;
use speckv_kernels::params::{VERIFY_ALL_MASKED, VERIFY_BAD_DRAFT, VERIFY_NONFINITE};
use speckv_kernels::philox;
use speckv_kernels::verify::PROB_MAX;

use crate::stats::rows::row_summary;
use crate::stats::LogitsData;
use crate::verify::{DraftDist, VerifyBatch, VerifyOutput};

/// One sequence's decisions (the CPU backend's twin of the kernel's block); its ratios are written
/// into the sequence's slice of the output.
#[derive(Clone, Copy)]
struct SeqResult {
    accepted: u32,
    emit: i32,
    flags: u32,
}

/// The CPU backend's verification (validated input).
pub(crate) fn verify(v: &VerifyBatch<'_>) -> VerifyOutput {
    let mut out = VerifyOutput::new(v.batch, v.gamma_max);
    verify_into(v, &mut out);
    out
}

/// [`verify`] into `out`, reusing its buffers: a batch allocates nothing once `out` has held a
/// step of this size (each sequence writes its own slots of `out`, in parallel).
pub(crate) fn verify_into(v: &VerifyBatch<'_>, out: &mut VerifyOutput) {
    out.reset(v.batch, v.gamma_max);
    let (gm, w) = (v.gamma_max, v.gamma_max + 1);
    let VerifyOutput {
        accepted,
        emitted,
        emitted_count,
        ratios,
        counterfactual,
        flags,
        ..
    } = out;
    let one =
        |b: usize, ratios: &mut [f32], s: Slots<'_>| commit(v, b, verify_seq(v, b, ratios), s);
    if v.batch == 1 {
        let s = Slots {
            accepted: &mut accepted[0],
            count: &mut emitted_count[0],
            flags: &mut flags[0],
            emitted: &mut emitted[..],
            counterfactual: &mut counterfactual[..],
        };
        one(0, ratios, s);
        return;
    }
    let slots = (
        accepted.par_iter_mut(),
        emitted_count.par_iter_mut(),
        flags.par_iter_mut(),
        emitted.par_chunks_mut(w),
        counterfactual.par_chunks_mut(w),
    );
    let slot = |(accepted, count, flags, emitted, counterfactual)| Slots {
        accepted,
        count,
        flags,
        emitted,
        counterfactual,
    };
    if gm == 0 {
        // No ratios (no drafts): zipping an empty `ratios` would end the iteration at once.
        slots
            .into_par_iter()
            .enumerate()
            .for_each(|(b, s)| one(b, &mut [], slot(s)));
    } else {
        (ratios.par_chunks_mut(gm), slots)
            .into_par_iter()
            .enumerate()
            .for_each(|(b, (r, s))| one(b, r, slot(s)));
    }
}

/// Sequence b's slots of a [`VerifyOutput`]: its accepted count, emitted count and flags, and its
/// `γmax + 1` emitted tokens and counterfactuals.
struct Slots<'a> {
    accepted: &'a mut i32,
    count: &'a mut i32,
    flags: &'a mut u32,
    emitted: &'a mut [i32],
    counterfactual: &'a mut [i32],
}

/// Writes sequence `b`'s decisions into its slots.
fn commit(v: &VerifyBatch<'_>, b: usize, r: SeqResult, s: Slots<'_>) {
    *s.flags = r.flags;
    if r.flags != 0 {
        return;
    }
    let g = v.gammas[b] as u32;
    let k = r.accepted;
    *s.accepted = k as i32;
    *s.count = k as i32 + 1;
    for j in 0..k as usize {
        s.emitted[j] = v.draft_tokens[b * v.gamma_max + j];
    }
    s.emitted[k as usize] = r.emit;
    for gp in 0..=g {
        s.counterfactual[gp as usize] = k.min(gp) as i32 + 1;
    }
}

/// Sequence `b`'s decisions; min(1, p/q) of every evaluated position into `ratios` (its γmax
/// slots, left as they are elsewhere).
fn verify_seq(v: &VerifyBatch<'_>, b: usize, ratios: &mut [f32]) -> SeqResult {
    let g = v.gammas[b] as usize;
    let tt = v.target_temperature[b];
    let greedy = tt == 0.0;
    let inv_tt = if greedy { 1.0 } else { 1.0 / tt };
    let (draft_logits, draft_probs, td) = match v.draft {
        DraftDist::Logits { data, temperature } => (Some(data), None, temperature[b]),
        DraftDist::Probs(p) => (None, Some(p), 1.0),
    };
    // A greedy draft's q is one-hot at the token it drafted: its row is not read.
    let draft_greedy = draft_logits.is_some() && td == 0.0;
    let inv_td = if draft_greedy || draft_probs.is_some() {
        1.0
    } else {
        1.0 / td
    };
    let t_row = |i: usize| (b * (v.gamma_max + 1) + i) * v.target_stride;
    let d_row = |i: usize| (b * v.gamma_max + i) * v.draft_stride;
    let accept_seed = philox::derive(v.seed, philox::PURPOSE_ACCEPT, 0);
    let fail = |flags| SeqResult {
        accepted: 0,
        emit: -1,
        flags,
    };
    let valid = |q: f64| (0.0..=PROB_MAX as f64).contains(&q);

    for i in 0..g {
        let x = v.draft_tokens[b * v.gamma_max + i] as usize;
        let ts = row_summary(v.target, t_row(i), v.vocab, inv_tt, None);
        let tflags = problems(ts.flags, ts.sum);
        if tflags != 0 {
            return fail(tflags);
        }
        let ds = match draft_logits {
            Some(d) if !greedy && !draft_greedy => {
                let s = row_summary(d, d_row(i), v.vocab, inv_td, None);
                let f = problems(s.flags, s.sum);
                if f != 0 {
                    return fail(f);
                }
                Some(s)
            }
            _ => None,
        };
        let prob = |data: LogitsData<'_>, at: usize, max: f32, sum: f64, inv_t: f32| -> f64 {
            let xv = data.get(at);
            if xv == f32::NEG_INFINITY {
                0.0
            } else {
                ((xv * inv_t) as f64 - (max * inv_t) as f64).exp() / sum
            }
        };
        let q_at = |j: usize| -> f64 {
            match (draft_logits, draft_probs, ds) {
                (_, Some(p), _) => p[d_row(i) + j] as f64,
                _ if draft_greedy => (j == x) as u32 as f64,
                (Some(d), _, Some(s)) => prob(d, d_row(i) + j, s.max, s.sum, inv_td),
                _ => 0.0,
            }
        };
        let (accept, ratio) = if greedy {
            let a = ts.argmax as usize == x;
            (a, if a { 1.0 } else { 0.0 })
        } else {
            let px = prob(v.target, t_row(i) + x, ts.max, ts.sum, inv_tt);
            let qx = q_at(x);
            if !valid(px) || !valid(qx) {
                return fail(VERIFY_NONFINITE);
            }
            if qx == 0.0 {
                return fail(VERIFY_BAD_DRAFT);
            }
            let ratio = (px / qx).min(1.0);
            let u = philox::uniform_open(philox::bits(accept_seed, i as u32, b as u32, v.step));
            ((u as f64) < ratio, ratio as f32)
        };
        ratios[i] = ratio;
        if !accept {
            let emit = if greedy {
                ts.argmax as i32
            } else {
                // Residual norm(max(0, p − q)) by exponential race; p itself if rounding left none.
                let key = philox::key(philox::derive(v.seed, philox::PURPOSE_EMIT, i as u32));
                let mut best = (f64::NEG_INFINITY, -1i32);
                for j in 0..v.vocab {
                    let qj = q_at(j);
                    if !valid(qj) {
                        return fail(VERIFY_NONFINITE);
                    }
                    let w = prob(v.target, t_row(i) + j, ts.max, ts.sum, inv_tt) - qj;
                    if w > 0.0 {
                        let bits = philox::word(
                            philox::philox4x32_10(philox::counter(j as u32, b as u32, v.step), key),
                            j as u32,
                        );
                        let e = -philox::ln_det(philox::uniform_open(bits)) as f64;
                        if w / e > best.0 {
                            best = (w / e, j as i32);
                        }
                    }
                }
                if best.1 >= 0 {
                    best.1
                } else {
                    gumbel_target(v, b, i, inv_tt).unwrap_or(-1)
                }
            };
            return SeqResult {
                accepted: i as u32,
                emit,
                flags: 0,
            };
        }
    }
    // All accepted: the bonus token from row g.
    let emit = if greedy {
        let ts = row_summary(v.target, t_row(g), v.vocab, 1.0, None);
        let f = problems(ts.flags, ts.sum);
        if f != 0 {
            return fail(f);
        }
        ts.argmax as i32
    } else {
        let ts = row_summary(
            v.target,
            t_row(g),
            v.vocab,
            inv_tt,
            Some((
                philox::derive(v.seed, philox::PURPOSE_EMIT, g as u32),
                v.step,
                b as u32,
            )),
        );
        let f = problems(ts.flags, ts.sum);
        if f != 0 {
            return fail(f);
        }
        ts.key_idx as i32
    };
    SeqResult {
        accepted: g as u32,
        emit,
        flags: 0,
    }
}

/// Gumbel-max over target row `i` of sequence `b` with the emission noise of position `i`.
fn gumbel_target(v: &VerifyBatch<'_>, b: usize, i: usize, inv_tt: f32) -> Option<i32> {
    let at = (b * (v.gamma_max + 1) + i) * v.target_stride;
    let seed = philox::derive(v.seed, philox::PURPOSE_EMIT, i as u32);
    let s = row_summary(
        v.target,
        at,
        v.vocab,
        inv_tt,
        Some((seed, v.step, b as u32)),
    );
    (s.key_idx != u32::MAX).then_some(s.key_idx as i32)
}

fn problems(flags: u32, sum: f64) -> u32 {
    if flags != 0 {
        VERIFY_NONFINITE
    } else if sum == 0.0 {
        VERIFY_ALL_MASKED
    } else {
        0
    }
}

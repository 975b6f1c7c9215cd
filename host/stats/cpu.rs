//! The CPU twin of the `softmax_stats` kernel: native Rust, multi-threaded (rayon) and written for
//! auto-vectorisation (8-lane tiles, a polynomial exp, AVX2 chosen at run time). Not the emulator:
//! same results as the kernel (same definitions, same flags, bit-identical argmax and sampled
//! tokens), its own fast code.
//!
//! Each row is cut into segments (several per row when rows are fewer than threads); a segment is
//! read once, tile by tile: a tile's max (and non-finite check), a rescale when the max moves, then
//! Σ e^{z−m} and Σ e^{z−m}(z−m) over the tile in f32 lanes, added into f64 running sums.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use speckv_kernels::params::{FeatureAccum, RowStats, ROW_ALL_MASKED, ROW_NONFINITE};
use speckv_kernels::philox;

use crate::error::Result;
use crate::stats::{check_accum, Accumulate, Logits, LogitsData, StatsOptions};

const TILE: usize = 1024;
const LANES: usize = 8;
/// Below this many elements a row is not split across threads.
const MIN_SEGMENT: usize = 16 * 1024;

/// Statistics of every row on `threads` threads; updates `accum` as `opts.accumulate` says.
pub fn softmax_stats(
    threads: usize,
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
) -> Result<Vec<RowStats>> {
    let mut scratch = StatsScratch::default();
    softmax_stats_into(threads, logits, opts, accum, &mut scratch)?;
    Ok(scratch.rows)
}

/// The working memory of [`softmax_stats_into`]: segment partials and the rows' statistics, kept
/// between calls so a decode loop allocates nothing once it has seen its largest step.
#[derive(Clone, Debug, Default)]
pub struct StatsScratch {
    partials: Vec<Partial>,
    rows: Vec<RowStats>,
}

/// [`softmax_stats`] into `scratch`; the rows' statistics are returned from it.
pub fn softmax_stats_into<'s>(
    threads: usize,
    logits: &Logits<'_>,
    opts: &StatsOptions,
    accum: Option<&mut [FeatureAccum]>,
    scratch: &'s mut StatsScratch,
) -> Result<&'s [RowStats]> {
    opts.validate()?;
    check_accum(accum.as_ref().map(|a| a.len()), logits.rows(), opts)?;
    let stride = logits.row_stride();
    let job = |r: usize| RowJob {
        base: r * stride,
        temperature: opts.temperature,
        sample: opts.sample,
        rng: (opts.seed, opts.step, r as u32),
    };
    let out = &mut scratch.rows;
    rows_into(
        threads,
        logits.data(),
        logits.vocab(),
        logits.rows(),
        job,
        &mut scratch.partials,
        out,
    );
    if let Some(acc) = accum {
        if opts.accumulate != Accumulate::No {
            for (a, r) in acc.iter_mut().zip(out.iter()) {
                if opts.accumulate == Accumulate::Reset {
                    *a = FeatureAccum::EMPTY;
                }
                a.push(r.entropy, r.confidence, r.flags);
            }
        }
    }
    Ok(out)
}

/// One row of a pass: where it starts in the data, its (valid) temperature, whether it samples,
/// and its Philox (seed, step, stream).
#[derive(Clone, Copy)]
pub(super) struct RowJob {
    pub base: usize,
    pub temperature: f32,
    pub sample: bool,
    pub rng: (u64, u64, u32),
}

/// The statistics of `n` rows of `vocab` elements of `data`, row k as `job(k)` says, on `threads`
/// threads, into `out` (cleared first); `partials` is working memory kept by the caller.
pub(super) fn rows_into(
    threads: usize,
    data: LogitsData<'_>,
    vocab: usize,
    n: usize,
    job: impl Fn(usize) -> RowJob + Sync,
    partials: &mut Vec<Partial>,
    out: &mut Vec<RowStats>,
) {
    // Several segments per row when rows are fewer than threads.
    let per_row = if n >= threads {
        1
    } else {
        (2 * threads)
            .div_ceil(n.max(1))
            .min(vocab.div_ceil(MIN_SEGMENT))
            .max(1)
    };
    let seg_len = vocab.div_ceil(per_row);
    let inv_t = |t: f32| if t == 0.0 { 1.0 } else { 1.0 / t };
    partials.clear();
    partials.resize(n * per_row, Partial::EMPTY);
    partials.par_iter_mut().enumerate().for_each(|(at, slot)| {
        let (k, seg) = (at / per_row, at % per_row);
        let j = job(k);
        let (start, end) = (seg * seg_len, ((seg + 1) * seg_len).min(vocab));
        let rng = (j.sample && j.temperature != 0.0).then_some(j.rng);
        *slot = segment_dispatch(data, j.base, start, end, inv_t(j.temperature), rng);
    });
    out.clear();
    out.extend(partials.chunks(per_row).enumerate().map(|(k, parts)| {
        let j = job(k);
        let it = inv_t(j.temperature);
        let mut p = Partial::EMPTY;
        for q in parts {
            p.merge(q, it);
        }
        let greedy = j.temperature == 0.0;
        p.finish(it, greedy, !greedy && j.sample)
    }));
}

/// A segment's partial state (the CPU twin of the kernel's `StatsState`, with f64 sums).
#[derive(Clone, Copy, Debug)]
pub(super) struct Partial {
    pub(super) max: f32,
    pub(super) argmax: u32,
    pub(super) sum: f64,
    pub(super) u: f64,
    pub(super) key: f32,
    pub(super) key_idx: u32,
    pub(super) key_z: f32,
    pub(super) flags: u32,
}

impl Partial {
    const EMPTY: Partial = Partial {
        max: f32::NEG_INFINITY,
        argmax: u32::MAX,
        sum: 0.0,
        u: 0.0,
        key: f32::NEG_INFINITY,
        key_idx: u32::MAX,
        key_z: f32::NAN,
        flags: 0,
    };

    fn merge(&mut self, o: &Partial, inv_t: f32) {
        self.flags |= o.flags;
        if o.key > self.key || (o.key == self.key && o.key_idx < self.key_idx) {
            self.key = o.key;
            self.key_idx = o.key_idx;
            self.key_z = o.key_z;
        }
        if o.sum == 0.0 {
            return;
        }
        if self.sum == 0.0 {
            self.max = o.max;
            self.argmax = o.argmax;
            self.sum = o.sum;
            self.u = o.u;
            return;
        }
        let take_other = o.max > self.max || (o.max == self.max && o.argmax < self.argmax);
        let m = if o.max > self.max { o.max } else { self.max };
        let mz = (m * inv_t) as f64;
        let da = (self.max * inv_t) as f64 - mz;
        let db = (o.max * inv_t) as f64 - mz;
        let (ca, cb) = (da.exp(), db.exp());
        self.u = ca * (self.u + da * self.sum) + cb * (o.u + db * o.sum);
        self.sum = self.sum * ca + o.sum * cb;
        self.max = m;
        if take_other {
            self.argmax = o.argmax;
        }
    }

    fn finish(&self, inv_t: f32, greedy: bool, sample: bool) -> RowStats {
        let mut flags = self.flags;
        if flags == 0 && self.sum == 0.0 {
            flags |= ROW_ALL_MASKED;
        }
        if flags != 0 {
            return RowStats {
                max_logit: f32::NAN,
                lse: f32::NAN,
                entropy: f32::NAN,
                confidence: f32::NAN,
                argmax: -1,
                sampled: -1,
                sampled_prob: f32::NAN,
                flags,
            };
        }
        let ln_sum = self.sum.ln();
        let mz = (self.max * inv_t) as f64;
        let confidence = (1.0 / self.sum) as f32;
        let (sampled, sampled_prob) = if greedy {
            (self.argmax as i32, confidence)
        } else if sample {
            (
                self.key_idx as i32,
                (((self.key_z as f64) - mz).exp() / self.sum) as f32,
            )
        } else {
            (-1, f32::NAN)
        };
        RowStats {
            max_logit: self.max,
            lse: (mz + ln_sum) as f32,
            entropy: (ln_sum - self.u / self.sum).max(0.0) as f32,
            confidence,
            argmax: self.argmax as i32,
            sampled,
            sampled_prob,
            flags: 0,
        }
    }
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub(super) fn segment_dispatch(
    data: LogitsData<'_>,
    base: usize,
    start: usize,
    end: usize,
    inv_t: f32,
    rng: Option<(u64, u64, u32)>,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { segment_avx2(data, base, start, end, inv_t, rng) };
        }
    }
    segment(data, base, start, end, inv_t, rng)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn segment_avx2(
    data: LogitsData<'_>,
    base: usize,
    start: usize,
    end: usize,
    inv_t: f32,
    rng: Option<(u64, u64, u32)>,
) -> Partial {
    segment(data, base, start, end, inv_t, rng)
}

/// One segment `[start, end)` of the row starting at element `base`, read once.
#[inline(always)]
fn segment(
    data: LogitsData<'_>,
    base: usize,
    start: usize,
    end: usize,
    inv_t: f32,
    rng: Option<(u64, u64, u32)>,
) -> Partial {
    let mut p = Partial::EMPTY;
    let mut buf = [0f32; TILE];
    let mut t0 = start;
    while t0 < end {
        let n = TILE.min(end - t0);
        let x = &mut buf[..n];
        load_tile(data, base + t0, x);
        let (tmax, bad) = tile_max(x, inv_t);
        if bad {
            p.flags |= ROW_NONFINITE;
            return p; // the row's statistics are NaN anyway
        }
        if tmax == f32::NEG_INFINITY {
            t0 += n;
            continue; // everything masked
        }
        if tmax > p.max {
            if p.sum > 0.0 {
                let d = (p.max * inv_t) as f64 - (tmax * inv_t) as f64;
                let c = d.exp();
                p.u = c * (p.u + d * p.sum);
                p.sum *= c;
            }
            p.max = tmax;
            p.argmax = (t0 + x.iter().position(|&v| v == tmax).unwrap_or(0)) as u32;
        }
        let mz = p.max * inv_t;
        let (s, u) = tile_exp_sums(x, inv_t, mz);
        p.sum += s as f64;
        p.u += u as f64;
        if let Some((seed, step, stream)) = rng {
            tile_gumbel(&mut p, x, t0, inv_t, seed, step, stream);
        }
        t0 += n;
    }
    p
}

#[inline(always)]
fn load_tile(data: LogitsData<'_>, at: usize, out: &mut [f32]) {
    let n = out.len();
    match data {
        LogitsData::F32(d) => out.copy_from_slice(&d[at..at + n]),
        LogitsData::F16(d) => <[f16]>::convert_to_f32_slice(&d[at..at + n], out),
        LogitsData::Bf16(d) => <[bf16]>::convert_to_f32_slice(&d[at..at + n], out),
    }
}

/// The tile's max and whether it holds a NaN or +inf, or a finite logit whose x / T overflows (the
/// kernels' `ROW_NONFINITE` rule), in 8 lanes.
#[inline(always)]
fn tile_max(x: &[f32], inv_t: f32) -> (f32, bool) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            bad[l] |= (v != f32::NEG_INFINITY) & !(v * inv_t).is_finite();
            m[l] = if v > m[l] { v } else { m[l] };
        }
    }
    let mut mm = f32::NEG_INFINITY;
    let mut b = false;
    for l in 0..LANES {
        mm = if m[l] > mm { m[l] } else { mm };
        b |= bad[l];
    }
    for &v in rest {
        b |= (v != f32::NEG_INFINITY) & !(v * inv_t).is_finite();
        mm = if v > mm { v } else { mm };
    }
    (mm, b)
}

/// e^d for d <= 0 from + − × and integer bit tricks only, so it vectorises: d = n ln2 + g with
/// n = round(d / ln2) and g from a two-part ln 2 (Cody–Waite, so g is nearly exact), e^g by a
/// degree-7 Taylor polynomial (|g| <= ln2 / 2), 2^n by building the exponent bits. Relative error
/// < 3e-7 over [−87, 0]; results below 2^-126 are not produced: callers zero them.
#[inline(always)]
fn exp_neg(d: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 × 2^23: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125, few bits: n × LN2_HI exact
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    let t = d * std::f32::consts::LOG2_E;
    let t = if t < -126.0 { -126.0 } else { t };
    let shifted = t + MAGIC;
    let r = shifted - MAGIC;
    let n = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32); // = r, exactly
    let g = (d - r * LN2_HI) - r * LN2_LO;
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0
                    + g * (1.0 / 24.0
                        + g * (1.0 / 120.0 + g * (1.0 / 720.0 + g * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    p * scale
}

/// Σ e^{z−m} and Σ e^{z−m}(z−m) over the tile, z = x·inv_t, m = mz; −inf logits add nothing.
/// Written as an element-wise map (which LLVM vectorises without reassociating anything) followed
/// by sums in 8 explicit lanes.
#[inline(always)]
fn tile_exp_sums(x: &[f32], inv_t: f32, mz: f32) -> (f32, f32) {
    let mut e = [0f32; TILE];
    let mut ed = [0f32; TILE];
    let n = x.len();
    for ((xv, ev), edv) in x.iter().zip(&mut e[..n]).zip(&mut ed[..n]) {
        let d = *xv * inv_t - mz;
        let live = d > -87.0;
        let p = exp_neg(d);
        *ev = if live { p } else { 0.0 };
        *edv = if live { p * d } else { 0.0 };
    }
    (lane_sum(&e[..n]), lane_sum(&ed[..n]))
}

/// Σ x in 8 lanes (then across them).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for v in rest {
        s += v;
    }
    s
}

/// Gumbel keys of the tile, exactly as the kernel forms them (same Philox words, same IEEE ops).
#[inline(always)]
fn tile_gumbel(
    p: &mut Partial,
    x: &[f32],
    t0: usize,
    inv_t: f32,
    seed: u64,
    step: u64,
    stream: u32,
) {
    let key = philox::key(seed);
    let n = x.len();
    // 1. Philox blocks for every group of 4 elements the tile touches (independent: vectorisable).
    let first = t0 / 4;
    let groups = (t0 + n).div_ceil(4) - first;
    let mut words = [0u32; TILE + 8];
    for (gi, w) in words[..groups * 4].chunks_exact_mut(4).enumerate() {
        let g = (first + gi) as u32;
        w.copy_from_slice(&philox::philox4x32_10(
            [g, stream, step as u32, (step >> 32) as u32],
            key,
        ));
    }
    // 2. Gumbel noise, element-wise (vectorisable).
    let off = t0 - first * 4;
    let mut g = [0f32; TILE];
    for (gj, &w) in g[..n].iter_mut().zip(&words[off..off + n]) {
        *gj = philox::gumbel(philox::uniform_open(w));
    }
    // 3. The winner, ties to the lower index, exactly as the kernel forms the keys.
    for (j, (&v, &gj)) in x.iter().zip(&g[..n]).enumerate() {
        if v == f32::NEG_INFINITY {
            continue;
        }
        let z = v * inv_t;
        let k = z + gj;
        if k > p.key {
            p.key = k;
            p.key_idx = (t0 + j) as u32;
            p.key_z = z;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_f64_exp() {
        let mut d = 0.0f32;
        while d > -87.0 {
            let want = (d as f64).exp();
            let got = exp_neg(d) as f64;
            assert!(
                ((got - want) / want).abs() < 5e-7,
                "d={d} got={got} want={want}"
            );
            d -= 0.0137;
        }
    }

    #[test]
    fn tile_max_flags_nan_and_pos_inf_but_not_neg_inf() {
        let mut x = vec![0.5f32; 37];
        assert_eq!(tile_max(&x, 1.0), (0.5, false));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(tile_max(&x, 1.0), (0.5, false));
        x[20] = f32::NAN;
        assert!(tile_max(&x, 1.0).1);
        x[20] = 0.0;
        x[36] = f32::INFINITY;
        assert!(tile_max(&x, 1.0).1);
        // A finite logit whose x / T overflows is flagged too (in the tail and in the lanes).
        x[36] = 0.0;
        assert_eq!(tile_max(&x, 1e30), (0.5, false));
        x[36] = 1e10;
        assert!(tile_max(&x, 1e30).1);
        x[36] = 0.0;
        x[1] = -1e10;
        assert!(tile_max(&x, 1e30).1);
    }
}

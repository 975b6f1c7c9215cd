//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
//! counter-based generator every speckv kernel draws from. Randomness is a kernel *input*: the same
//! (seed, counter) gives the same bits on the CPU backend, the emulator and the GPU, so CPU
//! references reproduce sampled and accepted tokens exactly.
//!
//! Counter layout used by speckv (documented in `docs/kernels.md`):
//! `[element / 4, stream id (row or sequence), step low 32 bits, step high 32 bits]`, key = the
//! 64-bit seed split in two; element `e` takes word `e % 4` of the block.
//!
//! Everything here is integer arithmetic plus one exact f32 conversion, so results are bit-identical
//! on every target; `ln_det` uses only correctly rounded IEEE operations for the same reason.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on `ctr` with `key`.
#[inline(always)]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    let mut round = 0;
    while round < 10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        round += 1;
    }
    c
}

/// The counter block holding element `element` of stream `stream` at step `step`.
#[inline(always)]
pub fn counter(element: u32, stream: u32, step: u64) -> [u32; 4] {
    [element / 4, stream, step as u32, (step >> 32) as u32]
}

/// The key for a 64-bit seed.
#[inline(always)]
pub fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The 32 random bits of element `element` of stream `stream` at step `step`.
#[inline(always)]
pub fn bits(seed: u64, element: u32, stream: u32, step: u64) -> u32 {
    word(
        philox4x32_10(counter(element, stream, step), key(seed)),
        element,
    )
}

/// Word `element % 4` of a Philox block, by selects (an indexed array would go to local memory on
/// the GPU).
#[inline(always)]
pub fn word(block: [u32; 4], element: u32) -> u32 {
    match element & 3 {
        0 => block[0],
        1 => block[1],
        2 => block[2],
        _ => block[3],
    }
}

/// Purposes of derived seeds (independent sub-streams of one user seed).
pub const PURPOSE_ACCEPT: u32 = 1;
/// The token emitted at a position (residual or bonus sample); the index is the position.
pub const PURPOSE_EMIT: u32 = 2;
/// Draft sampling in simulations (`speckv verify-sim`); the index is the position.
pub const PURPOSE_DRAFT: u32 = 3;

/// A seed for the sub-stream (`purpose`, `index`) of `seed`: one Philox block keyed by the seed,
/// so sub-streams are independent of each other and of the seed's own stream.
#[inline(always)]
pub fn derive(seed: u64, purpose: u32, index: u32) -> u64 {
    let b = philox4x32_10([purpose, index, 0x5eed_5eed, 0x0d1e_5eed], key(seed));
    (b[0] as u64) | ((b[1] as u64) << 32)
}

/// Maps 32 random bits to a uniform in the open interval (0, 1): the top 23 bits plus one half,
/// times 2^-23, which is exact in f32 (24 significant bits), so 0 and 1 never occur.
#[inline(always)]
pub fn uniform_open(bits: u32) -> f32 {
    ((bits >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// Natural logarithm of a positive normal f32 from correctly rounded IEEE operations only
/// (no hardware approximations, no fused multiply-add), so it is bit-identical on every target.
/// Relative error about 1e-7. Not for zero, negative, subnormal or non-finite inputs (the callers
/// only pass uniforms in (0, 1) and their negated logarithms).
#[inline(always)]
pub fn ln_det(x: f32) -> f32 {
    // fdlibm's split of ln 2 (e_logf.c): LN2_HI has its low bits clear, so e * LN2_HI is exact.
    const LN2_HI: f32 = f32::from_bits(0x3f31_7180); // 6.9313812256e-1
    const LN2_LO: f32 = f32::from_bits(0x3717_f7d1); // 9.0580006145e-6
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    if m > core::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let poly = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0)))));
    let ln_m = 2.0 * s * poly;
    let ef = e as f32;
    ef * LN2_HI + (ef * LN2_LO + ln_m)
}

/// A standard Gumbel variate −ln(−ln u) for u in (0, 1), bit-identical on every target.
#[inline(always)]
pub fn gumbel(u: f32) -> f32 {
    -ln_det(-ln_det(u))
}

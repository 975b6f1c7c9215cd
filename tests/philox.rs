//! The counter-based RNG and the exact conversions shared by the kernels and the CPU backend.

use half::{bf16, f16};
use speckv_kernels::{gpu, philox};

/// Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
#[test]
fn philox4x32_10_known_answers() {
    assert_eq!(
        philox::philox4x32_10([0, 0, 0, 0], [0, 0]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox::philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox::philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn philox_streams_differ_by_element_stream_and_step() {
    let a = philox::bits(1, 0, 0, 0);
    assert_ne!(a, philox::bits(1, 1, 0, 0));
    assert_ne!(a, philox::bits(1, 0, 1, 0));
    assert_ne!(a, philox::bits(1, 0, 0, 1));
    assert_ne!(a, philox::bits(1, 0, 0, 1 << 32));
    assert_ne!(a, philox::bits(2, 0, 0, 0));
    // Elements 4k..4k+3 share one block.
    let block = philox::philox4x32_10(philox::counter(8, 3, 5), philox::key(9));
    for e in 8..12 {
        assert_eq!(philox::bits(9, e, 3, 5), block[(e - 8) as usize]);
    }
}

#[test]
fn uniform_is_strictly_inside_zero_one() {
    assert!(philox::uniform_open(0) > 0.0);
    assert!(philox::uniform_open(u32::MAX) < 1.0);
    assert_eq!(philox::uniform_open(0), 0.5 / 8_388_608.0);
    // Mean of many draws is 1/2.
    let n = 100_000u32;
    let mean: f64 = (0..n)
        .map(|i| philox::uniform_open(philox::bits(4, i, 0, 0)) as f64)
        .sum::<f64>()
        / n as f64;
    assert!((mean - 0.5).abs() < 0.005, "{mean}");
}

#[test]
fn ln_det_is_accurate_over_its_domain() {
    let mut worst = 0f64;
    let mut x = 1.2e-7f32;
    while x < 20.0 {
        let got = philox::ln_det(x) as f64;
        let want = (x as f64).ln();
        let err = (got - want).abs() / want.abs().max(1e-3);
        worst = worst.max(err);
        x *= 1.000_37;
    }
    assert!(worst < 5e-7, "worst relative error {worst}");
    assert_eq!(philox::ln_det(1.0), 0.0);
}

#[test]
fn gumbel_has_its_mean_and_variance() {
    let n = 200_000u32;
    let g: Vec<f64> = (0..n)
        .map(|i| philox::gumbel(philox::uniform_open(philox::bits(7, i, 1, 2))) as f64)
        .collect();
    let mean = g.iter().sum::<f64>() / n as f64;
    let var = g.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    let euler = 0.577_215_664_9;
    let want_var = std::f64::consts::PI.powi(2) / 6.0;
    assert!((mean - euler).abs() < 0.01, "mean {mean}");
    assert!((var - want_var).abs() < 0.03, "var {var}");
}

#[test]
fn f16_conversion_is_exact_for_every_bit_pattern() {
    for bits in 0..=u16::MAX {
        let got = gpu::f16_bits_to_f32(bits);
        let want = f16::from_bits(bits).to_f32();
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
        }
    }
}

#[test]
fn bf16_conversion_is_exact() {
    for bits in (0..=u16::MAX).step_by(7) {
        let want = bf16::from_bits(bits).to_f32();
        let got = gpu::bf16_to_f32(bits);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{bits:#06x}"
        );
    }
}

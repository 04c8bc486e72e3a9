//! Philox4x32-10 known answers and stream properties (docs/model.md §6). The normal transform's
//! quality gates are in `tests/physics_normal.rs`.
use aimc::rng::{child_tensor_id, philox4x32_10, Purpose, Stream};

/// Random123 `kat_vectors` for philox4x32 with 10 rounds: (counter, key, expected output).
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0, 0, 0, 0],
        [0, 0],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [u32::MAX; 4],
        [u32::MAX; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

#[test]
fn philox_matches_random123_known_answers() {
    for (ctr, key, expected) in KAT {
        assert_eq!(
            philox4x32_10(ctr, key),
            expected,
            "counter {ctr:x?} key {key:x?}"
        );
    }
}

#[test]
fn stream_counter_layout_is_the_documented_one() {
    let seed = 0x0123_4567_89ab_cdef_u64;
    let s = Stream::new(seed, Purpose::OutputNoise, 77);
    let call = (5u64 << 32) | 9;
    let expected = philox4x32_10(
        [9, 77, 3, (Purpose::OutputNoise as u32) << 24 | 2 << 16 | 5],
        [0x89ab_cdef, 0x0123_4567],
    );
    assert_eq!(s.block(call, 3, 2), expected);
}

#[test]
fn fill_normal_equals_elementwise_normal() {
    let s = Stream::new(42, Purpose::ReadNoise, 3);
    for start in [0u64, 1, 2, 3, 5, 1_000_003] {
        let mut buf = vec![0.0f32; 37];
        s.fill_normal(start, 11, 1, &mut buf);
        for (i, v) in buf.iter().enumerate() {
            assert_eq!(
                v.to_bits(),
                s.normal_attempt(start + i as u64, 11, 1).to_bits()
            );
        }
    }
}

#[test]
fn streams_differ_by_every_key_component() {
    let base = Stream::new(1, Purpose::ProgramNoise, 0).normal(0, 0);
    assert_ne!(base, Stream::new(2, Purpose::ProgramNoise, 0).normal(0, 0));
    assert_ne!(base, Stream::new(1, Purpose::DriftExponent, 0).normal(0, 0));
    assert_ne!(base, Stream::new(1, Purpose::ProgramNoise, 1).normal(0, 0));
    assert_ne!(base, Stream::new(1, Purpose::ProgramNoise, 0).normal(0, 1));
    assert_ne!(
        base,
        Stream::new(1, Purpose::ProgramNoise, 0).normal_attempt(0, 0, 1)
    );
    let ids: std::collections::HashSet<u32> = (0..1000).map(|b| child_tensor_id(7, b)).collect();
    assert_eq!(ids.len(), 1000, "child tensor ids collide");
}

/// Moments of 4·10⁵ normals: mean 0 ± 4·SE, variance 1 ± 4·SE (SE of s² is √(2/n)),
/// kurtosis 3 ± 4·√(24/n); uniforms have mean 1/2 ± 4·SE.
#[test]
fn normals_and_uniforms_have_the_right_moments() {
    let n = 400_000usize;
    let s = Stream::new(9, Purpose::TestData, 0);
    let mut z = vec![0.0f32; n];
    s.fill_normal(0, 0, 0, &mut z);
    let nf = n as f64;
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / nf;
    let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / nf;
    let kurt = z.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / nf / (var * var);
    assert!(mean.abs() < 4.0 / nf.sqrt(), "mean {mean}");
    assert!((var - 1.0).abs() < 4.0 * (2.0 / nf).sqrt(), "var {var}");
    assert!(
        (kurt - 3.0).abs() < 4.0 * (24.0 / nf).sqrt(),
        "kurtosis {kurt}"
    );
    let u_mean = (0..n as u64).map(|i| s.uniform(i, 0) as f64).sum::<f64>() / nf;
    assert!(
        (u_mean - 0.5).abs() < 4.0 * (1.0 / 12.0 / nf).sqrt(),
        "uniform mean {u_mean}"
    );
    assert!((0..1000).all(|i| (0.0..1.0).contains(&s.uniform(i, 0))));
}

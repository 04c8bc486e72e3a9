//! The operand precision of every backend (docs/model.md §3): after programming, drift and read
//! noise, a crossbar's effective weights W̃ are rounded once to IEEE binary16, round to nearest
//! even. DAC codes are small integers (exact in binary16 up to 11 bits), so each product
//! W̃_ij·x̃_j is exact in f32 and one fp16 tensor-core MMA computes what the CPU computes, up to
//! f32 summation order. `kernels/program.cu`'s `to_binary16` mirrors [`to_binary16`].
use half::f16;

/// The binary16 value nearest `v` (ties to even), as f32: overflow (|v| ≥ 65520) gives ±inf,
/// values below 2⁻¹⁴ round to the binary16 subnormals (multiples of 2⁻²⁴), NaN stays NaN.
#[inline]
pub fn to_binary16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// [`to_binary16`] on every element.
pub fn round_to_binary16(w: &mut [f32]) {
    w.iter_mut().for_each(|v| *v = to_binary16(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_with_subnormals_and_overflow() {
        let p = |e: i32| 2f32.powi(e);
        // Exact values stay.
        for v in [0.0, -0.0, 1.0, -2.5, 65504.0, p(-14), p(-24), 1.0 + p(-10)] {
            assert_eq!(to_binary16(v).to_bits(), v.to_bits(), "{v}");
        }
        // Ties to even: 1 + 2⁻¹¹ lies halfway between 1 and 1 + 2⁻¹⁰ (odd last bit).
        assert_eq!(to_binary16(1.0 + p(-11)), 1.0);
        assert_eq!(to_binary16(1.0 + 3.0 * p(-11)), 1.0 + 2.0 * p(-10));
        assert_eq!(to_binary16(-(1.0 + 3.0 * p(-11))), -(1.0 + 2.0 * p(-10)));
        // Just above and below a tie.
        assert_eq!(to_binary16(1.0 + p(-11) + p(-20)), 1.0 + p(-10));
        assert_eq!(to_binary16(1.0 + p(-11) - p(-20)), 1.0);
        // Subnormals: multiples of 2⁻²⁴; 2⁻²⁵ ties to 0, 3·2⁻²⁶ rounds up, 3·2⁻²⁵ ties to 2⁻²³.
        assert_eq!(to_binary16(p(-25)), 0.0);
        assert_eq!(to_binary16(3.0 * p(-26)), p(-24));
        assert_eq!(to_binary16(3.0 * p(-25)), p(-23));
        assert_eq!(to_binary16(p(-14) - p(-25)), p(-14)); // 1023.5 ulps: ties to 1024 (even)
        assert_eq!(to_binary16(-p(-30)).to_bits(), (-0.0f32).to_bits());
        // Overflow: 65520 ties between 65504 and 2¹⁶ (even) → inf.
        assert_eq!(to_binary16(65519.0), 65504.0);
        assert_eq!(to_binary16(65520.0), f32::INFINITY);
        assert_eq!(to_binary16(-1e6), f32::NEG_INFINITY);
        assert!(to_binary16(f32::NAN).is_nan());
        // A programmed weight's relative step is at most 2⁻¹¹.
        let v = 0.123_456_79f32;
        assert!(((to_binary16(v) - v) / v).abs() <= p(-11));
    }
}

//! Rotary position embedding (Su et al. 2021, arXiv 2104.09864) with the frequency-scaling variants
//! of transformers' `modeling_rope_utils.py`: default, linear, YaRN (Peng et al. 2023,
//! arXiv 2309.00071) and Llama-3.
//!
//! Two pairings exist: "half" (GPT-NeoX / Llama `rotate_half`: element i pairs with i + d/2) and
//! "interleaved" (DeepSeek-V2 `view_as_complex`: element 2i pairs with 2i + 1).
use std::f64::consts::PI;

use anyhow::{anyhow, bail, Result};
use ndarray::{Array2, ArrayViewMut2, Axis};
use serde::Serialize;

use super::config::{show_number, Fields};

/// Largest `rope_theta` accepted (released checkpoints use 1e4..1e7).
pub const MAX_THETA: f64 = 1e12;

/// Frequency scaling of RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    /// Position interpolation: all frequencies divided by `factor`.
    Linear {
        factor: f64,
    },
    /// YaRN: per-frequency blend of interpolation and extrapolation, plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplies cos and sin (transformers `attention_scaling`).
        attention_factor: f64,
        truncate: bool,
    },
    /// Llama-3 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// RoPE parameters of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RopeConfig {
    /// Base θ of the frequencies `θ^(−2i/d)`.
    pub theta: f64,
    /// Rotated width per head.
    pub dim: usize,
    /// true: pairs (2i, 2i+1) (DeepSeek-V2); false: pairs (i, i + d/2).
    pub interleaved: bool,
    /// Frequency scaling variant.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Reads `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling` (older).
    pub fn from_fields(f: &Fields<'_>, dim: usize, interleaved: bool) -> Result<Self> {
        let params = f
            .object("rope_parameters")
            .or_else(|| f.object("rope_scaling"));
        let theta = match params
            .as_ref()
            .and_then(|p| p.opt_f64("rope_theta").transpose())
        {
            Some(t) => t?,
            None => f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let scaling = match &params {
            None => RopeScaling::None,
            Some(p) => scaling_from(p, f)?,
        };
        Ok(Self {
            theta,
            dim,
            interleaved,
            scaling,
        })
    }

    /// Checks every parameter for the range in which the frequencies are finite and meaningful
    /// (transformers' `rope_config_validation` rules: factors ≥ 1, high > low frequency factor),
    /// naming the field and the allowed range.
    pub fn validate(&self, location: &str) -> Result<()> {
        let check = |field: &str, v: f64, lo: f64, hi: f64| -> Result<()> {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                bail!(
                    "{location}: field `{field}` = {} is out of range (allowed {}..={})",
                    show_number(v),
                    show_number(lo),
                    show_number(hi)
                )
            }
        };
        // θ ≤ 1 makes every frequency 1 or growing and YaRN divides by ln θ.
        if !(self.theta.is_finite() && self.theta > 1.0 && self.theta <= MAX_THETA) {
            bail!(
                "{location}: field `rope_theta` = {} is out of range (allowed > 1 and ≤ {MAX_THETA:e})",
                show_number(self.theta)
            );
        }
        const MAX_FACTOR: f64 = 1e6;
        const MAX_POSITIONS: f64 = 1e9;
        let check_original_positions = |v: f64| {
            check(
                "rope_scaling.original_max_position_embeddings",
                v,
                1.0,
                MAX_POSITIONS,
            )
        };
        match self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                check("rope_scaling.factor", factor, 1.0, MAX_FACTOR)?
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                check("rope_scaling.factor", factor, 1.0, MAX_FACTOR)?;
                check_original_positions(original_max_position_embeddings)?;
                check("rope_scaling.beta_fast", beta_fast, 1e-6, 1e6)?;
                check("rope_scaling.beta_slow", beta_slow, 1e-6, 1e6)?;
                check("rope_scaling.attention_factor", attention_factor, 1e-6, 1e6)?;
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                check("rope_scaling.factor", factor, 1.0, MAX_FACTOR)?;
                check("rope_scaling.low_freq_factor", low_freq_factor, 1e-6, 1e6)?;
                check("rope_scaling.high_freq_factor", high_freq_factor, 1e-6, 1e6)?;
                if high_freq_factor <= low_freq_factor {
                    bail!(
                        "{location}: field `rope_scaling.high_freq_factor` = {high_freq_factor} \
                         must exceed `low_freq_factor` = {low_freq_factor}"
                    );
                }
                check_original_positions(original_max_position_embeddings)?;
            }
        }
        // The table itself must be finite (it is what the forward multiplies by).
        let (freqs, scale) = self.inv_freq();
        if let Some(f) = freqs.iter().find(|f| !f.is_finite()) {
            bail!("{location}: the RoPE parameters give a non-finite frequency ({f})");
        }
        if !scale.is_finite() {
            bail!("{location}: the RoPE parameters give a non-finite attention factor ({scale})");
        }
        Ok(())
    }

    /// Inverse frequencies (length dim/2) and the cos/sin multiplier.
    pub fn inv_freq(&self) -> (Vec<f64>, f64) {
        let d = self.dim as f64;
        let base: Vec<f64> = (0..self.dim / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / d))
            .collect();
        match self.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let correction = |rotations: f64| {
                    d * (orig / (rotations * 2.0 * PI)).ln() / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                let freqs = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolated)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        extrapolated / factor * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                (freqs, attention_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let freqs = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
        }
    }

    /// cos and sin tables `[positions, dim/2]`, already multiplied by the attention factor.
    pub fn table(&self, positions: usize) -> RopeTable {
        let (freqs, scale) = self.inv_freq();
        // transformers computes inv_freq and the angles in f32; mirror that rounding.
        let freqs: Vec<f32> = freqs.iter().map(|&f| f as f32).collect();
        let mut cos = Array2::zeros((positions, freqs.len()));
        let mut sin = Array2::zeros((positions, freqs.len()));
        for p in 0..positions {
            for (i, &f) in freqs.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                cos[[p, i]] = (angle.cos() * scale) as f32;
                sin[[p, i]] = (angle.sin() * scale) as f32;
            }
        }
        RopeTable {
            cos,
            sin,
            interleaved: self.interleaved,
        }
    }
}

fn scaling_from(p: &Fields<'_>, top: &Fields<'_>) -> Result<RopeScaling> {
    let kind = match p.opt_str("rope_type")? {
        Some(k) => k,
        None => p.opt_str("type")?.unwrap_or("default"),
    };
    let factor = || {
        p.opt_f64("factor")?
            .ok_or_else(|| anyhow!("{}: rope scaling `{kind}` needs field `factor`", p.location))
    };
    let original = || -> Result<f64> {
        match p.opt_f64("original_max_position_embeddings")? {
            Some(v) => Ok(v),
            None => top
                .opt_f64("max_position_embeddings")?
                .ok_or_else(|| anyhow!("{}: field `max_position_embeddings` missing", p.location)),
        }
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "yarn" => {
            let factor = factor()?;
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match p.opt_f64("attention_factor")? {
                Some(a) => a,
                None => match (p.opt_f64("mscale")?, p.opt_f64("mscale_all_dim")?) {
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale(factor, m) / mscale(factor, all)
                    }
                    _ => mscale(factor, 1.0),
                },
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original()?,
                beta_fast: p
                    .opt_f64("beta_fast")?
                    .filter(|b| *b != 0.0)
                    .unwrap_or(32.0),
                beta_slow: p.opt_f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                attention_factor,
                truncate: p.opt_bool("truncate")?.unwrap_or(true),
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: p.opt_f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: p.opt_f64("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: original()?,
        },
        other => bail!(
            "{}: rope type `{other}` is not supported (default, linear, yarn, llama3)",
            p.location
        ),
    })
}

/// Precomputed cos/sin for positions `0..n`.
pub struct RopeTable {
    cos: Array2<f32>,
    sin: Array2<f32>,
    interleaved: bool,
}

impl RopeTable {
    /// cos of position p and frequency i at `[p, i]` (`[positions, rotated width / 2]`).
    pub fn cos(&self) -> ndarray::ArrayView2<'_, f32> {
        self.cos.view()
    }

    /// sin, laid out as [`RopeTable::cos`].
    pub fn sin(&self) -> ndarray::ArrayView2<'_, f32> {
        self.sin.view()
    }

    /// Whether pairs are (2i, 2i + 1) (DeepSeek-V2) rather than (i, i + d/2).
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Rotates `x` (`[positions, heads·head_width]`) in place: for each head, the slice
    /// `[offset, offset + dim)` of its `head_width` columns, row r at position r.
    pub fn apply(&self, mut x: ArrayViewMut2<'_, f32>, head_width: usize, offset: usize) {
        let half = self.cos.ncols();
        let heads = x.ncols() / head_width;
        for (p, mut row) in x.axis_iter_mut(Axis(0)).enumerate() {
            let (cos, sin) = (self.cos.row(p), self.sin.row(p));
            for h in 0..heads {
                let base = h * head_width + offset;
                for i in 0..half {
                    let (a, b) = if self.interleaved {
                        (base + 2 * i, base + 2 * i + 1)
                    } else {
                        (base + i, base + i + half)
                    };
                    let (x0, x1) = (row[a], row[b]);
                    row[a] = x0 * cos[i] - x1 * sin[i];
                    row[b] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn config(interleaved: bool) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            dim: 4,
            interleaved,
            scaling: RopeScaling::None,
        }
    }

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        for interleaved in [false, true] {
            let table = config(interleaved).table(3);
            let mut x = array![
                [1.0f32, 2.0, 3.0, 4.0],
                [1.0, 2.0, 3.0, 4.0],
                [1.0, 2.0, 3.0, 4.0]
            ];
            table.apply(x.view_mut(), 4, 0);
            assert_eq!(x.row(0).to_vec(), vec![1.0, 2.0, 3.0, 4.0]);
            let norm: f32 = x.row(2).iter().map(|v| v * v).sum();
            assert!((norm - 30.0).abs() < 1e-4);
        }
    }

    #[test]
    fn half_pairing_rotates_first_pair_by_position_angle() {
        // freq_0 = 1: at position 1, (x0, x2) rotates by 1 rad.
        let table = config(false).table(2);
        let mut x = array![[0.0f32; 4], [1.0, 0.0, 0.0, 0.0]];
        table.apply(x.view_mut(), 4, 0);
        assert!((x[[1, 0]] - 1f32.cos()).abs() < 1e-6);
        assert!((x[[1, 2]] - 1f32.sin()).abs() < 1e-6);
        let table = config(true).table(2);
        let mut x = array![[0.0f32; 4], [1.0, 0.0, 0.0, 0.0]];
        table.apply(x.view_mut(), 4, 0);
        assert!((x[[1, 1]] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn yarn_keeps_fast_dims_interpolates_slow_dims_and_ramps_between() {
        // dim 16, θ 1e4, original context 64, β 32/1: correction range [0, 3] (floor/ceil of
        // −0.99 and 2.02), so dim pair 0 extrapolates, pairs ≥ 3 interpolate (÷ factor).
        let c = RopeConfig {
            theta: 10_000.0,
            dim: 16,
            interleaved: false,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 64.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
                truncate: true,
            },
        };
        let base = RopeConfig {
            scaling: RopeScaling::None,
            ..c
        }
        .inv_freq()
        .0;
        let (f, scale) = c.inv_freq();
        assert_eq!(f[0], base[0]);
        let keep = 2.0 / 3.0;
        assert!((f[1] - (base[1] * keep + base[1] / 4.0 * (1.0 - keep))).abs() < 1e-15);
        for i in 3..8 {
            assert!((f[i] - base[i] / 4.0).abs() < 1e-15);
        }
        assert!((scale - 1.138_629_436).abs() < 1e-9);
    }

    #[test]
    fn llama3_scaling_splits_by_wavelength() {
        let c = RopeConfig {
            theta: 10_000.0,
            dim: 16,
            interleaved: false,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        };
        let base = RopeConfig {
            scaling: RopeScaling::None,
            ..c
        }
        .inv_freq()
        .0;
        let f = c.inv_freq().0;
        for (i, (&b, &x)) in base.iter().zip(&f).enumerate() {
            let wavelen = 2.0 * PI / b;
            if wavelen < 16.0 {
                assert_eq!(x, b, "pair {i}");
            } else if wavelen > 64.0 {
                assert!((x - b / 8.0).abs() < 1e-15, "pair {i}");
            } else {
                assert!(x < b && x > b / 8.0, "pair {i}");
            }
        }
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let mut c = config(false);
        c.scaling = RopeScaling::Linear { factor: 4.0 };
        let (f, s) = c.inv_freq();
        assert_eq!(f, vec![0.25, 0.01 / 4.0]);
        assert_eq!(s, 1.0);
    }
}

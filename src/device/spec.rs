//! Serialisable device choice of a tile preset (`"device": {...}` in `tiles/*.json`).
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Device, DriftTable, Ideal, PcmLike, ReramCmo};
use crate::tile::FieldError;

/// Which device technology a preset uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// AIHWKIT `PCMLikeNoiseModel` ([`PcmLike::aihwkit`]).
    Pcm,
    /// AIHWKIT `HermesNoiseModel`, two devices per weight ([`PcmLike::hermes`]).
    Hermes,
    /// AIHWKIT `StateIndependentNoiseModel` ([`PcmLike::state_independent`]).
    StateIndependent,
    /// PCM with a drift table ([`PcmLike::custom_drift`]); needs `drift_table`.
    CustomDrift,
    /// AIHWKIT `ReRamCMONoiseModel` ([`ReramCmo`]).
    ReramCmo,
    /// Noise-free device ([`Ideal`]).
    Ideal,
}

/// The kind as a preset spells it (`pcm`, `reram_cmo`, …), for messages a person reads.
impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Pcm => "pcm",
            DeviceKind::Hermes => "hermes",
            DeviceKind::StateIndependent => "state_independent",
            DeviceKind::CustomDrift => "custom_drift",
            DeviceKind::ReramCmo => "reram_cmo",
            DeviceKind::Ideal => "ideal",
        })
    }
}

/// `"device"` section: a kind plus optional overrides of its published defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Device technology.
    pub kind: DeviceKind,
    /// Override of the largest conductance, µS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub g_max_us: Option<f32>,
    /// Override of the drift reference time t₀, s (PCM family only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t0_seconds: Option<f64>,
    /// Override of the read pulse width t_read, s (PCM family only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_read_seconds: Option<f64>,
    /// Multiplier of the programming noise (dimensionless, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prog_noise_scale: Option<f32>,
    /// Multiplier of the read noise (dimensionless, default 1; PCM family only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_noise_scale: Option<f32>,
    /// Multiplier of the drift exponent (dimensionless, default 1; PCM family only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_scale: Option<f32>,
    /// Drift table (µS, ν mean, ν std), required by `custom_drift` and only allowed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_table: Option<DriftTable>,
}

impl DeviceSpec {
    /// A spec of `kind` with all defaults.
    pub fn of_kind(kind: DeviceKind) -> Self {
        Self {
            kind,
            g_max_us: None,
            t0_seconds: None,
            t_read_seconds: None,
            prog_noise_scale: None,
            read_noise_scale: None,
            drift_scale: None,
            drift_table: None,
        }
    }

    /// Check every field; the error names the field relative to `device.`.
    pub fn validate(&self) -> Result<(), FieldError> {
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(FieldError::new(
                format!("device.{name}"),
                format!("must be a finite number > 0, got {x}"),
            )),
            _ => Ok(()),
        };
        let non_negative = |name: &str, v: Option<f32>| match v {
            Some(x) if !(x.is_finite() && x >= 0.0) => Err(FieldError::new(
                format!("device.{name}"),
                format!("must be a finite number ≥ 0, got {x}"),
            )),
            _ => Ok(()),
        };
        positive("g_max_us", self.g_max_us.map(f64::from))?;
        positive("t0_seconds", self.t0_seconds)?;
        positive("t_read_seconds", self.t_read_seconds)?;
        non_negative("prog_noise_scale", self.prog_noise_scale)?;
        non_negative("read_noise_scale", self.read_noise_scale)?;
        non_negative("drift_scale", self.drift_scale)?;
        let pcm_family = matches!(
            self.kind,
            DeviceKind::Pcm
                | DeviceKind::Hermes
                | DeviceKind::StateIndependent
                | DeviceKind::CustomDrift
        );
        if !pcm_family {
            for (name, set) in [
                ("t0_seconds", self.t0_seconds.is_some()),
                ("t_read_seconds", self.t_read_seconds.is_some()),
                ("read_noise_scale", self.read_noise_scale.is_some()),
                ("drift_scale", self.drift_scale.is_some()),
            ] {
                if set {
                    return Err(FieldError::new(
                        format!("device.{name}"),
                        format!("not a parameter of device kind `{}`", self.kind),
                    ));
                }
            }
        }
        if let (DeviceKind::ReramCmo, Some(g)) = (self.kind, self.g_max_us) {
            if g <= ReramCmo::default().g_min_us {
                return Err(FieldError::new(
                    "device.g_max_us",
                    "must exceed g_min (9 µS)",
                ));
            }
        }
        match (&self.kind, &self.drift_table) {
            (DeviceKind::CustomDrift, None) => Err(FieldError::new(
                "device.drift_table",
                "required for kind custom_drift",
            )),
            (DeviceKind::CustomDrift, Some(t)) => validate_table(t),
            (_, Some(_)) => Err(FieldError::new(
                "device.drift_table",
                "only allowed for kind custom_drift",
            )),
            (_, None) => Ok(()),
        }
    }

    /// The PCM-family model of this spec with its overrides applied, `None` for other kinds
    /// (the CUDA backend reads its parameters; call [`DeviceSpec::validate`] first).
    pub fn pcm_like(&self) -> Option<PcmLike> {
        let mut d = match self.kind {
            DeviceKind::Pcm => PcmLike::aihwkit(),
            DeviceKind::Hermes => PcmLike::hermes(),
            DeviceKind::StateIndependent => PcmLike::state_independent(),
            DeviceKind::CustomDrift => PcmLike::custom_drift(
                self.drift_table
                    .clone()
                    .expect("validated: custom_drift has a table"),
            ),
            DeviceKind::ReramCmo | DeviceKind::Ideal => return None,
        };
        if let Some(g) = self.g_max_us {
            d.g_max_us = g;
        }
        if let Some(t) = self.t0_seconds {
            d.t0_seconds = t;
        }
        if let Some(t) = self.t_read_seconds {
            d.t_read_seconds = t;
        }
        d.prog_noise_scale = self.prog_noise_scale.unwrap_or(1.0);
        d.read_noise_scale = self.read_noise_scale.unwrap_or(1.0);
        d.drift_scale = self.drift_scale.unwrap_or(1.0);
        Some(d)
    }

    /// Build the device model (call [`DeviceSpec::validate`] first).
    pub fn build(&self) -> Arc<dyn Device> {
        if let Some(pcm) = self.pcm_like() {
            return Arc::new(pcm);
        }
        match self.kind {
            DeviceKind::ReramCmo => {
                let mut d = ReramCmo::default();
                if let Some(g) = self.g_max_us {
                    d.g_max_us = g;
                }
                d.prog_noise_scale = self.prog_noise_scale.unwrap_or(1.0);
                Arc::new(d)
            }
            DeviceKind::Ideal => Arc::new(Ideal {
                g_max_us: self.g_max_us.unwrap_or(Ideal::default().g_max_us),
            }),
            _ => unreachable!("PCM-family kinds return above"),
        }
    }
}

fn validate_table(t: &DriftTable) -> Result<(), FieldError> {
    let n = t.g_us.len();
    if n < 2 {
        return Err(FieldError::new(
            "device.drift_table.g_us",
            "needs at least 2 points",
        ));
    }
    for (name, len) in [("nu_mean", t.nu_mean.len()), ("nu_std", t.nu_std.len())] {
        if len != n {
            return Err(FieldError::new(
                format!("device.drift_table.{name}"),
                format!("has {len} values, g_us has {n}"),
            ));
        }
    }
    if t.g_us.iter().any(|g| !(g.is_finite() && *g >= 0.0))
        || t.g_us.windows(2).any(|w| w[1] <= w[0])
    {
        return Err(FieldError::new(
            "device.drift_table.g_us",
            "must be finite, ≥ 0 and strictly ascending",
        ));
    }
    for (name, v) in [("nu_mean", &t.nu_mean), ("nu_std", &t.nu_std)] {
        if v.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(FieldError::new(
                format!("device.drift_table.{name}"),
                "values must be finite and ≥ 0",
            ));
        }
    }
    Ok(())
}

//! Memory-device physics as pure functions of standard normals ξ (docs/model.md §2).
//!
//! Every stochastic quantity takes its ξ as an argument instead of drawing it, so the CPU and
//! GPU backends share one random stream ([`crate::rng`]) and one formula. A new technology
//! implements [`Device`] (five short methods) and plugs into [`crate::tile::Crossbar`] unchanged.
//!
//! Conductances are in µS, times in seconds (docs/model.md §1 conventions).

mod converter;
mod ideal;
mod pcm;
mod reram;
mod spec;

pub use converter::WeightConverter;
pub use ideal::Ideal;
pub use pcm::{DriftModel, DriftTable, PcmLike, ReadNoiseModel};
pub use reram::ReramCmo;
pub use spec::{DeviceKind, DeviceSpec};

/// A programmable analog memory device (one conductance), modelled statistically.
///
/// The lifecycle mirrors AIHWKIT's `BaseNoiseModel`: a target conductance g_T is programmed once
/// ([`Device::program`]) and gets a per-device drift parameter ([`Device::drift_exponent`]); at
/// inference time t the conductance is read with drift and accumulated 1/f noise
/// ([`Device::read`]).
pub trait Device: Send + Sync + std::fmt::Debug {
    /// Short name used in reports (`"pcm"`, `"hermes"`, ...).
    fn name(&self) -> &str;

    /// Largest programmable conductance in µS; the weight of largest magnitude maps to it.
    fn g_max_us(&self) -> f32;

    /// Smallest conductance in µS (0 for PCM; a floor for ReRAM).
    fn g_min_us(&self) -> f32 {
        0.0
    }

    /// `true`: a weight is a differential pair g⁺ − g⁻ (PCM); `false`: one device per weight,
    /// mapped linearly onto [g_min, g_max] (ReRAM CMO). Selects the [`WeightConverter`].
    fn differential(&self) -> bool {
        true
    }

    /// Programmed conductance g_P (µS) for a target g_T (µS) and a standard normal ξ.
    fn program(&self, g_target_us: f32, xi: f32) -> f32;

    /// Per-device drift parameter drawn once at programming from the *target* conductance
    /// (the drift exponent ν for PCM; ReRAM stores g_T itself, as AIHWKIT does).
    fn drift_exponent(&self, g_target_us: f32, xi: f32) -> f32;

    /// Conductance (µS) read `t_inference_s` seconds after programming: drift plus accumulated
    /// 1/f read noise, drawn with ξ once per drift time.
    fn read(&self, g_prog_us: f32, nu: f32, t_inference_s: f64, xi: f32) -> f32;
}

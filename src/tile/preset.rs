//! Tile presets: `tiles/*.json`, validated on load (docs/model.md §3, §4).
//!
//! A preset fixes everything about one kind of tile: the device technology, the weight mapping,
//! the crossbar periphery (noise management, DAC, IR drop, short-term weight noise, output noise,
//! ADC, bound management), drift compensation and the 3D stack geometry. Every dimensioned field
//! carries its unit in its name or doc; normalised quantities are dimensionless (docs/model.md §1).
//! The optional `cost` section ([`crate::energy::CostModel`]) holds the hardware cost constants `aimc energy`
//! needs, each with its unit and source; presets without it load as before.
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::DeviceSpec;
use crate::energy::CostModel;

/// A validation problem at a dotted field path (`periphery.adc.bits`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a preset could not be loaded. Every variant names its origin (file path or built-in).
#[derive(Debug, Error)]
pub enum PresetError {
    /// The file could not be read.
    #[error("{origin}: cannot read preset: {source}")]
    Io {
        /// File path.
        origin: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The JSON is malformed, has an unknown field, or a value of the wrong type.
    #[error("{origin}: field `{field}`: {message}")]
    Parse {
        /// File path or `builtin:<name>`.
        origin: String,
        /// Dotted field path (`.` for the document itself).
        field: String,
        /// Parser message.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        /// File path or `builtin:<name>`.
        origin: String,
        /// Dotted field path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Neither a built-in preset name nor an existing file.
    #[error("no preset named `{name}` and no such file (built-in presets: {known})")]
    NotFound {
        /// What the user asked for.
        name: String,
        /// Comma-separated built-in names.
        known: String,
    },
}

impl PresetError {
    /// The dotted field path, where the error concerns one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Parse { field, .. } | Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Input noise management: the per-vector scale α_nm the DAC input is divided by (docs/model.md §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NoiseManagement {
    /// α_nm = max_j |x_j| per input vector (AIHWKIT `NoiseManagementType.ABS_MAX`).
    AbsMax,
    /// α_nm = `value` for every vector (a fixed, e.g. learned, input range).
    Constant {
        /// Input range, in input units (> 0).
        value: f32,
    },
    /// α_nm = 1.
    None,
}

/// A uniform quantiser with `2^bits − 1` levels over [−bound, bound]: step Δ = 2·bound/(2^bits − 2)
/// (AIHWKIT `inp_res`/`out_res` = 1/(2^bits − 2) of the full range; docs/model.md §3.2, §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantizer {
    /// Resolution in bits (2..=16).
    pub bits: u32,
    /// Clamp bound b, in normalised units (DAC: input units, 1 = full scale; ADC: output units).
    pub bound: f32,
}

impl Quantizer {
    /// Quantisation step Δ = 2·b/(2^bits − 2).
    pub fn step(&self) -> f32 {
        2.0 * self.bound / ((1u64 << self.bits) - 2) as f32
    }

    /// Whether the bound b is itself an output level in f32: rint(b/Δ)·Δ rounds to b
    /// (`step` = [`Quantizer::step`]). Then [`Quantizer::quantize`] is the quantiser of v
    /// clamped to [−b, b] first, with no clamp after: v/Δ, rint and ·Δ are monotonic, so no
    /// |v| ≤ b leaves [−b, b], and every |v| ≥ b lands on ±b either way. The GPU's ADC uses
    /// this to drop one clamp per output (`MOE_ADC_BOUND_LEVEL` in `kernels/periphery.cuh`).
    pub fn bound_is_a_level(&self, step: f32) -> bool {
        bound_is_a_level(step, self.bound)
    }

    /// clamp(rint(v/Δ)·Δ, −b, b) with half-to-even rounding (`step` = [`Quantizer::step`]).
    ///
    /// v/Δ is first limited to ±2²¹ levels, which changes nothing (bits ≤ 16 puts the bound
    /// below 2¹⁵ levels) and lets [`rint`] run branch-free.
    #[inline]
    pub fn quantize(&self, v: f32, step: f32) -> f32 {
        const LIMIT: f32 = 2_097_152.0; // 2²¹
        (rint((v / step).clamp(-LIMIT, LIMIT)) * step).clamp(-self.bound, self.bound)
    }
}

/// [`Quantizer::bound_is_a_level`] for a quantiser of step `step` and bound `bound`.
pub fn bound_is_a_level(step: f32, bound: f32) -> bool {
    step > 0.0
        && bound.is_finite()
        && (bound / step) < 2_097_152.0
        && rint(bound / step) * step == bound
}

/// `v / step` as IEEE division rounds it, from `inv`, the correctly rounded `1 / step`: what
/// the GPU's ADC computes (`adc_quotient` in `kernels/periphery.cuh`) instead of a division,
/// whose slow-path check and branch it spent in every output.
///
/// q₀ = v·inv is within 2 ulp of v/step; each step q += (v − step·q)·inv (the residual exact by
/// the fused multiply-add) moves q to the correctly rounded quotient once it is within 1 ulp
/// (Markstein's theorem), and two steps get there from q₀. Valid where no intermediate
/// overflows or lands in the subnormal range; the kernel first limits v (see there).
#[inline]
pub fn quotient_by_reciprocal(v: f32, step: f32, inv: f32) -> f32 {
    let q0 = v * inv;
    let q1 = (-step).mul_add(q0, v).mul_add(inv, q0);
    (-step).mul_add(q1, v).mul_add(inv, q1)
}

/// Round to nearest, ties to even (IEEE `rint`, CUDA `rintf`), valid for |v| < 2²²: adding and
/// subtracting 1.5·2²³ rounds exactly in the default rounding mode and avoids a libm call on
/// x86-64 targets without SSE4.1. Callers must bound |v| first ([`Quantizer::quantize`] does).
#[inline]
pub fn rint(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³
    debug_assert!(
        v.is_nan() || v.abs() < 4_194_304.0,
        "rint({v}) out of range"
    );
    (v + MAGIC) - MAGIC
}

/// Short-term (per-MVM) weight noise (docs/model.md §3.5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WeightNoise {
    /// No short-term weight noise.
    None,
    /// y_i += std·√(Σ_j |W̃_ij| x̃_j²)·ξ_i (AIHWKIT `WeightNoiseType.PCM_READ`).
    PcmRead {
        /// Relative noise std (dimensionless, Rasch et al. 2023: 0.0175).
        std: f32,
    },
    /// y_i += std·‖x̃‖₂·ξ_i (AIHWKIT `WeightNoiseType.ADDITIVE_CONSTANT`).
    Additive {
        /// Noise std in normalised weight units.
        std: f32,
    },
}

/// AIHWKIT's static IR-drop model (docs/model.md §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrDrop {
    /// Scale of the IR-drop correction (dimensionless; AIHWKIT `ir_drop`, 1.0 in Rasch 2023).
    pub scale: f32,
    /// Wire-to-device conductance ratio g_wire/g_max (dimensionless; AIHWKIT 571428.6).
    pub g_ratio: f32,
}

/// Iterative bound management (docs/model.md §3.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundManagement {
    /// Saturated outputs stay clamped.
    None,
    /// Rows whose output hit the ADC bound are redone with the input halved (β×2), fresh noise,
    /// until unsaturated or β > 0.25/Δ_in (AIHWKIT `BoundManagementType.ITERATIVE`).
    Iterative,
}

/// Global drift compensation (docs/model.md §2, AIHWKIT `GlobalDriftCompensation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftCompensation {
    /// Outputs are not rescaled.
    None,
    /// One α per block: ref = mean|Y₀| of the noisy identity forward after programming.
    Global,
    /// One α per output column, same reference procedure.
    GlobalPerColumn,
    /// One α per block from noise-free quantities: ref = mean|W̃_target|, readout mean|W̃(t)|
    /// (an oracle bound on what GDC can achieve).
    GlobalExact,
}

/// Weight → normalised block weights (docs/model.md §3 "Mapping scale").
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    /// ω: the largest |w| of a block (or column) maps to ω in normalised units (> 0).
    pub weight_scaling_omega: f32,
    /// One mapping scale per output column instead of one per block.
    pub per_column: bool,
}

/// The periphery shared by all tiers of a stack (docs/model.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeripherySpec {
    /// Input scaling before the DAC.
    pub noise_management: NoiseManagement,
    /// Input DAC; `null` = ideal (no quantisation, no clamp).
    pub dac: Option<Quantizer>,
    /// Output ADC; `null` = ideal.
    pub adc: Option<Quantizer>,
    /// Std of the additive output noise, normalised output units, fresh every MVM (≥ 0).
    pub out_noise: f32,
    /// Short-term weight noise.
    pub w_noise: WeightNoise,
    /// IR drop; `null` = none.
    pub ir_drop: Option<IrDrop>,
    /// Bound management.
    pub bound_management: BoundManagement,
}

/// Largest input down-scaling β that iterative bound management may still double when there is
/// no DAC (with one the limit is 0.25/Δ_in).
const BM_MAX_BETA_NO_DAC: f32 = 256.0;

impl PeripherySpec {
    /// Step 8 of docs/model.md §3: `Some(limit)` when iterative bound management is on (it needs an
    /// ADC to detect saturation); a saturated row is redone at 2β while β ≤ limit.
    pub fn bm_beta_limit(&self) -> Option<f32> {
        (self.bound_management == BoundManagement::Iterative && self.adc.is_some())
            .then(|| self.dac.map_or(BM_MAX_BETA_NO_DAC, |d| 0.25 / d.step()))
    }
}

/// 3D geometry: a stack is T tiers of R×C crossbars sharing one periphery (docs/model.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    /// Crossbar rows R = inputs per block (≥ 1).
    pub rows: usize,
    /// Crossbar columns C = outputs per block (≥ 1).
    pub cols: usize,
    /// Tiers T per stack, one active at a time (≥ 1; 1 = planar tile).
    pub tiers_per_stack: usize,
    /// Stacks per chip (≥ 1).
    pub stacks: usize,
}

/// One tile preset (`tiles/<name>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilePreset {
    /// Preset name (kebab-case, equals the file stem of the built-in).
    pub name: String,
    /// One-line description shown by `aimc presets`.
    pub description: String,
    /// Where the numbers come from (papers, AIHWKIT classes).
    #[serde(default)]
    pub source: String,
    /// Device technology.
    pub device: DeviceSpec,
    /// Weight mapping.
    pub mapping: MappingSpec,
    /// Crossbar periphery.
    pub periphery: PeripherySpec,
    /// Drift compensation.
    pub drift_compensation: DriftCompensation,
    /// Stack geometry.
    pub stack: StackSpec,
    /// Hardware cost model (time, energy, digital units, interconnect, off-chip memory); `None` = not costed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostModel>,
}

/// Built-in presets, embedded so the binary works anywhere.
const BUILTIN: &[(&str, &str)] = &[
    (
        "aihwkit-default",
        include_str!("../../tiles/aihwkit-default.json"),
    ),
    (
        "standard-hwa",
        include_str!("../../tiles/standard-hwa.json"),
    ),
    ("hermes", include_str!("../../tiles/hermes.json")),
    ("ideal", include_str!("../../tiles/ideal.json")),
    (
        "pcm-3d-8tier",
        include_str!("../../tiles/pcm-3d-8tier.json"),
    ),
    ("reram-cmo", include_str!("../../tiles/reram-cmo.json")),
    ("aimc-3d", include_str!("../../tiles/aimc-3d.json")),
    ("3dsim", include_str!("../../tiles/3dsim.json")),
    ("buchel2025", include_str!("../../tiles/buchel2025.json")),
];

impl TilePreset {
    /// Parse and validate preset JSON; `origin` (a path or `builtin:<name>`) prefixes errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, PresetError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let preset: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            PresetError::Parse {
                origin: origin.to_string(),
                field,
                message: e.into_inner().to_string(),
            }
        })?;
        reject_unknown_fields(text, &preset).map_err(|field| PresetError::Parse {
            origin: origin.to_string(),
            message: format!(
                "unknown field `{}`",
                field.rsplit('.').next().unwrap_or(&field)
            ),
            field,
        })?;
        preset.validate().map_err(|e| PresetError::Invalid {
            origin: origin.to_string(),
            field: e.field,
            message: e.message,
        })?;
        Ok(preset)
    }

    /// Load and validate a preset file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PresetError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        // Only a regular file of sane size is read: `/dev/zero` would be read forever and a FIFO
        // would block.
        let io = |source| PresetError::Io {
            origin: origin.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(PresetError::Parse {
                origin: origin.clone(),
                field: ".".into(),
                message: "not a regular file".into(),
            });
        }
        if meta.len() > MAX_PRESET_BYTES {
            return Err(PresetError::Parse {
                origin: origin.clone(),
                field: ".".into(),
                message: format!(
                    "{} bytes is too large for a preset (at most {MAX_PRESET_BYTES})",
                    meta.len()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::from_json_str(&text, &origin)
    }

    /// Names of the built-in presets, in listing order.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(name, _)| *name).collect()
    }

    /// A built-in preset by name.
    pub fn builtin(name: &str) -> Result<Self, PresetError> {
        let (_, text) =
            BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| PresetError::NotFound {
                    name: name.to_string(),
                    known: Self::builtin_names().join(", "),
                })?;
        Self::from_json_str(text, &format!("builtin:{name}"))
    }

    /// A built-in name (`standard-hwa`), or a path to a JSON file (`tiles/x.json`).
    pub fn resolve(name_or_path: &str) -> Result<Self, PresetError> {
        if BUILTIN.iter().any(|(n, _)| *n == name_or_path) {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            return Self::load(path);
        }
        Err(PresetError::NotFound {
            name: name_or_path.to_string(),
            known: Self::builtin_names().join(", "),
        })
    }

    /// Check every range constraint; the error names the dotted field path.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.name.trim().is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        self.device.validate()?;
        self.validate_device_ranges()?;
        finite_positive(
            "mapping.weight_scaling_omega",
            self.mapping.weight_scaling_omega,
        )?;
        in_range(
            "mapping.weight_scaling_omega",
            self.mapping.weight_scaling_omega.into(),
            OMEGA_RANGE,
        )?;
        let p = &self.periphery;
        if let NoiseManagement::Constant { value } = p.noise_management {
            finite_positive("periphery.noise_management.value", value)?;
            in_range(
                "periphery.noise_management.value",
                value.into(),
                SCALE_RANGE,
            )?;
        }
        for (name, q) in [("dac", p.dac), ("adc", p.adc)] {
            if let Some(q) = q {
                if !(2..=16).contains(&q.bits) {
                    return Err(FieldError::new(
                        format!("periphery.{name}.bits"),
                        format!("resolution must be 2..=16 bits, got {}", q.bits),
                    ));
                }
                finite_positive(&format!("periphery.{name}.bound"), q.bound)?;
                in_range(
                    &format!("periphery.{name}.bound"),
                    q.bound.into(),
                    SCALE_RANGE,
                )?;
            }
        }
        finite_non_negative("periphery.out_noise", p.out_noise)?;
        in_range("periphery.out_noise", p.out_noise.into(), NOISE_RANGE)?;
        match p.w_noise {
            WeightNoise::PcmRead { std } | WeightNoise::Additive { std } => {
                finite_non_negative("periphery.w_noise.std", std)?;
                in_range("periphery.w_noise.std", std.into(), NOISE_RANGE)?;
            }
            WeightNoise::None => {}
        }
        if let Some(ir) = p.ir_drop {
            finite_non_negative("periphery.ir_drop.scale", ir.scale)?;
            finite_positive("periphery.ir_drop.g_ratio", ir.g_ratio)?;
            in_range("periphery.ir_drop.scale", ir.scale.into(), NOISE_RANGE)?;
            in_range(
                "periphery.ir_drop.g_ratio",
                ir.g_ratio.into(),
                G_RATIO_RANGE,
            )?;
        }
        if p.bound_management == BoundManagement::Iterative && p.adc.is_none() {
            return Err(FieldError::new(
                "periphery.bound_management",
                "iterative bound management needs an ADC (periphery.adc)",
            ));
        }
        let s = &self.stack;
        for (name, v) in [
            ("stack.rows", s.rows),
            ("stack.cols", s.cols),
            ("stack.tiers_per_stack", s.tiers_per_stack),
            ("stack.stacks", s.stacks),
        ] {
            if v == 0 {
                return Err(FieldError::new(name, "must be ≥ 1"));
            }
        }
        for (name, v, max) in [
            ("stack.rows", s.rows, MAX_CROSSBAR_SIDE),
            ("stack.cols", s.cols, MAX_CROSSBAR_SIDE),
            ("stack.tiers_per_stack", s.tiers_per_stack, MAX_TIERS),
            ("stack.stacks", s.stacks, MAX_STACKS),
        ] {
            if v > max {
                return Err(FieldError::new(
                    name,
                    format!("{v} is out of range (allowed 1..={max})"),
                ));
            }
        }
        // Every capacity product of the mapping (cells per tier, per stack, per chip) must be
        // exact; with the bounds above it is, and this says so where it is needed.
        [s.cols, s.tiers_per_stack, s.stacks]
            .iter()
            .try_fold(s.rows, |a, &b| a.checked_mul(b))
            .ok_or_else(|| FieldError::new("stack", "rows × cols × tiers × stacks overflows"))?;
        if let Some(cost) = &self.cost {
            cost.validate()?;
        }
        Ok(())
    }
}

/// Largest preset file read (presets are a few kB; a drift table of thousands of points fits).
const MAX_PRESET_BYTES: u64 = 64 << 20;

/// Largest crossbar side (rows or columns) accepted: real arrays are ≤ 4096; the bound keeps
/// every cell count exact in f32 statistics and usize products.
pub const MAX_CROSSBAR_SIDE: usize = 1 << 16;
/// Largest tier count per stack accepted.
pub const MAX_TIERS: usize = 1 << 10;
/// Largest stack count per chip accepted.
pub const MAX_STACKS: usize = 1 << 24;
/// Accepted ω (normalised units): beyond these the mapping scale max|w|/ω leaves f32's exact range.
const OMEGA_RANGE: (f64, f64) = (1e-6, 1e6);
/// Accepted input/output bounds and fixed input ranges (normalised units).
const SCALE_RANGE: (f64, f64) = (1e-6, 1e6);
/// Accepted noise std's and IR-drop scale (normalised units): far above any measured device, far
/// below where squared sums overflow f32.
const NOISE_RANGE: (f64, f64) = (0.0, 1e3);
/// Accepted g_wire/g_max ratios: below 1 the wires conduct worse than one device and the IR-drop
/// correction diverges (AIHWKIT's default is 571428.6).
const G_RATIO_RANGE: (f64, f64) = (1.0, 1e15);
/// Accepted device conductance, µS.
const G_MAX_US_RANGE: (f64, f64) = (1e-6, 1e6);
/// Accepted device times (t0, read duration), seconds.
const DEVICE_TIME_RANGE: (f64, f64) = (1e-12, 1e12);
/// Accepted device noise and drift scales (dimensionless multipliers).
const DEVICE_SCALE_RANGE: (f64, f64) = (0.0, 1e3);

impl TilePreset {
    /// Range checks of the device parameters that keep the programmed conductances and their
    /// drift finite (the kind-specific rules are in [`DeviceSpec::validate`]).
    fn validate_device_ranges(&self) -> Result<(), FieldError> {
        let d = &self.device;
        if let Some(g) = d.g_max_us {
            in_range("device.g_max_us", g.into(), G_MAX_US_RANGE)?;
        }
        for (name, v) in [
            ("t0_seconds", d.t0_seconds),
            ("t_read_seconds", d.t_read_seconds),
        ] {
            if let Some(v) = v {
                in_range(&format!("device.{name}"), v, DEVICE_TIME_RANGE)?;
            }
        }
        for (name, v) in [
            ("prog_noise_scale", d.prog_noise_scale),
            ("read_noise_scale", d.read_noise_scale),
            ("drift_scale", d.drift_scale),
        ] {
            if let Some(v) = v {
                in_range(&format!("device.{name}"), v.into(), DEVICE_SCALE_RANGE)?;
            }
        }
        Ok(())
    }
}

/// A number as a person reads it: plain when moderate, exponent form when huge or tiny.
fn show(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e15).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// `v` within `[lo, hi]` (finite), else an error naming the field, the value and the range.
fn in_range(field: &str, v: f64, (lo, hi): (f64, f64)) -> Result<(), FieldError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{} is out of range (allowed {lo:e}..={hi:e})", show(v)),
        ))
    }
}

/// The first key of `text` (a preset's JSON) that the parsed `preset` does not hold, as a dotted
/// path. serde's `deny_unknown_fields` does not see keys beside the tag of an internally tagged
/// enum (`{"kind": "none", "std": 5}`), so every key is checked against the preset serialised
/// back: a key that does not come back was ignored. `null` values equal an absent optional
/// field. The `cost` section is validated by its own model.
fn reject_unknown_fields(text: &str, preset: &TilePreset) -> Result<(), String> {
    fn walk(
        input: &serde_json::Value,
        known: &serde_json::Value,
        path: &str,
    ) -> Result<(), String> {
        use serde_json::Value;
        match (input, known) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in a {
                    let here = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    if here == "cost" {
                        continue;
                    }
                    match b.get(k) {
                        Some(w) => walk(v, w, &here)?,
                        None if v.is_null() => {}
                        None => return Err(here),
                    }
                }
                Ok(())
            }
            (Value::Array(a), Value::Array(b)) => {
                for (i, (v, w)) in a.iter().zip(b).enumerate() {
                    walk(v, w, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let input: serde_json::Value = serde_json::from_str(text).map_err(|_| ".".to_string())?;
    let known = serde_json::to_value(preset).map_err(|_| ".".to_string())?;
    walk(&input, &known, "")
}

fn finite_positive(field: &str, v: f32) -> Result<(), FieldError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be a finite number > 0, got {v}"),
        ))
    }
}

fn finite_non_negative(field: &str, v: f32) -> Result<(), FieldError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be a finite number ≥ 0, got {v}"),
        ))
    }
}

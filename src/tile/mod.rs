//! Analog tiles: presets, one crossbar with its periphery, large matrices split into blocks,
//! 3D tile stacks, and the drift study (docs/model.md §2–§4).
//!
//! CPU execution: every MVM quantises the batch into a matrix over rayon-split batch chunks,
//! runs the crossbar products of each chunk in one pass over W̃ (PCM_READ's Σ|W̃|x̃² beside
//! W̃x̃; IR drop adds one product against [W̃; W̃∘F]) with the packed AVX2 kernel of `kernel`,
//! and applies the periphery row by row. Noise is keyed by [`crate::rng::Stream`], so results
//! are identical for any thread count.

mod crossbar;
mod drift_study;
mod kernel;
mod matrix;
pub mod operand;
mod preset;
mod stack;

pub use crossbar::{Crossbar, GDC_MIN_READOUT, GDC_READOUT_MVM_ID, GDC_REFERENCE_MVM_ID};
pub use drift_study::{
    drift_study, DriftFan, DriftFanLevel, DriftPoint, DriftStudy, DriftStudyConfig, DEFAULT_TIMES_S,
};
pub use kernel::{noise_sd, NOISE_VAR_FLOOR};
pub use matrix::{split_equal, AnalogMatrix, BlockGeometry};
pub use preset::{
    bound_is_a_level, quotient_by_reciprocal, rint, BoundManagement, DriftCompensation, FieldError,
    IrDrop, MappingSpec, NoiseManagement, PeripherySpec, PresetError, Quantizer, StackSpec,
    TilePreset, WeightNoise,
};
pub use stack::TileStack;

//! Analog tiles: presets, one crossbar with its periphery, large matrices split into blocks,
//! 3D tile stacks, and the drift study (docs/model.md §2–§4).
//!
//! CPU execution: every MVM quantises the batch into a matrix, runs one GEMM (plus one per
//! enabled nonideality that needs it: IR drop, PCM_READ weight noise) over rayon-split batch
//! chunks, and applies the periphery in a fused epilogue. Noise is keyed by
//! [`crate::rng::Stream`], so results are identical for any thread count.

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
pub use matrix::{split_equal, AnalogMatrix, BlockGeometry};
pub use preset::{
    rint, BoundManagement, DriftCompensation, FieldError, IrDrop, MappingSpec, NoiseManagement,
    PeripherySpec, PresetError, Quantizer, StackSpec, TilePreset, WeightNoise,
};
pub use stack::TileStack;

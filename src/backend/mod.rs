//! Execution backends for the analog layers (the CPU path lives in [`crate::tile`]).
#[cfg(feature = "cuda")]
pub mod cuda;

//! Execution backends for the analog expert matrix products.
//!
//! A backend programs the mapped matrices onto simulated crossbars, drifts them, and serves the model's
//! [`ExpertLinear`](crate::model::ExpertLinear) calls: analog matrices go through their crossbar blocks, everything
//! else through the digital weights. The physics lives once, in [`crate::device`] and [`crate::tile`]; the CUDA
//! kernels mirror those functions (each kernel function names the Rust function it mirrors).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod select;

pub use cpu::AnalogExperts;
pub use select::{BackendRequest, Execution, GpuMemory};

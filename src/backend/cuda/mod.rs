//! CUDA backend (cudarc with run-time loading of libcuda, libnvrtc, libcublas).
//!
//! The crate builds and its tests pass without any CUDA installed: libraries are opened when a
//! [`CudaDevice`] is first asked for, and [`CudaDevice::discover`] returns `None` when there is
//! no driver or GPU. Kernels live in `kernels/*.cu`, are embedded with `include_str!` and
//! compiled with NVRTC for the device's compute capability ([`compile`]); the PTX is cached in
//! the user's cache directory.
//!
//! Random draws use the Philox streams of [`crate::rng`] bit for bit (`kernels/philox.cuh`), so
//! GPU and CPU perturb every weight and output with the same numbers (docs/model.md §6).
//!
//! Modules: [`compile`] (NVRTC + PTX cache), [`experts`] (a whole model's routed experts on the GPU), [`rng`] (Philox fills), [`program`] (programming,
//! drift, read noise), [`moe`] (routing sort, DAC prologue, grouped analog/digital GEMMs,
//! SwiGLU layer), [`reference`](mod@reference) (CPU model of the grouped kernels, the kernels' oracle),
//! [`blas`] (cuBLAS reference GEMM).
//!
//! On a GPU machine: `cargo test --test gpu_backend -- --nocapture` (parity bounds are printed)
//! and `aimc bench --suite gpu --report reports/bench/<date>-gpu.md`.

pub mod blas;
pub mod compile;
mod device;
mod error;
pub mod experts;
pub mod model;
pub mod moe;
pub mod profile;
pub mod program;
pub mod reference;
pub mod rng;

pub use device::{gib, linear_launch, row_launch, CudaDevice};
pub use error::{CudaError, CudaResult};

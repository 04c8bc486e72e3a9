//! CUDA backend (cudarc with run-time loading of libcuda, libnvrtc, libcublas).
//!
//! The crate builds and its tests pass without any CUDA installed: libraries are opened when a
//! [`CudaDevice`] is first asked for, and [`CudaDevice::discover`] returns `None` when there is
//! no driver or GPU. Kernels live in `kernels/*.cu`, are embedded with `include_str!` and
//! compiled with NVRTC for the device's compute capability ([`compile`]); the PTX is cached in
//! the user's cache directory.
//!
//! Random draws use the Philox streams of [`crate::rng`] bit for bit (`kernels/philox.cuh`), so
//! GPU and CPU perturb every weight and output with the same numbers (the streams are keyed by
//! seed, tensor and call, never by thread or launch order).
//!
//! Modules, one concern each:
//! - [`execution`]: the [`crate::backend::Backend`] of an evaluation on the GPU, with its
//!   residency choices and fallbacks to the CPU;
//! - [`experts`]: a whole model's routed experts on the GPU ([`experts::GpuExperts`], the
//!   model's `ExpertLinear` there); [`programmed`]: their programmed state and its residency;
//! - [`model`]: the dense part of the forward on the GPU; [`score`]: the scores of a forward
//!   against the digital reference, on the device;
//! - [`layer`]: one MoE layer (routing → gate/up GEMM + SwiGLU → down GEMM + combine);
//!   [`routing`]: the sort of (token, expert) pairs; [`grouped`]: grouped matrices in kernel
//!   layout; [`periphery`]: DAC, bound management, GDC readout and the periphery parameters;
//!   [`gemm`]: the grouped GEMMs, by tile, variant and launch path;
//! - [`finetune`]: one MoE layer's hardware-aware fine-tuning (weights, Adam and calibration
//!   rows on the device);
//! - [`program`]: programming, drift and read noise of single crossbar blocks; [`rng`]: Philox
//!   fills; [`blas`]: cuBLAS; [`reference`](mod@reference): CPU model of the grouped kernels,
//!   their oracle; [`compile`]: NVRTC and the PTX cache; [`profile`]: stage timing.
//!
//! On a GPU machine: `cargo test --release --test gpu_backend -- --include-ignored
//! --test-threads=1 --nocapture` (parity bounds are printed) and
//! `aimc bench --suite gpu --report reports/bench/<date>-gpu.md`.

pub mod blas;
pub mod compile;
mod device;
pub(crate) mod env;
mod error;
pub mod execution;
pub mod experts;
pub mod finetune;
pub mod gemm;
pub mod grouped;
pub mod layer;
pub mod model;
pub mod periphery;
pub mod profile;
pub mod program;
pub mod programmed;
pub mod reference;
pub mod rng;
pub mod routing;
pub mod score;

pub use device::{gib, linear_launch, row_launch, CudaDevice};
pub use error::{CudaError, CudaResult};

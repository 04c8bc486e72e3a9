//! CUDA backend parity with the CPU. The tests that need a GPU are ignored by default (CI
//! machines have none) and fail with the reason when run without one; on a GPU machine run
//! them with `cargo test --release --test gpu_backend -- --include-ignored --test-threads=1
//! --nocapture` to see the measured bounds. The tests of the host-side kernel models, the
//! parameter layouts and the no-GPU errors run everywhere.
//!
//! One test binary, `gpu_backend` (`tools/gpu_prepare.sh` builds it and looks for it by that
//! name), in modules by what they test: `device` (device primitives, Philox, programming one
//! block), `routing`, `analog_layer` and `digital_layer` (the MoE layer kernels against the
//! CPU), `analog_wgmma` (the sm_90a analog kernel against mma.sync), `kernel_reference` (the
//! CPU-only checks of the kernel design), `model_forward` and `model_state` (whole models).
//! Helpers shared by several of them are in `support`.
#![cfg(feature = "cuda")]

// The helpers shared with the other integration tests (tests/common/mod.rs), which Cargo
// does not compile as a test of its own.
#[path = "../common/mod.rs"]
mod common;
mod support;

mod analog_layer;
mod analog_wgmma;
mod device;
mod digital_layer;
mod kernel_reference;
mod model_forward;
mod model_state;
mod routing;

//! Execution backends: where the analog matrix products of a model run.
//!
//! A backend programs the mapped matrices onto simulated crossbars, drifts them, and runs the
//! model's forward passes with every analog matrix through its crossbar blocks and everything
//! else through the digital weights. The evaluation protocol (`eval/`) drives any backend
//! through one interface, [`Backend`], and never learns where it runs; the backend is chosen
//! once per run in [`select`] ([`Execution::with_backend`]).
//!
//! - [`cpu`]: the reference backend, ndarray GEMMs and rayon over sequences.
//! - `cuda` (feature `cuda`): the same physics on an NVIDIA GPU, bit for bit where the
//!   operands allow, with its own residency choices and partial fallbacks to the CPU (a layer,
//!   or the dense part of the forward), all behind [`Backend`].
//! - [`score`]: the per-position scores every backend computes where its logits are.
//! - [`describe`](mod@describe): what ran where and where the time went, as values.
//!
//! The physics lives once, in [`crate::device`] and [`crate::tile`]; the CUDA kernels mirror
//! those functions (each kernel names the Rust function it mirrors).
use std::sync::Arc;

use anyhow::Result;

use crate::device::Device;
use crate::mapping::Mapping;
use crate::model::{Model, RouterKind};
use crate::tile::TilePreset;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod describe;
pub mod score;
pub mod select;

pub use cpu::{AnalogExperts, CpuBackend};
pub use describe::{Description, Phases};
pub use score::{Reference, ScoreSums};
pub use select::{BackendRequest, Execution, GpuMemory};

/// What an analog run executes: a model, which of its matrices are analog, how the crossbars
/// are built, and how tokens are routed.
#[derive(Clone)]
pub struct AnalogWork<'r, 'm> {
    pub model: &'m Model,
    pub mapping: &'r Mapping,
    pub preset: &'r TilePreset,
    pub router: RouterKind,
    /// Build the crossbars of this device instead of the preset's (`None`: the preset's).
    pub device: Option<Arc<dyn Device>>,
    /// The first seed the run will program: a backend that must decide at set-up whether it
    /// can program on its own (the CUDA one) lays the crossbars out with it.
    pub first_seed: u64,
}

/// One execution of the analog model, whatever runs it.
///
/// The order of calls is the protocol's: [`Backend::reference`] once, then per seed
/// [`Backend::program`] and per drift time [`Backend::drift_to`] and [`Backend::forward`].
/// The random streams are keyed by (seed, tensor, call), never by call order, so the numbers
/// do not depend on the backend or on its parallelism.
pub trait Backend {
    /// Programs every analog matrix with the programming-noise streams of `seed`.
    fn program(&mut self, seed: u64) -> Result<()>;

    /// Drifts the programmed state to `t_seconds` after programming (from the programmed
    /// state, not from the previous point) and recomputes the drift compensation.
    fn drift_to(&mut self, t_seconds: f64) -> Result<()>;

    /// The digital model's reference for each of `sequences`. [`Backend::forward`] scores
    /// against these (a backend that scores on its device keeps a copy there).
    fn reference(&mut self, sequences: &[&[u32]]) -> Result<Vec<Reference>>;

    /// The analog forward pass of every sequence (sequence k draws the per-MVM noise of call
    /// k), scored against `references` (those [`Backend::reference`] returned for the same
    /// `sequences`, or, when it was never called, any references of them, such as another
    /// model's digital outputs), summed over all sequences.
    fn forward(&mut self, sequences: &[&[u32]], references: &[Reference]) -> Result<ScoreSums>;

    /// For each sequence k, Σ over i ≥ `from[k]` of log p(`sequences[k][i]` | the tokens
    /// before it), in nats: by the digital model when `analog` is false, else by the
    /// programmed (and drifted) analog model, sequence k drawing the per-MVM noise of call k.
    /// The model sees each sequence without its last token (nothing follows it to score), so
    /// a sequence of n tokens needs a window of n − 1. Multiple-choice tasks score a choice's
    /// tokens given its context with it (`from[k]` ≥ 1).
    fn log_likelihoods(
        &mut self,
        sequences: &[&[u32]],
        from: &[usize],
        analog: bool,
    ) -> Result<Vec<f64>>;

    /// What ran where so far.
    fn describe(&self) -> Description;

    /// Where the time went so far.
    fn phases(&self) -> Phases;
}

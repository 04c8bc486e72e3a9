//! aimc — a simulator of analog in-memory computing (AIMC) hardware for Mixture-of-Experts language models.
//!
//! Data flows one way: checkpoint → [`model`] → [`mapping`] → programmed tiles ([`tile`], built from
//! [`device`] physics and [`rng`] streams) → execution [`backend`] → metrics ([`eval`]) → [`report`].
//! The physics, with its equations and sources, is in `docs/model.md` (it follows IBM AIHWKIT's inference
//! noise models); `docs/architecture.md` draws the flow and names the one place where each concept lives.

pub mod backend;
pub mod cli;
pub mod device;
pub mod energy;
pub mod eval;
pub mod finetune;
pub mod mapping;
pub mod model;
pub mod report;
pub mod rng;
pub mod tile;

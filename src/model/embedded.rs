//! The default model compiled into the binary, used when no `--model DIR` is given.
//!
//! The integrator fills [`load`] with the `include_bytes!` list of the trained checkpoint
//! (`config.json`, the bf16 shards, `model.safetensors.index.json`, `tokenizer.json`) passed to
//! [`super::Model::load_from_memory`].
use anyhow::{bail, Result};

use super::Model;

/// Loads the embedded default model.
pub fn load() -> Result<Model> {
    bail!("embedded model not built into this binary: pass --model DIR")
}

/// The held-out text excerpt shipped with the embedded model, the default of `aimc eval`.
pub fn default_text() -> Result<&'static str> {
    bail!("no default evaluation text built into this binary: pass --text FILE")
}

//! The default model compiled into the binary, used when no `--model DIR` is given.
//!
//! To embed a checkpoint, list its files in `FILES` with `include_bytes!` (`config.json`, the
//! bf16 shards, `model.safetensors.index.json`, `tokenizer.json`) and set `HELDOUT_TEXT` with
//! `include_str!`; [`load`] then goes through [`Model::load_from_memory`], the same loader as a
//! checkpoint directory.
use anyhow::{bail, Result};

use super::Model;

/// `(file name, bytes)` of the embedded checkpoint; empty when none is built in.
const FILES: &[(&str, &[u8])] = &[];

/// Held-out text excerpt shipped with the embedded model, the default of `aimc eval`.
const HELDOUT_TEXT: Option<&str> = None;

/// Loads the embedded default model.
pub fn load() -> Result<Model> {
    if FILES.is_empty() {
        bail!("embedded model not built into this binary: pass --model DIR");
    }
    Model::load_from_memory(FILES)
}

/// The held-out text excerpt shipped with the embedded model.
pub fn default_text() -> Result<&'static str> {
    match HELDOUT_TEXT {
        Some(t) => Ok(t),
        None => bail!("no default evaluation text built into this binary: pass --text FILE"),
    }
}

//! The default model compiled into the binary, used when no `--model DIR` is given.
//!
//! `kjv-moe` (models/kjv-moe/README.md): an OLMoE-format MoE LM of 9.5M parameters (4 layers, 16 experts of
//! width 128, top-4) trained on the King James Bible by `tools/train_embedded.py`. Its files are embedded with
//! `include_bytes!` (19 MB), so the binary runs it from anywhere with no path; it is loaded through the same
//! checkpoint code as a directory on disk (sharded bf16 safetensors + index + tokenizer).
use anyhow::{Context, Result};

use super::{CheckpointSource, Model};

macro_rules! embedded_file {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/kjv-moe/",
                $name
            )) as &'static [u8],
        )
    };
}

/// The checkpoint files as `(name, bytes)`.
pub const FILES: [(&str, &[u8]); 5] = [
    embedded_file!("config.json"),
    embedded_file!("model.safetensors.index.json"),
    embedded_file!("model-00001-of-00002.safetensors"),
    embedded_file!("model-00002-of-00002.safetensors"),
    embedded_file!("tokenizer.json"),
];

/// Name shown in reports.
pub const NAME: &str = "kjv-moe (embedded)";

/// A contiguous excerpt of the held-out split (23 chapters, 16,321 tokens), the default evaluation text.
const HELDOUT: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv-heldout.txt"));

/// The embedded checkpoint as a source of files, e.g. for writing a modified copy of it
/// ([`super::write::write_checkpoint_from`]).
pub fn source() -> CheckpointSource<'static> {
    CheckpointSource::Memory(&FILES)
}

/// Loads the embedded default model.
pub fn load() -> Result<Model> {
    Model::load_from_memory(&FILES).context("loading the embedded model kjv-moe")
}

/// The held-out text excerpt shipped with the embedded model, the default of `aimc eval`.
pub fn default_text() -> Result<&'static str> {
    Ok(HELDOUT)
}

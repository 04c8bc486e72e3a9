//! Helpers shared by the subcommands: model and text loading, JSON output.
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::model::Model;

/// Loads `--model DIR`, or the embedded default model when no directory is given.
pub fn load_model(dir: Option<&Path>) -> Result<Model> {
    match dir {
        Some(d) => Model::load(d).with_context(|| format!("loading the model in {}", d.display())),
        None => crate::model::embedded::load(),
    }
}

/// Tokenises `--text FILE` (default: the embedded held-out excerpt) and keeps the first `max_tokens` tokens.
pub fn load_tokens(model: &Model, text: Option<&Path>, max_tokens: usize) -> Result<Vec<u32>> {
    let body = match text {
        Some(p) => super::args::read_text_file("text file", p)?,
        None => crate::model::embedded::default_text()?.to_string(),
    };
    let mut ids = model.tokenizer()?.encode(&body)?;
    ids.truncate(max_tokens);
    ensure!(
        ids.len() >= 2,
        "the text gives {} tokens; at least 2 are needed",
        ids.len()
    );
    Ok(ids)
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

//! Helpers shared by the subcommands: the default chip and output folders, model and text loading, JSON output.
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::model::Model;

/// The chip every command describes unless `--preset` names another: its physics equal `pcm-3d-8tier`'s (so
/// accuracy results are the same), its stack geometry holds OLMoE-1B-7B-size models, and it carries the energy
/// costs `aimc energy` and `aimc report` need.
pub const DEFAULT_PRESET: &str = "aimc-3d";

/// Loads `--model DIR`, or the embedded default model when no directory is given.
pub fn load_model(dir: Option<&Path>) -> Result<Model> {
    match dir {
        Some(d) => Model::load(d).with_context(|| format!("loading the model in {}", d.display())),
        None => crate::model::embedded::load(),
    }
}

/// The name a person reads for `--model DIR`: the folder's last component, or the embedded model's name.
pub fn model_name(dir: Option<&Path>) -> String {
    match dir {
        Some(d) => d.file_name().map_or_else(
            || d.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        None => crate::model::embedded::NAME.to_string(),
    }
}

/// Ticks of a log time axis at the given drift times, named as a person reads them (`0 s`, `1 h`, `1 y`). Log
/// axes cannot show t = 0, so it sits at 1 s (charts say so in their axis label).
pub fn time_ticks(times_s: &[f64]) -> Vec<(f64, String)> {
    times_s
        .iter()
        .map(|&t| (t.max(1.0), crate::eval::time::format_duration(t)))
        .collect()
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

/// Version of the layout of the JSON files the commands write (`drift.json`, `summary.json`, `eval.json`); bump
/// when a key changes meaning. Keys are stable snake_case.
pub const OUTPUT_SCHEMA_VERSION: u32 = 1;

/// `value`'s JSON object with `schema_version` first.
#[derive(serde::Serialize)]
pub struct Versioned<'a, T: Serialize> {
    pub schema_version: u32,
    #[serde(flatten)]
    pub value: &'a T,
}

/// Writes `value` (a struct) as pretty JSON to `path`, with `"schema_version": OUTPUT_SCHEMA_VERSION` added.
pub fn write_versioned_json(path: &Path, value: &impl Serialize) -> Result<()> {
    write_json(
        path,
        &Versioned {
            schema_version: OUTPUT_SCHEMA_VERSION,
            value,
        },
    )
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

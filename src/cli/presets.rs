//! `aimc presets` (skeleton: filled in by its issue).
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct PresetsArgs {}

pub fn run(_args: PresetsArgs) -> Result<()> {
    bail!("`aimc presets` is not built yet")
}

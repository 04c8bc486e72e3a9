//! `aimc drift` (skeleton: filled in by its issue).
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct DriftArgs {}

pub fn run(_args: DriftArgs) -> Result<()> {
    bail!("`aimc drift` is not built yet")
}

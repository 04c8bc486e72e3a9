//! `aimc info` (skeleton: filled in by its issue).
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct InfoArgs {}

pub fn run(_args: InfoArgs) -> Result<()> {
    bail!("`aimc info` is not built yet")
}

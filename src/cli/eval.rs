//! `aimc eval` (skeleton: filled in by its issue).
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct EvalArgs {}

pub fn run(_args: EvalArgs) -> Result<()> {
    bail!("`aimc eval` is not built yet")
}

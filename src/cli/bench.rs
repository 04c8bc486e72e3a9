//! `aimc bench` (skeleton: filled in by its issue).
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<()> {
    bail!("`aimc bench` is not built yet")
}

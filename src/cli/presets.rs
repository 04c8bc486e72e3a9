//! `aimc presets`: list the built-in tile presets.
use anyhow::Result;
use clap::Args;

use crate::tile::TilePreset;

/// Arguments of `aimc presets` (none).
#[derive(Args, Debug)]
pub struct PresetsArgs {}

/// Print one line per built-in preset: name, geometry, description.
pub fn run(_args: PresetsArgs) -> Result<()> {
    for name in TilePreset::builtin_names() {
        let p = TilePreset::builtin(name)?;
        let s = p.stack;
        println!(
            "{name:<16} {:>4}x{:<4} x{:<2} tiers  {}",
            s.rows, s.cols, s.tiers_per_stack, p.description
        );
    }
    Ok(())
}

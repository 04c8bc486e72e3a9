//! `aimc presets`: list the built-in tile presets, marking the default.
use anyhow::Result;
use clap::Args;

use super::common::DEFAULT_PRESET;
use crate::tile::TilePreset;

/// Arguments of `aimc presets` (none).
#[derive(Args, Debug)]
pub struct PresetsArgs {}

/// Print one line per built-in preset: name, crossbar size, tiers per stack, stacks, whether it carries energy
/// costs, description.
pub fn run(_args: PresetsArgs) -> Result<()> {
    println!(
        "{:<18} {:>9} {:>6} {:>7}  {:<6}  description",
        "preset", "crossbar", "tiers", "stacks", "costs"
    );
    for name in TilePreset::builtin_names() {
        let p = TilePreset::builtin(name)?;
        let s = p.stack;
        let label = if name == DEFAULT_PRESET {
            format!("{name} (default)")
        } else {
            name.to_string()
        };
        println!(
            "{label:<18} {:>9} {:>6} {:>7}  {:<6}  {}",
            format!("{}×{}", s.rows, s.cols),
            s.tiers_per_stack,
            s.stacks,
            if p.cost.is_some() { "yes" } else { "no" },
            p.description
        );
    }
    Ok(())
}

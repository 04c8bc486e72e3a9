//! `aimc map`: map a model onto a tile preset's chip, print the summary, write JSON and an occupancy heatmap.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::common::{load_model, load_tokens, model_name, write_json, DEFAULT_PRESET};
use crate::mapping::{
    map_matrices, ChipGeometry, DigitalSelection, Mapping, MappingOptions, MappingSummary,
    MatrixSpec, ModelTotals, RoutingTrace, Strategy,
};
use crate::model::{Model, RouterKind};
use crate::report::heatmap::{write_occupancy, OccupancyGrid};
use crate::tile::TilePreset;

/// The mapping flags shared by `aimc map`, `aimc eval` and `aimc report`.
#[derive(Args, Debug, Clone)]
pub struct MappingFlags {
    /// Placement strategy.
    #[arg(long, value_enum, default_value = "expert-per-tier")]
    pub strategy: Strategy,
    /// Fraction of each layer's routed experts kept digital (default 0.25 with `heterogeneous`, else 0).
    #[arg(long)]
    pub digital_fraction: Option<f64>,
    /// Choose the digital experts at random with this seed instead of by max neuron norm.
    #[arg(long)]
    pub random_digital: Option<u64>,
    /// Put shared experts and dense MLPs on analog tiles too.
    #[arg(long)]
    pub analog_shared: bool,
}

impl MappingFlags {
    /// The mapping options these flags ask for.
    pub fn options(&self) -> MappingOptions {
        let default_fraction = if self.strategy == Strategy::Heterogeneous {
            0.25
        } else {
            0.0
        };
        MappingOptions {
            strategy: self.strategy,
            digital_fraction: self.digital_fraction.unwrap_or(default_fraction),
            digital_selection: match self.random_digital {
                Some(seed) => DigitalSelection::Random { seed },
                None => DigitalSelection::MaxNeuronNorm,
            },
            analog_shared: self.analog_shared,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct MapArgs {
    /// HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tile preset: a built-in name (`aimc presets`) or a JSON file.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    #[command(flatten)]
    pub mapping: MappingFlags,
    /// Calibration text for the routing trace (default: the embedded held-out text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens.
    #[arg(long, default_value_t = 2048)]
    pub calib_tokens: usize,
    /// Output folder (created if missing).
    #[arg(long, default_value = "aimc-out/map")]
    pub out: PathBuf,
}

/// A mapping with the routing trace it was made from and its summary.
pub struct MapResult {
    pub mapping: Mapping,
    pub trace: RoutingTrace,
    pub summary: MappingSummary,
}

/// Collects a routing trace on `tokens`, maps `model` onto `preset` and summarises the result.
/// Maps every FFN matrix of `model` onto `preset`'s chip (`trace` is needed by the `affinity` strategy).
pub fn map_loaded(
    model: &Model,
    preset: &TilePreset,
    opts: &MappingOptions,
    trace: Option<&RoutingTrace>,
) -> Result<Mapping> {
    let lookup = |id| model.matrix(id);
    map_matrices(
        &MatrixSpec::from_model(model),
        ChipGeometry::from_preset(preset),
        opts,
        &lookup,
        trace,
    )
    .with_context(|| format!("mapping the model onto preset `{}`", preset.name))
}

pub fn map_model(
    model: &Model,
    preset: &TilePreset,
    opts: &MappingOptions,
    tokens: &[u32],
) -> Result<MapResult> {
    let trace = RoutingTrace::collect(model, tokens, 512, RouterKind::default())
        .context("collecting the routing trace on the calibration text")?;
    let mapping = map_loaded(model, preset, opts, Some(&trace))?;
    let summary = MappingSummary::new(&mapping, &ModelTotals::from_model(model), Some(&trace));
    Ok(MapResult {
        mapping,
        trace,
        summary,
    })
}

/// Writes `mapping.json`, `summary.json` and `occupancy.{png,svg}` into `out`; `name` titles the picture.
pub fn write_outputs(
    name: &str,
    model: &Model,
    preset: &TilePreset,
    r: &MapResult,
    out: &Path,
) -> Result<()> {
    write_json(&out.join("mapping.json"), &r.mapping)?;
    super::common::write_versioned_json(&out.join("summary.json"), &r.summary)?;
    let grid = OccupancyGrid {
        title: format!(
            "{name} on {}: {}, {} of {} stacks in use",
            preset.name, r.mapping.options.strategy, r.mapping.stacks_used, preset.stack.stacks
        ),
        cells: r.mapping.occupancy(),
        n_layers: model.config.num_layers,
    };
    write_occupancy(&grid, &out.join("occupancy"))?;
    Ok(())
}

pub fn run(args: MapArgs) -> Result<()> {
    super::args::check_map(&args)?;
    let preset = TilePreset::resolve(&args.preset)?;
    eprintln!("map [1/3] loading the model");
    let model = load_model(args.model.as_deref())?;
    let tokens = load_tokens(&model, args.calib.as_deref(), args.calib_tokens)?;
    eprintln!(
        "map [2/3] routing trace on {} calibration tokens, then placing the blocks ({})",
        tokens.len(),
        args.mapping.strategy
    );
    let r = map_model(&model, &preset, &args.mapping.options(), &tokens)?;
    eprintln!("map [3/3] writing {}", args.out.display());
    println!("preset                {}", preset.name);
    print!("{}", r.summary);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_outputs(
        &model_name(args.model.as_deref()),
        &model,
        &preset,
        &r,
        &args.out,
    )?;
    println!(
        "wrote {}/{{mapping.json, summary.json, occupancy.png, occupancy.svg}}",
        args.out.display()
    );
    Ok(())
}

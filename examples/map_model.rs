//! Load a checkpoint (the embedded model, or the directory given as the first argument), map it onto the 3D
//! preset with two strategies, and print each mapping's summary and stack × tier occupancy.
//!
//! `cargo run --release --example map_model [-- /path/to/hf-checkpoint]`
use aimc::mapping::{
    map_matrices, ChipGeometry, MappingOptions, MappingSummary, MatrixSpec, ModelTotals,
    RoutingTrace, Strategy,
};
use aimc::model::{embedded, Model, RouterKind};
use aimc::tile::TilePreset;

fn main() -> anyhow::Result<()> {
    let model = match std::env::args().nth(1) {
        Some(dir) => Model::load(dir.as_ref())?,
        None => embedded::load()?,
    };
    let preset = TilePreset::builtin("pcm-3d-8tier")?;
    let geo = ChipGeometry {
        rows: preset.stack.rows,
        cols: preset.stack.cols,
        tiers_per_stack: preset.stack.tiers_per_stack,
        stacks: preset.stack.stacks,
    };
    let specs = MatrixSpec::from_model(&model);
    // Routing trace on calibration text: which experts fire together.
    let text = embedded::default_text()?;
    let mut tokens = model.tokenizer()?.encode(text)?;
    tokens.truncate(2048);
    let trace = RoutingTrace::collect(&model, &tokens, 512, RouterKind::default())?;
    let counts = model.param_counts();
    let totals = ModelTotals {
        total_params: counts.total,
        dense_matmul_params: counts.attention
            + counts.router
            + model.config.vocab_size * model.config.hidden_size,
        top_k: model.config.top_k,
        n_experts: model.config.num_experts,
    };
    let lookup = |id| model.matrix(id);
    for strategy in [Strategy::ExpertPerTier, Strategy::Affinity] {
        let opts = MappingOptions {
            strategy,
            ..Default::default()
        };
        let mapping = map_matrices(&specs, geo, &opts, &lookup, Some(&trace))?;
        println!("{}", MappingSummary::new(&mapping, &totals, Some(&trace)));
        println!("occupancy (layer of each tier, '.' = empty), one row per stack:");
        for (s, tiers) in mapping.occupancy().iter().enumerate() {
            let row: String = tiers
                .iter()
                .map(|c| {
                    c.as_ref().map_or('.', |c| {
                        char::from_digit(c.layer as u32 % 36, 36).unwrap_or('#')
                    })
                })
                .collect();
            println!("  stack {s:>3}  {row}");
        }
        println!();
    }
    Ok(())
}

//! Helpers shared by integration tests that evaluate the embedded model on analog tiles.
#![allow(dead_code)] // each test crate uses its own subset

use aimc::mapping::{map_matrices, ChipGeometry, Mapping, MappingOptions, MatrixSpec};
use aimc::model::{embedded, Model};
use aimc::tile::TilePreset;

/// The embedded model and the first `tokens` tokens of its held-out text.
pub fn embedded_model_and_tokens(tokens: usize) -> (Model, Vec<u32>) {
    let model = embedded::load().unwrap();
    let mut ids = model
        .tokenizer()
        .unwrap()
        .encode(embedded::default_text().unwrap())
        .unwrap();
    ids.truncate(tokens);
    (model, ids)
}

/// The default mapping of `model` onto a chip of `preset`'s crossbars large enough for it
/// (1024 stacks of 8 tiers).
pub fn default_mapping(model: &Model, preset: &TilePreset) -> Mapping {
    let specs = MatrixSpec::from_model(model);
    let geo = ChipGeometry {
        rows: preset.stack.rows,
        cols: preset.stack.cols,
        tiers_per_stack: 8,
        stacks: 1024,
    };
    let lookup = |id| model.matrix(id);
    map_matrices(&specs, geo, &MappingOptions::default(), &lookup, None).unwrap()
}

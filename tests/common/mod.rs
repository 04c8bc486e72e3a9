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

/// Builds `source` as a host C++17 executable (no floating-point contraction, no fast math, so
/// float code rounds as Rust's) under a fresh temporary directory named after `name`, with
/// `$CXX`, else the first of `c++`, `g++`, `clang++` that runs. `None`, with the reason
/// printed, when there is no compiler; a compile error fails the test with the compiler's log.
/// For the tests that check kernel source on the host (`philox_host`, `raster_host`).
pub fn build_host_cpp(name: &str, source: &str) -> Option<std::path::PathBuf> {
    use std::process::Command;
    let cxx = std::env::var("CXX").ok().or_else(|| {
        ["c++", "g++", "clang++"]
            .into_iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(str::to_string)
    });
    let Some(cxx) = cxx else {
        println!("{name}: skipped, no C++ compiler ($CXX, c++, g++, clang++)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("aimc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.cpp"));
    let bin = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let out = Command::new(&cxx)
        .args([
            "-std=c++17",
            "-O2",
            "-ffp-contract=off",
            "-fno-fast-math",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "{cxx} failed on {name}.cpp:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

/// `(input_ids, logits)` of a transformers reference file written by `tools/` (safetensors with
/// i64 `input_ids` and f32 `logits`, flattened).
pub fn reference_ids_and_logits(path: &std::path::Path) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, logits)
}

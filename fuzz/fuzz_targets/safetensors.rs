//! Fuzzes the safetensors reader: any bytes as `model.safetensors` beside the OLMoE parity
//! fixture's config. Loading must return a model or an error, never panic, abort or hang.
//! (Weights are arbitrary here, so a non-finite forward is allowed: the command line's result
//! check refuses it.)
#![no_main]
use aimc::model::Model;
use libfuzzer_sys::fuzz_target;

const CONFIG: &[u8] = include_bytes!("../../tests/fixtures/parity/olmoe/config.json");

fuzz_target!(|weights: &[u8]| {
    let files: [(&str, &[u8]); 2] = [("config.json", CONFIG), ("model.safetensors", weights)];
    let _ = Model::load_from_memory(&files);
});

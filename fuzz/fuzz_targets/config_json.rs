//! Fuzzes `config.json`: any bytes as the config of the OLMoE parity fixture's weights. Loading
//! must return a model or an error, never panic or abort; a loaded model's forward pass must be
//! finite (the weights are the fixture's, so a non-finite result is a validation gap).
#![no_main]
use aimc::model::{ForwardOptions, Model};
use libfuzzer_sys::fuzz_target;

const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/parity/olmoe/model.safetensors");

fuzz_target!(|config: &[u8]| {
    let files: [(&str, &[u8]); 2] = [("config.json", config), ("model.safetensors", WEIGHTS)];
    if let Ok(model) = Model::load_from_memory(&files) {
        let v = model.config.vocab_size as u32;
        let tokens: Vec<u32> = (0..6u32).map(|i| (i * 7 + 1) % v).collect();
        if let Ok(out) = model.forward(&tokens, &ForwardOptions::default()) {
            assert!(out.logits.iter().all(|x| x.is_finite()), "non-finite logits");
        }
    }
});

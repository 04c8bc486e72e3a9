//! Parity with transformers 5.17 (float32, eager) on the tiny random checkpoints of
//! `tests/fixtures/parity/` made by `tools/make_parity_fixtures.py`: max |logit − reference| ≤ 1e-4.
//! The fixtures' router margins (> 2e-3, see their README) make the expert choice stable at that
//! precision, so a wrong routing, norm, RoPE or attention rule shows up as an O(0.1) difference.
mod common;

use std::path::{Path, PathBuf};

use aimc::model::{ForwardOptions, Model};

const BOUND: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

fn max_diff(name: &str) -> f32 {
    let dir = fixture(name);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (ids, want) = common::reference_ids_and_logits(&dir.join("reference.safetensors"));
    let out = model.forward(&ids, &ForwardOptions::default()).unwrap();
    assert_eq!(out.logits.len(), want.len(), "{name}: logits size");
    out.logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

macro_rules! parity {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let d = max_diff($name);
            eprintln!("{}: max diff {d:e}", $name);
            assert!(d <= BOUND, "{}: max |logit - reference| = {d:e} > {BOUND:e}", $name);
        }
    )*};
}

parity! {
    mixtral => "mixtral",
    olmoe => "olmoe",
    olmoe_fused => "olmoe_fused",
    olmoe_clip_qkv => "olmoe_clipqkv",
    qwen2_moe => "qwen2_moe",
    qwen3_moe => "qwen3_moe",
    deepseek_v2 => "deepseek_v2",
    deepseek_v2_q_lora => "deepseek_v2_qlora",
}

#[test]
fn batched_forward_equals_single_sequences() {
    let dir = fixture("qwen2_moe");
    let model = Model::load(&dir).unwrap();
    let (ids, _) = common::reference_ids_and_logits(&dir.join("reference.safetensors"));
    let (a, b) = (&ids[..15], &ids[3..10]);
    let opts = ForwardOptions {
        record_routing: true,
        ..Default::default()
    };
    let batch = model.forward_batch(&[a, b], &opts).unwrap();
    for (seq, out) in [a, b].iter().zip(&batch) {
        let single = model.forward(seq, &opts).unwrap();
        let d = (&single.logits - &out.logits)
            .mapv(f32::abs)
            .fold(0.0f32, |m, v| m.max(*v));
        assert!(d < 1e-5, "batched vs single: {d:e}");
        assert_eq!(single.routing, out.routing);
    }
}

#[test]
fn loading_from_memory_equals_loading_from_disk() {
    let files: [(&str, &'static [u8]); 2] = [
        (
            "config.json",
            include_bytes!("fixtures/parity/olmoe/config.json"),
        ),
        (
            "model.safetensors",
            include_bytes!("fixtures/parity/olmoe/model.safetensors"),
        ),
    ];
    let from_memory = Model::load_from_memory(&files).unwrap();
    let from_disk = Model::load(&fixture("olmoe")).unwrap();
    let ids = [0u32, 17, 100, 42, 5];
    let opts = ForwardOptions::default();
    assert_eq!(
        from_memory.forward(&ids, &opts).unwrap().logits,
        from_disk.forward(&ids, &opts).unwrap().logits
    );
}

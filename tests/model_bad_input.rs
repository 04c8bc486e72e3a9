//! Broken checkpoints give errors that name the file and the tensor or field (never a panic), and
//! the accepted variants (sharded, f16/bf16, tokenizer, DeepSeekMoE naming) load. Each case edits a
//! copy of a parity fixture in a temporary directory.
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use aimc::model::{ForwardOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tempfile::TempDir;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/olmoe")
}

/// A temp copy of the olmoe fixture (config + weights only).
fn copy_fixture() -> TempDir {
    let dir = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// All tensors of the fixture as `(name, dtype, shape, bytes)`.
fn tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = fs::read(fixture().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    c[key] = value;
    fs::write(path, serde_json::to_vec(&c).unwrap()).unwrap();
}

fn load_error(dir: &Path) -> String {
    format!(
        "{:#}",
        Model::load(dir).expect_err("broken checkpoint must not load")
    )
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture();
    let missing = "model.layers.1.mlp.experts.3.up_proj.weight";
    let kept: Vec<_> = tensors().into_iter().filter(|t| t.0 != missing).collect();
    write_safetensors(&dir.path().join("model.safetensors"), &kept);
    let e = load_error(dir.path());
    assert!(e.contains(missing) && e.contains("not found"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn nan_weight_is_named_with_its_tensor_and_file() {
    let dir = copy_fixture();
    let poisoned = "model.layers.0.mlp.experts.2.down_proj.weight";
    let mut t = tensors();
    let entry = t.iter_mut().find(|t| t.0 == poisoned).unwrap();
    assert_eq!(entry.1, Dtype::F32);
    entry.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    write_safetensors(&dir.path().join("model.safetensors"), &t);
    let e = load_error(dir.path());
    assert!(
        e.contains(poisoned) && e.contains("non-finite") && e.contains("flat index 10"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_shapes() {
    let dir = copy_fixture();
    edit_config(dir.path(), "intermediate_size", 21.into());
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.experts.0.gate_proj.weight"),
        "{e}"
    );
    assert!(
        e.contains("[20, 48]") && e.contains("[21, 48]") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn unknown_model_type_names_the_field() {
    let dir = copy_fixture();
    edit_config(dir.path(), "model_type", "llama".into());
    let e = load_error(dir.path());
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("llama"),
        "{e}"
    );
}

#[test]
fn missing_config_field_is_named() {
    let dir = copy_fixture();
    edit_config(dir.path(), "num_experts_per_tok", serde_json::Value::Null);
    let e = load_error(dir.path());
    assert!(
        e.contains("config.json") && e.contains("num_experts_per_tok"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_fixture();
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

/// A word-level tokenizer with `n` tokens `t0 … t{n-1}`.
fn tokenizer_json(n: usize) -> String {
    let vocab: HashMap<String, usize> = (0..n).map(|i| (format!("t{i}"), i)).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    })
    .to_string()
}

#[test]
fn tokenizer_larger_than_vocab_is_rejected() {
    let dir = copy_fixture();
    fs::write(dir.path().join("tokenizer.json"), tokenizer_json(150)).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("vocab_size") && e.contains("101"),
        "{e}"
    );
}

#[test]
fn matching_tokenizer_loads_and_encodes() {
    let dir = copy_fixture();
    fs::write(dir.path().join("tokenizer.json"), tokenizer_json(101)).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let ids = model.tokenizer().unwrap().encode("t5 t100 t7").unwrap();
    assert_eq!(ids, vec![5, 100, 7]);
}

#[test]
fn sharded_half_precision_checkpoint_matches_f32() {
    let f32_model = Model::load(&fixture()).unwrap();
    let ids: Vec<u32> = vec![0, 17, 100, 42, 5, 99, 23, 64];
    let want = f32_model
        .forward(&ids, &ForwardOptions::default())
        .unwrap()
        .logits;
    for dtype in [Dtype::F16, Dtype::BF16] {
        let dir = copy_fixture();
        fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let half: Vec<_> = tensors()
            .into_iter()
            .map(|(n, _, s, b)| {
                let bytes: Vec<u8> = b
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let v = f32::from_le_bytes(c.try_into().unwrap());
                        match dtype {
                            Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                            _ => half::bf16::from_f32(v).to_le_bytes(),
                        }
                    })
                    .collect();
                (n, dtype, s, bytes)
            })
            .collect();
        let (a, b) = half.split_at(half.len() / 2);
        let mut map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            write_safetensors(&dir.path().join(file), part);
            for t in part {
                map.insert(t.0.clone(), file.into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let got = Model::load(dir.path())
            .unwrap()
            .forward(&ids, &ForwardOptions::default())
            .unwrap()
            .logits;
        let d = (&got - &want).mapv(f32::abs).fold(0.0f32, |m, v| m.max(*v));
        // Weight rounding: relative 2^-11 (f16) / 2^-8 (bf16) per weight; logits are O(2).
        let bound = if dtype == Dtype::F16 { 5e-3 } else { 5e-2 };
        eprintln!("{dtype:?}: max diff {d:e}");
        assert!(d < bound, "{dtype:?}: max diff {d:e} ≥ {bound:e}");
    }
}

/// DeepSeekMoE (`model_type` "deepseek", remote code, no transformers reference) with no dense or
/// shared layers and `norm_topk_prob` is Mixtral under other names: the Mixtral fixture renamed
/// must reproduce the Mixtral reference logits (bound 1e-4 as in model_parity.rs).
#[test]
fn deepseek_moe_v1_names_and_rules_match_renamed_mixtral() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/mixtral");
    let bytes = fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let n = n
                .replace("block_sparse_moe", "mlp")
                .replace(".w1.", ".gate_proj.")
                .replace(".w3.", ".up_proj.")
                .replace(".w2.", ".down_proj.");
            (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    let dir = TempDir::new().unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), &renamed);
    let config = serde_json::json!({
        "model_type": "deepseek", "vocab_size": 101, "hidden_size": 48, "intermediate_size": 36,
        "moe_intermediate_size": 36, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "n_routed_experts": 6, "num_experts_per_tok": 2,
        "n_shared_experts": null, "first_k_dense_replace": 0, "moe_layer_freq": 1,
        "norm_topk_prob": true, "scoring_func": "softmax", "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "rope_scaling": null, "hidden_act": "silu", "tie_word_embeddings": false
    });
    fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let ids: Vec<u32> = vec![0, 17, 100, 42, 5, 99, 23, 64, 1, 77, 31, 8, 50, 100, 3];
    let mixtral = Model::load(&src)
        .unwrap()
        .forward(&ids, &ForwardOptions::default())
        .unwrap();
    let deepseek = Model::load(dir.path()).unwrap();
    assert_eq!(deepseek.config.first_dense_layers(), 0);
    let got = deepseek.forward(&ids, &ForwardOptions::default()).unwrap();
    let d = (&got.logits - &mixtral.logits)
        .mapv(f32::abs)
        .fold(0.0f32, |m, v| m.max(*v));
    assert!(d <= 1e-4, "{d:e}");
}

#[test]
fn sequences_beyond_an_unimplemented_sliding_window_are_refused() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/mixtral");
    let dir = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    edit_config(dir.path(), "sliding_window", 8.into());
    let model = Model::load(dir.path()).unwrap();
    let opts = ForwardOptions::default();
    assert!(model.forward(&[1; 8], &opts).is_ok());
    let e = model.forward(&[1; 9], &opts).unwrap_err().to_string();
    assert!(e.contains("sliding window (8)"), "{e}");
}

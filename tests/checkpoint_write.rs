//! The checkpoint writer (`model::write`): a round trip through every parity fixture family
//! (per-expert and fused layouts, Mixtral's `w1/w3/w2` names, dense first layers) and through the
//! embedded model (sharded bf16) and an f16 sharded copy of a fixture:
//! - written with the model's own experts, the reloaded model's digital logits are bit-identical;
//! - written with perturbed experts, the reloaded expert tensors are the perturbation rounded to
//!   the source dtype and every other tensor is byte-identical;
//! - refusals (destination not empty, the source itself, wrong shapes, a dense layer, an
//!   overflow) name the path or field and leave nothing behind.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aimc::model::common::SwiGlu;
use aimc::model::write::{encode, write_checkpoint, write_checkpoint_from, ExpertUpdates};
use aimc::model::{embedded, CheckpointSource, Ffn, ForwardOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 8] = [
    "mixtral",
    "olmoe",
    "olmoe_fused",
    "olmoe_clipqkv",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v2_qlora",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

type Raw = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Every tensor of the weight files of `source`: dtype, shape, raw bytes.
fn raw_tensors(source: &CheckpointSource<'_>) -> Raw {
    let mut out = HashMap::new();
    for name in source.weight_files().unwrap() {
        let blob = source.read_required(&name).unwrap();
        let st = SafeTensors::deserialize(&blob).unwrap();
        for (k, v) in st.tensors() {
            out.insert(k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()));
        }
    }
    out
}

/// The routed experts of every MoE layer of `model`, each value mapped by `f(layer, flat index
/// within the expert's gate_up then down, value)`.
fn experts_of(model: &Model, f: impl Fn(usize, usize, f32) -> f32) -> ExpertUpdates {
    let mut u = ExpertUpdates::default();
    for (l, layer) in model.layers.iter().enumerate() {
        if let Ffn::Moe(m) = &layer.ffn {
            let experts = m
                .experts
                .iter()
                .map(|s| {
                    let n = s.gate_up.len();
                    let mut gate_up = s.gate_up.clone();
                    gate_up
                        .iter_mut()
                        .enumerate()
                        .for_each(|(k, v)| *v = f(l, k, *v));
                    let mut down = s.down.clone();
                    down.iter_mut()
                        .enumerate()
                        .for_each(|(k, v)| *v = f(l, n + k, *v));
                    SwiGlu { gate_up, down }
                })
                .collect();
            u.layers.insert(l, experts);
        }
    }
    u
}

/// A deterministic perturbation large enough to change every value in any dtype.
fn perturb(l: usize, k: usize, v: f32) -> f32 {
    v * 0.9 + 0.013 * ((l * 7919 + k) as f32 * 0.37).sin()
}

fn ids() -> Vec<u32> {
    vec![0, 17, 100, 42, 5, 99, 23, 64, 1, 77, 31, 8, 50, 100, 3]
}

fn logits(model: &Model, ids: &[u32]) -> Vec<u32> {
    let out = model.forward(ids, &ForwardOptions::default()).unwrap();
    out.logits.iter().map(|v| v.to_bits()).collect()
}

/// The expert tensors of `updates` by name, as `source` names them, flattened in row-major order.
fn expected_expert_values(
    model: &Model,
    updates: &ExpertUpdates,
    raw: &Raw,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (&l, experts) in &updates.layers {
        let block = if raw.keys().any(|k| k.contains("block_sparse_moe")) {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        let p = format!("model.layers.{l}.{block}.experts");
        if raw.contains_key(&format!("{p}.gate_up_proj")) {
            out.push((
                format!("{p}.gate_up_proj"),
                experts
                    .iter()
                    .flat_map(|s| s.gate_up.iter().copied())
                    .collect(),
            ));
            out.push((
                format!("{p}.down_proj"),
                experts
                    .iter()
                    .flat_map(|s| s.down.iter().copied())
                    .collect(),
            ));
        } else {
            let names = if raw.contains_key(&format!("{p}.0.w1.weight")) {
                ["w1", "w3", "w2"]
            } else {
                ["gate_proj", "up_proj", "down_proj"]
            };
            for (x, s) in experts.iter().enumerate() {
                out.push((
                    format!("{p}.{x}.{}.weight", names[0]),
                    s.gate().iter().copied().collect(),
                ));
                out.push((
                    format!("{p}.{x}.{}.weight", names[1]),
                    s.up().iter().copied().collect(),
                ));
                out.push((
                    format!("{p}.{x}.{}.weight", names[2]),
                    s.down.iter().copied().collect(),
                ));
            }
        }
    }
    let _ = model;
    out
}

/// Checks the written checkpoint at `dst` against the source `raw` tensors and the `updates`:
/// expert tensors equal the updates encoded in the source dtype, the rest byte-identical.
fn check_written(model: &Model, src: &Raw, dst: &Path, updates: &ExpertUpdates) {
    let out = raw_tensors(&CheckpointSource::Dir(dst));
    assert_eq!(out.len(), src.len(), "same tensor set");
    let expected = expected_expert_values(model, updates, src);
    let replaced: HashMap<&str, &Vec<f32>> =
        expected.iter().map(|(n, v)| (n.as_str(), v)).collect();
    assert!(!replaced.is_empty());
    for (name, (dtype, shape, bytes)) in src {
        let (d2, s2, b2) = &out[name];
        assert_eq!((dtype, shape), (d2, s2), "{name}: dtype and shape kept");
        match replaced.get(name.as_str()) {
            None => assert!(bytes == b2, "{name}: not byte-identical"),
            Some(values) => {
                let w = if *dtype == Dtype::F32 { 4 } else { 2 };
                let want: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| encode(v, *dtype).unwrap()[..w].to_vec())
                    .collect();
                assert!(&want == b2, "{name}: not the update rounded to {dtype:?}");
            }
        }
    }
}

#[test]
fn every_fixture_family_round_trips_bit_exactly_with_its_own_experts() {
    for name in FIXTURES {
        let src = fixture(name);
        let model = Model::load(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("out");
        let written = write_checkpoint(&src, &dst, &experts_of(&model, |_, _, v| v))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(written.weight_files, vec!["model.safetensors".to_string()]);
        assert!(written.copied_files.contains(&"config.json".to_string()));
        // Non-weight files (config, the reference logits, meta.json) are copied unchanged.
        for f in ["config.json", "meta.json", "reference.safetensors"] {
            assert_eq!(
                std::fs::read(src.join(f)).unwrap(),
                std::fs::read(dst.join(f)).unwrap(),
                "{name}: {f}"
            );
        }
        let reloaded = Model::load(&dst).unwrap();
        assert!(
            logits(&model, &ids()) == logits(&reloaded, &ids()),
            "{name}: logits differ"
        );
        // The fixtures were written by the safetensors library: the same header (metadata, order,
        // offsets, padding) and data give a byte-identical file.
        assert!(
            std::fs::read(src.join("model.safetensors")).unwrap()
                == std::fs::read(dst.join("model.safetensors")).unwrap(),
            "{name}: model.safetensors differs"
        );
    }
}

#[test]
fn every_fixture_family_writes_perturbed_experts_and_keeps_the_rest() {
    for name in FIXTURES {
        let src = fixture(name);
        let model = Model::load(&src).unwrap();
        let updates = experts_of(&model, perturb);
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("out");
        let written = write_checkpoint(&src, &dst, &updates).unwrap();
        let raw = raw_tensors(&CheckpointSource::Dir(&src));
        check_written(&model, &raw, &dst, &updates);
        assert_eq!(
            written.replaced_tensors.len(),
            expected_expert_values(&model, &updates, &raw).len()
        );
        // The reloaded model holds exactly the perturbed experts (f32 sources).
        let reloaded = Model::load(&dst).unwrap();
        for (l, experts) in &updates.layers {
            let Ffn::Moe(m) = &reloaded.layers[*l].ffn else {
                panic!("{name}: layer {l}")
            };
            for (got, want) in m.experts.iter().zip(experts) {
                assert_eq!(got.gate_up, want.gate_up, "{name} layer {l}");
                assert_eq!(got.down, want.down, "{name} layer {l}");
            }
        }
        assert!(
            logits(&model, &ids()) != logits(&reloaded, &ids()),
            "{name}"
        );
    }
}

#[test]
fn the_embedded_model_round_trips_in_its_sharded_bf16_layout() {
    let model = embedded::load().unwrap();
    let (_, tokens) = common::embedded_model_and_tokens(48);
    let tmp = tempfile::tempdir().unwrap();
    // Own experts: bit-identical logits, byte-identical files' tensors, same index.
    let same = tmp.path().join("same");
    let w = write_checkpoint_from(&embedded::source(), &same, &experts_of(&model, |_, _, v| v))
        .unwrap();
    assert_eq!(w.weight_files.len(), 2);
    let reloaded = Model::load(&same).unwrap();
    assert!(logits(&model, &tokens) == logits(&reloaded, &tokens));
    let src_raw = raw_tensors(&embedded::source());
    // Byte-identical shards and index (transformers wrote them; same header, data, JSON layout).
    for (file, bytes) in embedded::FILES {
        assert!(
            std::fs::read(same.join(file)).unwrap() == bytes,
            "{file} differs"
        );
    }
    assert_eq!(
        std::fs::read(same.join("tokenizer.json")).unwrap(),
        embedded::FILES
            .iter()
            .find(|(n, _)| *n == "tokenizer.json")
            .unwrap()
            .1
    );
    let index = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap()
    };
    let original: serde_json::Value = serde_json::from_slice(
        embedded::FILES
            .iter()
            .find(|(n, _)| *n == "model.safetensors.index.json")
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(index(&same), original, "index unchanged (same sizes)");
    let data: usize = src_raw.values().map(|(_, _, b)| b.len()).sum();
    assert_eq!(index(&same)["metadata"]["total_size"], data as u64);
    assert_eq!(w.tensor_bytes, data as u64);

    // Perturbed experts: bf16-rounded, rest byte-identical; the same from the directory on disk.
    let updates = experts_of(&model, perturb);
    let pert = tmp.path().join("perturbed");
    write_checkpoint_from(&embedded::source(), &pert, &updates).unwrap();
    check_written(&model, &src_raw, &pert, &updates);
    let from_dir = tmp.path().join("from-dir");
    let models_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-moe");
    let w = write_checkpoint(&models_dir, &from_dir, &updates).unwrap();
    assert!(
        raw_tensors(&CheckpointSource::Dir(&pert))
            == raw_tensors(&CheckpointSource::Dir(&from_dir))
    );
    assert!(w.copied_files.contains(&"README.md".to_string()));
    assert_eq!(index(&from_dir), original);
}

/// `src`'s tensors converted to f16 (exact for these fixtures' small values up to rounding) and
/// split over two shards with an index, written with the safetensors crate.
fn f16_sharded_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let raw = raw_tensors(&CheckpointSource::Dir(src));
    let mut names: Vec<&String> = raw.keys().collect();
    names.sort();
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let (_, shape, bytes) = &raw[*n];
            let h: Vec<u8> = bytes
                .chunks_exact(4)
                .flat_map(|c| {
                    half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            ((*n).clone(), shape.clone(), h)
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    let split = halves.len() / 2;
    for (i, part) in [&halves[..split], &halves[split..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
                )
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), file.clone().into());
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::tensor::serialize_to_file(views, Some(meta), &dst.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn an_f16_sharded_checkpoint_gets_f16_rounded_experts_and_a_consistent_index() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("olmoe-f16");
    f16_sharded_copy(&fixture("olmoe"), &src);
    let model = Model::load(&src).unwrap();
    let updates = experts_of(&model, perturb);
    let dst = tmp.path().join("out");
    let w = write_checkpoint(&src, &dst, &updates).unwrap();
    let raw = raw_tensors(&CheckpointSource::Dir(&src));
    check_written(&model, &raw, &dst, &updates);
    // The index's total_size (0 in the source, on purpose) now counts the data bytes.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let data: usize = raw.values().map(|(_, _, b)| b.len()).sum();
    assert_eq!(index["metadata"]["total_size"], data as u64);
    assert_eq!(w.tensor_bytes, data as u64);
    let src_index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"], src_index["weight_map"]);
    // The reloaded experts are the perturbation rounded to f16.
    let reloaded = Model::load(&dst).unwrap();
    let Ffn::Moe(m) = &reloaded.layers[1].ffn else {
        panic!()
    };
    let want = half::f16::from_f32(updates.layers[&1][3].down[[5, 7]]).to_f32();
    assert_eq!(m.experts[3].down[[5, 7]], want);
}

/// Entries of `dir` (to check that a refused write left nothing).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn refusals_name_the_path_or_field_and_leave_nothing_behind() {
    let src = fixture("olmoe");
    let model = Model::load(&src).unwrap();
    let own = experts_of(&model, |_, _, v| v);
    let tmp = tempfile::tempdir().unwrap();
    let err = |dst: &Path, u: &ExpertUpdates| {
        format!("{:#}", write_checkpoint(&src, dst, u).unwrap_err())
    };

    // A destination that exists and is not empty.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "x").unwrap();
    let e = err(&full, &own);
    assert!(e.contains("full") && e.contains("not empty"), "{e}");
    assert_eq!(entries(&full), vec!["keep.txt"]);
    // A file as destination.
    let e = err(&full.join("keep.txt"), &own);
    assert!(
        e.contains("keep.txt") && e.contains("not a directory"),
        "{e}"
    );
    // The source itself (not empty anyway) and a fresh directory inside it.
    let e = err(&src, &own);
    assert!(e.contains("not empty"), "{e}");
    let e = err(&src.join("sub/out"), &own);
    assert!(e.contains("inside") && e.contains("parity/olmoe"), "{e}");
    assert!(!src.join("sub").exists());

    let before = entries(tmp.path());
    let dst = tmp.path().join("out");
    // A wrong shape names the layer, expert and field.
    let mut bad = own.clone();
    let s = &mut bad.layers.get_mut(&1).unwrap()[2];
    s.down = s.down.slice(ndarray::s![.., ..5]).to_owned();
    let e = err(&dst, &bad);
    assert!(e.contains("layer 1 expert 2") && e.contains("down"), "{e}");
    // A wrong expert count.
    let mut bad = own.clone();
    bad.layers.get_mut(&0).unwrap().pop();
    let e = err(&dst, &bad);
    assert!(
        e.contains("layer 0") && e.contains("7 experts given"),
        "{e}"
    );
    // A layer that is not a MoE layer (DeepSeek-V2's first layer is dense) or does not exist.
    let ds = fixture("deepseek_v2");
    let ds_model = Model::load(&ds).unwrap();
    let mut bad = experts_of(&ds_model, |_, _, v| v);
    let e1 = bad.layers[&1].clone();
    bad.layers.insert(0, e1);
    let e = format!("{:#}", write_checkpoint(&ds, &dst, &bad).unwrap_err());
    assert!(
        e.contains("no MoE layer 0") && e.contains("config.json"),
        "{e}"
    );
    let mut bad = own.clone();
    let e0 = bad.layers[&0].clone();
    bad.layers.insert(9, e0);
    assert!(err(&dst, &bad).contains("no MoE layer 9"));
    // A non-finite value names the tensor.
    let mut bad = own.clone();
    bad.layers.get_mut(&1).unwrap()[4].gate_up[[3, 2]] = f32::NAN;
    let e = err(&dst, &bad);
    assert!(
        e.contains("model.layers.1.mlp.experts.4.gate_proj.weight") && e.contains("not finite"),
        "{e}"
    );
    assert_eq!(
        entries(tmp.path()),
        before,
        "a refused write leaves nothing"
    );

    // A finite value that overflows the source's bf16 names the tensor (embedded model).
    let kjv = embedded::load().unwrap();
    let mut bad = experts_of(&kjv, |_, _, v| v);
    bad.layers.get_mut(&2).unwrap()[1].down[[0, 0]] = f32::MAX;
    let e = format!(
        "{:#}",
        write_checkpoint_from(&embedded::source(), &dst, &bad).unwrap_err()
    );
    assert!(
        e.contains("model.layers.2.mlp.experts.1.down_proj.weight") && e.contains("overflows bf16"),
        "{e}"
    );
    assert_eq!(entries(tmp.path()), before);
}

#[test]
fn an_empty_destination_directory_is_filled() {
    let src = fixture("qwen2_moe");
    let model = Model::load(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("empty");
    std::fs::create_dir(&dst).unwrap();
    write_checkpoint(&src, &dst, &experts_of(&model, |_, _, v| v)).unwrap();
    assert!(logits(&model, &ids()) == logits(&Model::load(&dst).unwrap(), &ids()));
    assert_eq!(entries(tmp.path()), vec!["empty"]);
}

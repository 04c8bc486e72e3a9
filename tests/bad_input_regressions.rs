//! Every reproducer of the bad-input fuzz runs, kept as a regression case: each input gives a
//! clean error that names the file and field (or the flag) with the bad value, where it used to
//! panic, abort, hang, or print a NaN with exit status 0.
use std::fs;
use std::path::{Path, PathBuf};

use aimc::model::Model;
use aimc::tile::TilePreset;
use serde_json::{json, Value};
use tempfile::TempDir;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(family)
}

/// A temp copy of a parity fixture (config + weights).
fn copy_fixture(family: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture(family).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Sets `config.json` field `path` (dotted for nested objects) to `value`.
fn edit_config(dir: &Path, path: &str, value: Value) {
    let file = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    let mut cur = &mut c;
    let keys: Vec<&str> = path.split('.').collect();
    for k in &keys[..keys.len() - 1] {
        cur = cur.get_mut(*k).unwrap();
    }
    cur[keys[keys.len() - 1]] = value;
    fs::write(file, serde_json::to_vec(&c).unwrap()).unwrap();
}

fn load_error(dir: &Path) -> String {
    format!(
        "{:#}",
        Model::load(dir).expect_err("bad checkpoint must not load")
    )
}

/// Each config edit must be refused with an error naming config.json, the field and the value.
#[test]
fn config_sizes_and_constants_out_of_range_are_named() {
    let huge = u64::MAX;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        // Zero or wrapping sizes used to panic ("chunk size must be non-zero").
        ("olmoe", "intermediate_size", json!(0), "intermediate size"),
        (
            "olmoe",
            "intermediate_size",
            json!(1u64 << 63),
            "9223372036854775808",
        ),
        // Sizes allocated before any tensor was looked up (capacity overflow, allocation abort).
        ("olmoe", "vocab_size", json!(huge), "18446744073709551615"),
        (
            "olmoe",
            "hidden_size",
            json!(1u64 << 62),
            "4611686018427387904",
        ),
        (
            "olmoe",
            "num_hidden_layers",
            json!(1u64 << 63),
            "num_hidden_layers",
        ),
        (
            "olmoe",
            "num_hidden_layers",
            json!(1e12 as u64),
            "1000000000000",
        ),
        ("olmoe", "num_experts", json!(1e12 as u64), "num_experts"),
        ("olmoe", "vocab_size", json!(1e12 as u64), "vocab_size"),
        // A layer count the files do not hold.
        ("olmoe", "num_hidden_layers", json!(3), "layer 2"),
        // Constants that gave NaN or meaningless perplexities.
        (
            "olmoe",
            "rope_parameters.rope_theta",
            json!(0),
            "rope_theta",
        ),
        (
            "olmoe",
            "rope_parameters.rope_theta",
            json!(-5.0),
            "rope_theta",
        ),
        ("olmoe", "rms_norm_eps", json!(-1), "rms_norm_eps"),
        ("olmoe", "rms_norm_eps", json!(1e300), "1e300"),
        ("olmoe", "clip_qkv", json!(-1.0), "clip_qkv"),
        (
            "deepseek_v2",
            "routed_scaling_factor",
            json!(1e300),
            "routed_scaling_factor",
        ),
        (
            "deepseek_v2",
            "routed_scaling_factor",
            json!(0),
            "routed_scaling_factor",
        ),
        (
            "deepseek_v2",
            "n_shared_experts",
            json!(1u64 << 62),
            "n_shared_experts",
        ),
    ];
    for (family, field, value, expected) in cases {
        let dir = copy_fixture(family);
        edit_config(dir.path(), field, value.clone());
        let e = load_error(dir.path());
        assert!(
            e.contains("config.json") && e.contains(expected),
            "{family} {field} = {value}: {e}"
        );
    }
}

#[test]
fn rope_scaling_out_of_range_is_named() {
    let cases = [
        (
            json!({"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4}),
            "factor",
        ),
        (
            json!({"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}),
            "factor",
        ),
        (
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0, "rope_theta": 1e4}),
            "original_max_position_embeddings",
        ),
        (
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                   "original_max_position_embeddings": 64, "rope_theta": 1e4}),
            "high_freq_factor",
        ),
    ];
    for (rope, field) in cases {
        let dir = copy_fixture("olmoe");
        edit_config(dir.path(), "rope_parameters", rope.clone());
        let e = load_error(dir.path());
        assert!(
            e.contains("config.json") && e.contains(field),
            "{rope}: {e}"
        );
    }
}

#[test]
fn groups_that_cannot_hold_top_k_are_refused() {
    let dir = copy_fixture("deepseek_v2");
    edit_config(dir.path(), "topk_method", json!("group_limited_greedy"));
    edit_config(dir.path(), "n_group", json!(6));
    edit_config(dir.path(), "topk_group", json!(1));
    let e = load_error(dir.path());
    assert!(
        e.contains("n_group") && e.contains("topk_group") && e.contains("cannot hold"),
        "{e}"
    );
    // 3 groups of 2 experts, 1 kept: 2 experts hold top-2, so the same fields load.
    edit_config(dir.path(), "n_group", json!(3));
    Model::load(dir.path()).unwrap();
}

#[test]
fn memory_need_beyond_the_machine_is_refused_with_the_estimate() {
    // Consistent with the files where they are checked first (embedding, layers), but 65,536
    // experts of width 2^20 would need ~80 TB of f32.
    let dir = copy_fixture("olmoe");
    edit_config(dir.path(), "num_experts", json!(65_536));
    edit_config(dir.path(), "intermediate_size", json!(1 << 20));
    let e = load_error(dir.path());
    assert!(
        e.contains("needs")
            && e.contains("TB of host memory for f32 weights")
            && e.contains("available"),
        "{e}"
    );
}

#[test]
fn shard_paths_outside_the_checkpoint_are_refused_before_opening() {
    for target in [
        "/etc/hostname",
        "../../etc/passwd",
        "a/../../x.safetensors",
        "",
    ] {
        let dir = copy_fixture("olmoe");
        let index = json!({"weight_map": {"model.embed_tokens.weight": target}});
        fs::write(
            dir.path().join("model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let e = load_error(dir.path());
        assert!(
            e.contains("model.safetensors.index.json")
                && e.contains("weight_map.model.embed_tokens.weight"),
            "{target}: {e}"
        );
    }
}

#[cfg(unix)]
#[test]
fn symlinks_escaping_or_broken_and_non_regular_files_are_errors() {
    use std::os::unix::fs::symlink;
    // A shard symlinked to a file outside the checkpoint directory.
    let outside = TempDir::new().unwrap();
    fs::copy(
        fixture("olmoe").join("model.safetensors"),
        outside.path().join("w.safetensors"),
    )
    .unwrap();
    let dir = copy_fixture("olmoe");
    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    symlink(
        outside.path().join("w.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("outside the checkpoint directory"), "{e}");

    // A dangling and a looping tokenizer.json are errors, not "no tokenizer".
    for (name, target) in [("dangling", "missing.json"), ("looping", "tokenizer.json")] {
        let dir = copy_fixture("olmoe");
        symlink(target, dir.path().join("tokenizer.json")).unwrap();
        let e = load_error(dir.path());
        assert!(
            e.contains("tokenizer.json") && e.contains("symbolic link"),
            "{name}: {e}"
        );
    }

    // A directory in place of the weights (a FIFO is refused by the same check, before `open`).
    let dir = copy_fixture("olmoe");
    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("not a regular file"), "{e}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_fifo_in_place_of_the_weights_is_refused_without_blocking() {
    let dir = copy_fixture("olmoe");
    let path = dir.path().join("model.safetensors");
    fs::remove_file(&path).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    // Opening a FIFO blocks until a writer appears: the load must refuse it before `open`.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Model::load(&p).map(|_| ()).map_err(|e| format!("{e:#}")));
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading a FIFO blocked");
    let e = result.expect_err("a FIFO must not load");
    assert!(e.contains("not a regular file"), "{e}");
}

fn preset_with(edit: impl FnOnce(&mut Value)) -> Result<TilePreset, String> {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tiles/standard-hwa.json"))
            .unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    TilePreset::from_json_str(&serde_json::to_string(&v).unwrap(), "x.json")
        .map_err(|e| e.to_string())
}

#[test]
fn preset_constants_that_gave_nan_or_overflow_are_named() {
    let cases: Vec<(&str, Value)> = vec![
        ("periphery.ir_drop.g_ratio", json!(1e-30)),
        ("periphery.adc.bound", json!(3e38)),
        ("mapping.weight_scaling_omega", json!(1e-38)),
        ("periphery.w_noise.std", json!(1e30)),
        ("periphery.out_noise", json!(1e30)),
        ("stack.cols", json!(1u64 << 63)),
        ("stack.tiers_per_stack", json!(u64::MAX)),
        ("stack.tiers_per_stack", json!((1u64 << 53) + 1)),
        ("stack.rows", json!(1u64 << 40)),
        ("stack.stacks", json!(1u64 << 62)),
    ];
    for (field, value) in cases {
        let e = preset_with(|v| {
            let keys: Vec<&str> = field.split('.').collect();
            let mut cur = v;
            for k in &keys[..keys.len() - 1] {
                cur = cur.get_mut(*k).unwrap();
            }
            cur[keys[keys.len() - 1]] = value.clone();
        })
        .expect_err(field);
        assert!(
            e.contains("x.json") && e.contains(field),
            "{field} = {value}: {e}"
        );
    }
}

#[test]
fn unknown_fields_inside_tagged_enums_are_refused() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "noise_management",
            json!({"kind": "abs_max", "value": 3}),
            "periphery.noise_management.value",
        ),
        (
            "noise_management",
            json!({"kind": "none", "bogus": 1}),
            "periphery.noise_management.bogus",
        ),
        (
            "w_noise",
            json!({"kind": "none", "std": 5}),
            "periphery.w_noise.std",
        ),
    ];
    for (key, value, path) in cases {
        let e = preset_with(|v| v["periphery"][key] = value.clone()).expect_err(path);
        assert!(
            e.contains(path) && e.contains("unknown field"),
            "{value}: {e}"
        );
    }
    // The same kinds without the stray field load.
    preset_with(|v| v["periphery"]["w_noise"] = json!({"kind": "none"})).unwrap();
    preset_with(|v| v["periphery"]["noise_management"] = json!({"kind": "abs_max"})).unwrap();
}

/// Values near f64::MAX pad to an infinite axis range, on which the tick search never ended: the
/// chart is refused instead, promptly.
#[test]
fn a_chart_whose_range_overflows_is_an_error_not_a_hang() {
    use aimc::report::{write_line_chart, LineChart, Series};
    let dir = TempDir::new().unwrap();
    let stem = dir.path().join("chart");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let chart = LineChart {
            title: "overflow".into(),
            series: vec![Series {
                label: "y".into(),
                points: vec![(1.0, -1.7e308), (2.0, 1.7e308)],
                band: None,
            }],
            ..Default::default()
        };
        let _ = tx.send(write_line_chart(&chart, &stem).map_err(|e| format!("{e:#}")));
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("drawing the chart hung");
    let e = result.expect_err("an infinite axis range must not draw");
    assert!(e.contains("non-finite") && e.contains("overflow"), "{e}");
}

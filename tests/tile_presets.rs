//! Preset loading and validation: every malformed input names its file and field.
use aimc::tile::{PresetError, TilePreset};

#[test]
fn builtin_presets_load_and_match_their_files() {
    let names = TilePreset::builtin_names();
    for required in [
        "aihwkit-default",
        "standard-hwa",
        "hermes",
        "ideal",
        "pcm-3d-8tier",
    ] {
        assert!(names.contains(&required), "missing built-in {required}");
    }
    for name in names {
        let builtin = TilePreset::builtin(name).unwrap();
        assert_eq!(builtin.name, name);
        assert!(!builtin.description.is_empty());
        let file =
            TilePreset::load(format!("{}/tiles/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(builtin, file);
        assert_eq!(TilePreset::resolve(name).unwrap(), builtin);
    }
    let p = TilePreset::builtin("pcm-3d-8tier").unwrap();
    assert_eq!(
        (p.stack.rows, p.stack.cols, p.stack.tiers_per_stack),
        (512, 512, 8)
    );
    let p = TilePreset::builtin("aihwkit-default").unwrap();
    assert_eq!(p.periphery.dac.unwrap().bits, 7);
    assert_eq!(p.periphery.adc.unwrap().bits, 9);
    assert_eq!(p.periphery.adc.unwrap().bound, 12.0);
    assert_eq!(p.periphery.out_noise, 0.06);
    assert!(matches!(
        TilePreset::resolve("no-such-preset"),
        Err(PresetError::NotFound { .. })
    ));
}

/// (edit of the aihwkit-default JSON, field the error must name).
const BAD: &[(&str, &str, &str)] = &[
    (
        r#""out_noise": 0.06"#,
        r#""out_noise": 0.06, "out_nosie": 1"#,
        "periphery.out_nosie",
    ),
    (
        r#""stack": {"#,
        r#""stack": { "layers": 3,"#,
        "stack.layers",
    ),
    (r#""source""#, r#""colour": "red", "source""#, "colour"),
    (r#""bits": 9"#, r#""bits": -3"#, "periphery.adc.bits"),
    (r#""bits": 7"#, r#""bits": 0"#, "periphery.dac.bits"),
    (r#""bits": 9"#, r#""bits": 40"#, "periphery.adc.bits"),
    (
        r#""bound": 12.0"#,
        r#""bound": -12.0"#,
        "periphery.adc.bound",
    ),
    (
        r#""out_noise": 0.06"#,
        r#""out_noise": -0.06"#,
        "periphery.out_noise",
    ),
    (
        r#""out_noise": 0.06"#,
        r#""out_noise": NaN"#,
        "periphery.out_noise",
    ),
    (
        r#""out_noise": 0.06"#,
        r#""out_noise": "0.06""#,
        "periphery.out_noise",
    ),
    (
        r#""kind": "pcm" }"#,
        r#""kind": "pcm", "t0_seconds": 0 }"#,
        "device.t0_seconds",
    ),
    (
        r#""kind": "pcm" }"#,
        r#""kind": "pcm", "t0_seconds": -20.0 }"#,
        "device.t0_seconds",
    ),
    (
        r#""kind": "pcm" }"#,
        r#""kind": "pcm", "g_max_us": 0.0 }"#,
        "device.g_max_us",
    ),
    (
        r#""kind": "pcm" }"#,
        r#""kind": "quantum" }"#,
        "device.kind",
    ),
    (
        r#""kind": "pcm" }"#,
        r#""kind": "custom_drift" }"#,
        "device.drift_table",
    ),
    (r#""rows": 512"#, r#""rows": 0"#, "stack.rows"),
    (r#""cols": 512"#, r#""cols": 0"#, "stack.cols"),
    (
        r#""tiers_per_stack": 1"#,
        r#""tiers_per_stack": 0"#,
        "stack.tiers_per_stack",
    ),
    (
        r#""weight_scaling_omega": 1.0"#,
        r#""weight_scaling_omega": 0.0"#,
        "mapping.weight_scaling_omega",
    ),
    (
        r#""drift_compensation": "global""#,
        r#""drift_compensation": "local""#,
        "drift_compensation",
    ),
    (
        r#""kind": "abs_max""#,
        r#""kind": "constant", "value": -1"#,
        "periphery.noise_management.value",
    ),
    (
        r#""bound_management": "iterative""#,
        r#""bound_management": "sometimes""#,
        "periphery.bound_management",
    ),
];

#[test]
fn every_malformed_preset_names_file_and_field() {
    let good = include_str!("../tiles/aihwkit-default.json");
    assert!(TilePreset::from_json_str(good, "x.json").is_ok());
    for (from, to, field) in BAD {
        assert!(
            good.contains(from),
            "test table: `{from}` not in the preset"
        );
        let text = good.replacen(from, to, 1);
        let err = TilePreset::from_json_str(&text, "tiles/broken.json").expect_err(to);
        let msg = err.to_string();
        assert!(msg.starts_with("tiles/broken.json: "), "{msg}");
        assert_eq!(err.field(), Some(*field), "edit `{to}` → {msg}");
        assert!(msg.contains(&format!("`{field}`")), "{msg}");
    }
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = TilePreset::load("/nonexistent/p.json").unwrap_err();
    assert!(matches!(err, PresetError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/p.json"));
}

#[test]
fn a_preset_written_to_disk_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = TilePreset::builtin("standard-hwa").unwrap();
    let path = dir.path().join("mine.json");
    std::fs::write(&path, serde_json::to_string_pretty(&p).unwrap()).unwrap();
    assert_eq!(TilePreset::resolve(path.to_str().unwrap()).unwrap(), p);
}

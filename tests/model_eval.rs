//! `aimc eval --digital` end to end on the olmoe parity fixture with a word-level tokenizer.
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use aimc::eval::perplexity;
use aimc::model::{ForwardOptions, Model};
use tempfile::TempDir;

fn checkpoint_with_tokenizer() -> TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/olmoe");
    let dir = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let vocab: HashMap<String, usize> = (0..101).map(|i| (format!("t{i}"), i)).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let text: Vec<String> = (0..300)
        .map(|i| format!("t{}", (i * 37 + i / 7) % 101))
        .collect();
    fs::write(dir.path().join("text.txt"), text.join(" ")).unwrap();
    dir
}

#[test]
fn eval_cli_reports_the_library_perplexity_as_json() {
    let dir = checkpoint_with_tokenizer();
    let out = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args([
            "eval",
            "--digital",
            "--json",
            "--seq-len",
            "64",
            "--tokens",
            "200",
            "--model",
        ])
        .arg(dir.path())
        .arg("--text")
        .arg(dir.path().join("text.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 200 tokens in windows of 64, 64, 64, 8: each window's first token is not scored.
    assert_eq!(v["windows"], 4);
    assert_eq!(v["tokens_processed"], 200);
    assert_eq!(v["tokens"], 196);
    let model = Model::load(dir.path()).unwrap();
    let text = fs::read_to_string(dir.path().join("text.txt")).unwrap();
    let ids = model.tokenizer().unwrap().encode(&text).unwrap();
    let lib = perplexity(&model, &ids[..200], 64, &ForwardOptions::default(), false).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - lib.perplexity).abs() < 1e-9 * ppl,
        "{ppl} vs {}",
        lib.perplexity
    );
    assert!((ppl.ln() - v["nll"].as_f64().unwrap()).abs() < 1e-12);
}

#[test]
fn eval_cli_bad_flags_explain_themselves() {
    let bad_router = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["eval", "--digital", "--router", "top9"])
        .output()
        .unwrap();
    assert!(!bad_router.status.success());
    assert!(String::from_utf8_lossy(&bad_router.stderr).contains("unknown router"));
    let bad_time = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["eval", "--times", "0,3parsecs"])
        .output()
        .unwrap();
    assert!(!bad_time.status.success());
    let err = String::from_utf8_lossy(&bad_time.stderr);
    assert!(err.contains("--times") && err.contains("parsecs"), "{err}");
}

#[test]
fn analog_eval_cli_writes_json_table_and_plots() {
    let dir = checkpoint_with_tokenizer();
    let out_dir = dir.path().join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args([
            "eval",
            "--preset",
            "standard-hwa",
            "--times",
            "0,1d",
            "--seeds",
            "2",
        ])
        .args([
            "--tokens",
            "120",
            "--seq-len",
            "60",
            "--compare-strategies",
            "ideal",
        ])
        .args(["--sweep-digital", "0,0.5", "--model"])
        .arg(dir.path())
        .arg("--text")
        .arg(dir.path().join("text.txt"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    // 2 times × 2 seeds per run; the ideal preset reproduces the digital perplexity.
    assert_eq!(runs[0]["report"]["points"].as_array().unwrap().len(), 4);
    let digital = runs[1]["report"]["digital_perplexity"].as_f64().unwrap();
    for p in runs[1]["report"]["points"].as_array().unwrap() {
        let ppl = p["perplexity"].as_f64().unwrap();
        assert!((ppl - digital).abs() < 1e-5 * digital, "{ppl} vs {digital}");
    }
    assert_eq!(v["digital_sweep"].as_array().unwrap().len(), 2);
    for f in [
        "eval.md",
        "perplexity_vs_time.png",
        "perplexity_vs_time.svg",
        "agreement_vs_time.png",
        "digital_sweep.png",
    ] {
        assert!(out_dir.join(f).is_file(), "missing {f}");
    }
}

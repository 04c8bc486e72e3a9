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
fn eval_cli_without_digital_flag_or_model_explains_itself() {
    let no_flag = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["eval"])
        .output()
        .unwrap();
    assert!(!no_flag.status.success());
    assert!(String::from_utf8_lossy(&no_flag.stderr).contains("--digital"));
    let bad_router = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["eval", "--digital", "--router", "top9"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad_router.stderr).contains("unknown router"));
}

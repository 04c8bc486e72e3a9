//! `aimc finetune` refuses bad input before any long work, naming the flag and the bad value.
use std::process::Command;

fn finetune(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .arg("finetune")
        .args(args)
        .output()
        .expect("runs the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_errors_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("out");
    let fresh = fresh.to_str().unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), "x").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "In the beginning").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--steps", "0", "--out", fresh], "--steps 0"),
        (vec!["--lr", "NaN", "--out", fresh], "--lr NaN"),
        (vec!["--lr=-1", "--out", fresh], "--lr -1"),
        (
            vec!["--batch-tokens", "0", "--out", fresh],
            "--batch-tokens 0",
        ),
        (
            vec!["--calib-tokens", "10", "--out", fresh],
            "--calib-tokens 10",
        ),
        (
            vec!["--drift-time", "3x", "--out", fresh],
            "--drift-time 3x",
        ),
        (
            vec!["--out", full.to_str().unwrap()],
            "not an empty directory",
        ),
        (
            vec!["--calib", short.to_str().unwrap(), "--out", fresh],
            "at least 64 are needed",
        ),
        (vec!["--layers", "9", "--out", fresh], "--layers 9"),
        (
            vec!["--model", full.to_str().unwrap(), "--out", fresh],
            "--calib TEXT is required",
        ),
    ];
    for (args, want) in cases {
        let (ok, err) = finetune(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new(fresh).exists(), "nothing written");
}

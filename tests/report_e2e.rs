//! `aimc report` end to end on the embedded model with reduced times and seeds: every file `index.md` links exists,
//! every PNG decodes, and `report.json` carries the digital perplexity, the analog perplexity per drift time, the
//! mapping summary and the energy per token.
use std::path::Path;
use std::process::Command;

fn linked_files(index_md: &str) -> Vec<String> {
    let mut files: Vec<String> = index_md
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(str::to_string)
        .collect();
    // Files named in backticks in the "Files" section.
    if let Some(section) = index_md.split("## Files").nth(1) {
        files.extend(
            section
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|f| f.ends_with(".json"))
                .map(str::to_string),
        );
    }
    files
}

#[test]
fn report_writes_every_linked_file_and_a_complete_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rep");
    let status = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args([
            "report", "--times", "0,1d", "--seeds", "2", "--tokens", "512",
        ])
        .args([
            "--sweep-digital",
            "0,0.25",
            "--sweep-seeds",
            "1",
            "--sweep-tokens",
            "256",
            "--task-items",
            "12",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let index = std::fs::read_to_string(out.join("index.md")).unwrap();
    let files = linked_files(&index);
    assert!(files.len() >= 10, "index.md links only {files:?}");
    for f in &files {
        let path = out.join(f);
        assert!(path.is_file(), "index.md links {f}, which was not written");
        if f.ends_with(".png") {
            let img = image::open(&path).unwrap_or_else(|e| panic!("{f} does not decode: {e}"));
            assert!(
                img.width() >= 400 && img.height() >= 300,
                "{f} is {}×{}",
                img.width(),
                img.height()
            );
        }
        if f.ends_with(".png") {
            assert!(
                Path::new(&path.with_extension("svg")).is_file(),
                "{f} has no SVG twin"
            );
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["schema_version"], 1);
    let digital = v["accuracy"]["digital_perplexity"].as_f64().unwrap();
    assert!(
        digital > 1.0 && digital < 100.0,
        "digital perplexity {digital}"
    );
    let summary = v["accuracy"]["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 2);
    assert_eq!(summary[1]["t_seconds"], 86_400.0);
    for s in summary {
        let ppl = s["perplexity_mean"].as_f64().unwrap();
        assert!(
            ppl >= digital * 0.98 && ppl < digital * 2.0,
            "analog perplexity {ppl} vs digital {digital}"
        );
    }
    assert_eq!(v["accuracy"]["points"].as_array().unwrap().len(), 4);
    // The shipped multiple-choice task, digital beside analog per drift time.
    let task = &v["accuracy"]["task"];
    assert_eq!(task["items"], 12);
    assert_eq!(task["points"].as_array().unwrap().len(), 4);
    assert_eq!(task["summary"].as_array().unwrap().len(), 2);
    for key in ["acc", "acc_norm"] {
        let d = task["digital"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d), "digital {key} {d}");
        // 12 items: accuracies are multiples of 1/12.
        assert!(
            (d * 12.0 - (d * 12.0).round()).abs() < 1e-9,
            "digital {key} {d}"
        );
    }
    assert!(v["mapping"]["stacks_used"].as_u64().unwrap() >= 1);
    assert_eq!(v["digital_sweep"].as_array().unwrap().len(), 2);
    // Energy per token of the default (costed) preset, decode at batches 1, 8, 64 plus prefill, beside the GPU.
    let decode = v["energy"]["decode"].as_array().unwrap();
    assert_eq!(decode.len(), 3);
    for d in decode {
        // Components are named fields: per layer and outside the layers they add up to the total.
        let per_layer = d["energy"]["per_layer"].as_array().unwrap();
        let total: f64 = per_layer
            .iter()
            .chain(std::iter::once(&d["energy"]["outside_layers"]))
            .flat_map(|c| c.as_object().unwrap().values())
            .map(|x| x.as_f64().unwrap())
            .sum();
        let named = d["energy"]["total_j"].as_f64().unwrap();
        assert!((total - named).abs() <= 1e-9 * named, "{total} vs {named}");
        assert!(!d["bottleneck"]["description"].as_str().unwrap().is_empty());
        assert!(
            total > 0.0 && total < 1.0,
            "decode energy per token {total} J"
        );
    }
    assert!(
        v["energy"]["gpu_decode"][0]["energy_per_token_j"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

//! Evaluation against the original model (`eval::analog::evaluate_against`, `aimc eval
//! --reference`): measured against itself a model gives exactly its usual sweep; measured against
//! another model on ideal tiles, KL, agreement and both digital perplexities equal what the two
//! digital models give directly; models of different architectures are refused naming both.
mod common;

use std::path::Path;
use std::process::Command;

use aimc::backend::cpu::references_on_host;
use aimc::backend::score::compare;
use aimc::eval::analog::{evaluate, evaluate_against, windows, AnalogEvalConfig};
use aimc::eval::reference::{check_compatible, ReferenceModel};
use aimc::eval::task::{Task, TaskSequences};
use aimc::model::{embedded, Ffn, Model, RouterKind};
use aimc::tile::TilePreset;

const SEQ_LEN: usize = 128;

fn config(times: &[f64], seeds: u64) -> AnalogEvalConfig {
    AnalogEvalConfig {
        times_s: times.to_vec(),
        seeds: (0..seeds).collect(),
        seq_len: SEQ_LEN,
        router: RouterKind::default(),
        progress: false,
        device: None,
        execution: Default::default(),
    }
}

/// The embedded model with every routed expert weight changed by a few percent: close to the
/// original, but measurably different.
fn perturbed_embedded() -> Model {
    let mut m = embedded::load().unwrap();
    for layer in &mut m.layers {
        if let Ffn::Moe(b) = &mut layer.ffn {
            for (e, s) in b.experts.iter_mut().enumerate() {
                for (k, v) in s.down.iter_mut().enumerate() {
                    *v *= 1.0 + 0.15 * (((e * 131 + k) as f32) * 0.7).sin();
                }
            }
        }
    }
    m
}

#[test]
fn measured_against_itself_a_model_gives_its_usual_sweep() {
    let (model, ids) = common::embedded_model_and_tokens(384);
    let preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let mapping = common::default_mapping(&model, &preset);
    let cfg = config(&[0.0, 86_400.0], 2);
    let plain = evaluate(&model, &mapping, &preset, &ids, &cfg).unwrap();
    let against = evaluate_against(
        &model,
        &mapping,
        &preset,
        &ids,
        &cfg,
        None,
        Some(ReferenceModel {
            model: &model,
            name: "itself",
        }),
    )
    .unwrap();
    assert_eq!(plain.points.len(), against.points.len());
    for (a, b) in plain.points.iter().zip(&against.points) {
        assert_eq!(
            (a.perplexity, a.agreement, a.kl),
            (b.perplexity, b.agreement, b.kl)
        );
    }
    assert_eq!(plain.digital_perplexity, against.digital_perplexity);
    let r = against.reference.unwrap();
    assert_eq!(r.model, "itself");
    assert_eq!(r.reference_digital_perplexity, plain.digital_perplexity);
    // The model's own digital perplexity (from the backend's digital log-likelihoods) agrees
    // with the reference's (from its log-softmax) to f32 rounding.
    assert!(r.digital_perplexity_change_percent.abs() < 1e-3, "{r:?}");
    assert!(plain.reference.is_none());
}

#[test]
fn against_another_model_on_ideal_tiles_the_metrics_are_the_two_digital_models() {
    let (original, ids) = common::embedded_model_and_tokens(512);
    let tuned = perturbed_embedded();
    let preset = TilePreset::builtin("ideal").unwrap();
    let mapping = common::default_mapping(&tuned, &preset);
    let task = Task::shipped().unwrap().subset(6);
    let task = TaskSequences::for_model(&task, &tuned, SEQ_LEN).unwrap();
    let r = evaluate_against(
        &tuned,
        &mapping,
        &preset,
        &ids,
        &config(&[0.0], 1),
        Some(&task),
        Some(ReferenceModel {
            model: &original,
            name: "kjv-moe",
        }),
    )
    .unwrap();

    // What the two digital models give directly on the same windows.
    let seqs = windows(&ids, SEQ_LEN);
    let router = RouterKind::default();
    let refs = references_on_host(&original, &seqs, router).unwrap();
    let own = references_on_host(&tuned, &seqs, router).unwrap();
    let (mut kl, mut agree, mut positions, mut nll_ref, mut nll_own) = (0.0, 0, 0, 0.0, 0.0);
    for ((r0, r1), s) in refs.iter().zip(&own).zip(&seqs) {
        let sums = compare(r0, r1.logp.view(), &s[1..]);
        kl += sums.kl;
        agree += sums.agree;
        positions += sums.positions;
        nll_ref += r0.nll(&s[1..]);
        nll_own += r1.nll(&s[1..]);
    }
    let (kl, agree) = (kl / positions as f64, agree as f64 / positions as f64);
    let (ppl_ref, ppl_own) = (
        (nll_ref / positions as f64).exp(),
        (nll_own / positions as f64).exp(),
    );
    // The perturbation matters: scoring against the model's own digital outputs would give
    // KL ≈ 0 and agreement ≈ 1 on ideal tiles.
    assert!(kl > 1e-3 && agree < 0.99, "KL {kl}, agreement {agree}");
    let p = &r.points[0];
    assert!((p.kl - kl).abs() < 1e-3 * kl, "KL {} vs {kl}", p.kl);
    // Ideal tiles move a near-tie argmax at most rarely: within 2 positions.
    assert!(
        (p.agreement - agree).abs() <= 2.0 / positions as f64,
        "agreement {} vs {agree}",
        p.agreement
    );
    assert!((p.perplexity / ppl_own - 1.0).abs() < 1e-5);
    assert_eq!(r.digital_perplexity, ppl_ref);
    let s = r.reference.as_ref().unwrap();
    assert!((s.model_digital_perplexity / ppl_own - 1.0).abs() < 1e-6);
    let change = 100.0 * (ppl_own / ppl_ref - 1.0);
    assert!((s.digital_perplexity_change_percent - change).abs() < 1e-3);

    // The task: the tuned model's digital accuracy beside the original's.
    let t = r.task.as_ref().unwrap();
    let seqs: Vec<&[u32]> = task.tokens.iter().map(Vec::as_slice).collect();
    let acc = |m: &Model| {
        let ll = aimc::backend::cpu::digital_log_likelihoods(m, router, &seqs, &task.from).unwrap();
        aimc::eval::task::accuracy(&task.choices, &task.answers, &task.choice_bytes, &ll).unwrap()
    };
    assert_eq!(t.reference_digital, Some(acc(&original)));
    assert_eq!(t.digital, acc(&tuned));
    assert!(t
        .markdown_table()
        .contains("original (reference) model's digital accuracy"));
}

#[test]
fn different_architectures_are_refused_naming_both_models() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let a = Model::load(&fixtures.join("olmoe")).unwrap();
    let b = Model::load(&fixtures.join("olmoe_clipqkv")).unwrap();
    let e = check_compatible(&a, "tuned-dir", &b, "orig-dir", "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tuned-dir") && e.contains("orig-dir") && e.contains("`attention`"),
        "{e}"
    );
}

/// The `aimc` binary: Cargo's build of it, or `AIMC_BIN` where the test binary runs on another
/// machine than it was built on (the GPU machine, which runs this file for its ignored test).
fn aimc(args: &[&str]) -> std::process::Output {
    let bin = std::env::var_os("AIMC_BIN")
        .unwrap_or_else(|| std::ffi::OsString::from(env!("CARGO_BIN_EXE_aimc")));
    Command::new(bin).args(args).output().unwrap()
}

/// [`perturbed_embedded`] written as a checkpoint directory at `dir`.
fn write_perturbed(dir: &Path) {
    let tuned = perturbed_embedded();
    let mut updates = aimc::model::write::ExpertUpdates::default();
    for (l, layer) in tuned.layers.iter().enumerate() {
        if let Ffn::Moe(b) = &layer.ffn {
            updates.layers.insert(l, b.experts.clone());
        }
    }
    aimc::model::write::write_checkpoint_from(&embedded::source(), dir, &updates).unwrap();
}

#[test]
fn the_command_line_measures_a_written_checkpoint_against_the_embedded_original() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned_dir = tmp.path().join("tuned");
    write_perturbed(&tuned_dir);
    let out_dir = tmp.path().join("eval");
    let tuned_arg = tuned_dir.to_str().unwrap();
    let out = aimc(&[
        "eval",
        "--model",
        tuned_arg,
        "--reference",
        "embedded",
        "--preset",
        "ideal",
        "--tokens",
        "200",
        "--seq-len",
        "100",
        "--seeds",
        "1",
        "--times",
        "0",
        "--backend",
        "cpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("against the original model's digital outputs (kjv-moe (embedded))"),
        "{stdout}"
    );
    assert!(stdout.contains("KL(original digital‖analog)"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("eval.json")).unwrap()).unwrap();
    let reference = &json["runs"][0]["report"]["reference"];
    assert_eq!(reference["model"], "kjv-moe (embedded)");
    assert_eq!(
        reference["measured_against"],
        "the original model's digital outputs (kjv-moe (embedded))"
    );
    assert!(
        reference["digital_perplexity_change_percent"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // --digital: both digital perplexities.
    let out = aimc(&[
        "eval",
        "--digital",
        "--model",
        tuned_arg,
        "--reference",
        "embedded",
        "--tokens",
        "200",
        "--seq-len",
        "100",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Digital perplexity:"),
        "{stdout}"
    );

    // A reference of another architecture: an error naming both, before any evaluation.
    let olmoe = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/olmoe");
    let out = aimc(&[
        "eval",
        "--model",
        tuned_arg,
        "--reference",
        olmoe.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("different architectures")
            && stderr.contains("parity/olmoe")
            && stderr.contains("tuned"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn against_a_reference_the_gpu_matches_the_cpu() {
    use aimc::backend::{BackendRequest, Execution};
    let (original, ids) = common::embedded_model_and_tokens(1024);
    let tuned = perturbed_embedded();
    let preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let mapping = common::default_mapping(&tuned, &preset);
    let run = |execution| {
        let cfg = AnalogEvalConfig {
            execution,
            ..config(&[0.0, 86_400.0], 2)
        };
        let reference = ReferenceModel {
            model: &original,
            name: "original",
        };
        evaluate_against(&tuned, &mapping, &preset, &ids, &cfg, None, Some(reference)).unwrap()
    };
    let cpu = run(Execution::cpu());
    let gpu = run(Execution::resolve(BackendRequest::Cuda).unwrap());
    println!("{}", gpu.backend);
    assert!(gpu.backend.starts_with("cuda"), "{}", gpu.backend);
    assert_eq!(
        cpu.digital_perplexity, gpu.digital_perplexity,
        "both on the host"
    );
    let (c, g) = (cpu.reference.unwrap(), gpu.reference.unwrap());
    assert!((c.model_digital_perplexity / g.model_digital_perplexity - 1.0).abs() < 1e-9);
    for (c, g) in cpu.points.iter().zip(&gpu.points) {
        println!(
            "t = {} s, seed {}: KL CPU {:.5} GPU {:.5}; agreement {:.4} vs {:.4}; perplexity {:.4} vs {:.4}",
            c.t_seconds, c.seed, c.kl, g.kl, c.agreement, g.agreement, c.perplexity, g.perplexity
        );
        // Same conductances and noise draws; only rare one-step ADC flips of the split-fp16
        // operands differ (the bound of gpu_backend's whole-model test).
        assert!((c.perplexity / g.perplexity - 1.0).abs() < 5e-3);
        assert!((c.agreement - g.agreement).abs() < 0.01);
        assert!((c.kl - g.kl).abs() < 0.05 * c.kl, "KL {} vs {}", c.kl, g.kl);
    }
}

#[test]
fn the_report_shows_before_and_after_against_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned_dir = tmp.path().join("tuned");
    write_perturbed(&tuned_dir);
    let out_dir = tmp.path().join("report");
    let out = aimc(&[
        "report",
        "--model",
        tuned_dir.to_str().unwrap(),
        "--reference",
        "embedded",
        "--preset",
        "pcm-3d-8tier",
        "--tokens",
        "160",
        "--times",
        "0,1y",
        "--seeds",
        "2",
        "--task-items",
        "3",
        "--backend",
        "cpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("index.md")).unwrap();
    assert!(
        md.contains("## Before and after: original vs fine-tuned"),
        "{md}"
    );
    assert!(md.contains("against the original model's digital outputs (kjv-moe (embedded))"));
    assert!(
        md.contains("| 1 y |") && md.contains("acc, fine-tuned"),
        "{md}"
    );
    assert!(
        !md.contains("## Heterogeneous"),
        "no sweep with --reference"
    );
    for stem in [
        "kl_vs_time",
        "agreement_vs_time",
        "perplexity_vs_time",
        "task_vs_time",
    ] {
        for ext in ["png", "svg"] {
            let f = out_dir.join(format!("{stem}.{ext}"));
            assert!(
                std::fs::metadata(&f)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{}",
                f.display()
            );
        }
    }
    let svg = std::fs::read_to_string(out_dir.join("kl_vs_time.svg")).unwrap();
    assert!(svg.contains("original") && svg.contains("fine-tuned"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["reference"], "kjv-moe (embedded)");
    // The original's own sweep is against its own digital outputs, the same the fine-tuned one is
    // measured against: the same digital perplexity.
    let before = &json["accuracy_original"];
    let after = &json["accuracy"];
    assert_eq!(before["digital_perplexity"], after["digital_perplexity"]);
    assert!(before.get("reference").is_none() && after["reference"].is_object());
}

#[test]
fn the_logits_dump_is_the_digital_forward_of_the_first_window() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("logits.safetensors");
    let out = aimc(&[
        "eval",
        "--digital",
        "--json",
        "--tokens",
        "40",
        "--seq-len",
        "24",
        "--logits-out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (model, ids) = common::embedded_model_and_tokens(24);
    let got_ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    assert_eq!(got_ids, ids);
    let logits = st.tensor("logits").unwrap();
    let want = model.forward(&ids, &Default::default()).unwrap().logits;
    assert_eq!(logits.shape(), &[1, 24, want.ncols()]);
    let got: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(
        got == want.iter().copied().collect::<Vec<_>>(),
        "bit-identical logits"
    );
    // Only with --digital.
    let out = aimc(&["eval", "--logits-out", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --digital"));
}

//! Multiple-choice task accuracy: the scoring rule against a hand-computed example, the task
//! file's validation errors, the harness's tokenisation and truncation, the backend's
//! log-likelihoods against the perplexity path, and the shipped task's builder.

mod common;

use aimc::backend::{AnalogWork, Backend, CpuBackend, Description, Phases, Reference, ScoreSums};
use aimc::eval::task::build::{build_items, build_jsonl, verses, DEFAULT_SEED};
use aimc::eval::task::{accuracy, Task, TaskSequences};
use aimc::model::RouterKind;
use aimc::tile::TilePreset;
use anyhow::{bail, Result};

/// One token per byte: the continuation's tokens are exactly its bytes.
fn byte_tokens(s: &str) -> Result<Vec<u32>> {
    Ok(s.bytes().map(u32::from).collect())
}

/// A log-probability source where every token has a fixed log-probability whatever its
/// context, so every choice's sum is known by hand.
struct FixedLogProbs {
    seen: Vec<(Vec<u32>, usize)>,
}

fn logp(token: u32) -> f64 {
    match token as u8 {
        b' ' => -0.5,
        b'c' | b'w' => -3.0,
        b'd' | b'y' | b'e' => -1.0,
        b'z' => -2.0,
        other => panic!("no log-probability for {:?}", other as char),
    }
}

impl Backend for FixedLogProbs {
    fn program(&mut self, _: u64) -> Result<()> {
        bail!("not used")
    }
    fn drift_to(&mut self, _: f64) -> Result<()> {
        bail!("not used")
    }
    fn reference(&mut self, _: &[&[u32]]) -> Result<Vec<Reference>> {
        bail!("not used")
    }
    fn forward(&mut self, _: &[&[u32]], _: &[Reference]) -> Result<ScoreSums> {
        bail!("not used")
    }
    fn log_likelihoods(&mut self, seqs: &[&[u32]], from: &[usize], _: bool) -> Result<Vec<f64>> {
        self.seen = seqs.iter().map(|s| s.to_vec()).zip(from.to_vec()).collect();
        Ok(seqs
            .iter()
            .zip(from)
            .map(|(s, &f)| s[f..].iter().map(|&t| logp(t)).sum())
            .collect())
    }
    fn describe(&self) -> Description {
        Description {
            device: "test".into(),
            gpu: None,
        }
    }
    fn phases(&self) -> Phases {
        Phases::default()
    }
}

const HAND_TASK: &str = r#"{"context": "ab", "choices": ["c", "dd"], "answer": 1}
{"context": "x ", "choices": ["yy", "z"], "answer": 0}

{"context": "q", "choices": ["w", "eeee"], "answer": 1, "id": "extra fields are allowed"}
"#;

#[test]
fn scoring_matches_a_hand_computed_example() {
    let task = Task::parse(HAND_TASK.as_bytes(), "hand.jsonl", "hand".into()).unwrap();
    assert_eq!(task.items.len(), 3, "the blank line is skipped");
    let seqs = TaskSequences::prepare(&task, 64, byte_tokens).unwrap();
    // The context's trailing space moves to the choice: " yy" and " z" are scored.
    assert_eq!(seqs.tokens[2], byte_tokens("x yy").unwrap());
    assert_eq!(seqs.from[2], 1);
    assert_eq!(seqs.choice_bytes, vec![1, 2, 2, 1, 1, 4]);
    let mut b = FixedLogProbs { seen: Vec::new() };
    let a = seqs.score(&mut b, true).unwrap();
    // Item 1: sums c −3, dd −2 → 1 (right); per byte −3, −1 → 1 (right).
    // Item 2: sums " yy" −2.5, " z" −2.5, a tie → the first, 0 (right); per byte of the
    //         choice as written ("yy" 2, "z" 1): −1.25, −2.5 → 0 (right).
    // Item 3: sums w −3, eeee −4 → 0 (wrong); per byte −3, −1 → 1 (right).
    assert_eq!(a.acc, 2.0 / 3.0);
    assert_eq!(a.acc_norm, 1.0);
    assert_eq!(b.seen.len(), 6);
    assert_eq!(b.seen[5], (byte_tokens("qeeee").unwrap(), 1));
}

#[test]
fn accuracy_rejects_non_finite_log_likelihoods_and_mismatched_lengths() {
    let e = accuracy(&[2], &[0], &[1, 1], &[-1.0, f64::NAN]).unwrap_err();
    assert!(e.to_string().contains("sequence 1 is NaN"), "{e}");
    assert!(accuracy(&[2], &[0], &[1, 1], &[-1.0]).is_err());
}

fn parse_err(body: &[u8]) -> String {
    format!(
        "{:#}",
        Task::parse(body, "t.jsonl", "t".into()).expect_err("must be rejected")
    )
}

const GOOD: &str = r#"{"context": "a", "choices": ["b", "c"], "answer": 0}"#;

#[test]
fn validation_names_the_file_line_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"context": "a", "choices": ["b""#,
            "t.jsonl:2: not valid JSON",
        ),
        (
            r#"[1, 2]"#,
            "t.jsonl:2: expected a JSON object, got an array",
        ),
        (
            r#"{"choices": ["b", "c"], "answer": 0}"#,
            "t.jsonl:2: field `context` is missing",
        ),
        (
            r#"{"context": "  ", "choices": ["b", "c"], "answer": 0}"#,
            "t.jsonl:2: field `context` is empty",
        ),
        (
            r#"{"context": 3, "choices": ["b", "c"], "answer": 0}"#,
            "t.jsonl:2: field `context`: expected a string, got a number",
        ),
        (
            r#"{"context": "a", "choices": [], "answer": 0}"#,
            "t.jsonl:2: field `choices` has 0 choice(s)",
        ),
        (
            r#"{"context": "a", "choices": "b", "answer": 0}"#,
            "t.jsonl:2: field `choices`: expected an array of strings, got a string",
        ),
        (
            r#"{"context": "a", "choices": ["b", 7], "answer": 0}"#,
            "t.jsonl:2: field `choices[1]`: expected a string, got a number",
        ),
        (
            r#"{"context": "a", "choices": ["b", ""], "answer": 0}"#,
            "t.jsonl:2: field `choices[1]` is an empty string",
        ),
        (
            r#"{"context": "a", "choices": ["b", "c"], "answer": 2}"#,
            "t.jsonl:2: field `answer`: 2 is out of range 0..=1 (2 choices)",
        ),
        (
            r#"{"context": "a", "choices": ["b", "c"], "answer": -1}"#,
            "t.jsonl:2: field `answer`: expected an index 0..=1 into `choices`, got -1",
        ),
        (
            r#"{"context": "a", "choices": ["b", "c"], "answer": 0.5}"#,
            "got 0.5",
        ),
        (
            r#"{"context": "a", "choices": ["b", "c"]}"#,
            "t.jsonl:2: field `answer` is missing",
        ),
    ];
    for (line, want) in cases {
        let body = format!("{GOOD}\n{line}\n");
        let e = parse_err(body.as_bytes());
        assert!(e.contains(want), "{line}: got `{e}`, want `{want}`");
    }
    let mut bad_utf8 = format!("{GOOD}\n{GOOD}\n").into_bytes();
    bad_utf8.extend_from_slice(b"{\"context\": \"caf\xe9\"}\n");
    let e = parse_err(&bad_utf8);
    assert!(
        e.contains("t.jsonl:3: not UTF-8 (invalid byte 0xe9 at byte 17"),
        "{e}"
    );
    assert!(parse_err(b"\n  \n").contains("t.jsonl: the task has no items"));
}

#[test]
fn loading_names_the_path() {
    let dir = std::env::temp_dir().join(format!("aimc-task-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, format!("{GOOD}\n{{\"context\": \"a\"}}\n")).unwrap();
    let e = format!("{:#}", Task::load(&path).unwrap_err());
    assert!(
        e.contains(&format!("{}:2: field `choices` is missing", path.display())),
        "{e}"
    );
    let missing = dir.join("missing.jsonl");
    let e = format!("{:#}", Task::load(&missing).unwrap_err());
    assert!(e.contains("missing.jsonl"), "{e}");
    // The command line rejects it before loading any model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["eval", "--seeds", "1", "--times", "0", "--task"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":2: field `choices` is missing"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn long_items_are_left_truncated_and_overlong_choices_rejected() {
    let task = Task::parse(
        br#"{"context": "abcdefgh", "choices": ["yy", "z"], "answer": 0}"#,
        "t.jsonl",
        "t".into(),
    )
    .unwrap();
    // Window 4: keep the last 5 tokens ("efgh" fed, 4 of them as context); "fghyy" scores yy.
    let s = TaskSequences::prepare(&task, 4, byte_tokens).unwrap();
    assert_eq!(s.tokens[0], byte_tokens("fghyy").unwrap());
    assert_eq!(s.from[0], 3);
    assert_eq!(s.tokens[1], byte_tokens("efghz").unwrap());
    assert_eq!(s.from[1], 4);
    assert_eq!(s.truncated_items, 1);
    // A choice of more tokens than the window cannot be scored.
    let e = format!(
        "{:#}",
        TaskSequences::prepare(&task, 1, byte_tokens).unwrap_err()
    );
    assert!(
        e.contains("`choices[0]` has 2 tokens, more than the window of 1 tokens"),
        "{e}"
    );
}

#[test]
fn backend_log_likelihoods_match_the_perplexity_path_and_ideal_tiles() {
    let (model, ids) = common::embedded_model_and_tokens(96);
    let preset = TilePreset::builtin("ideal").unwrap();
    let mapping = common::default_mapping(&model, &preset);
    let seqs: Vec<&[u32]> = vec![&ids[..40], &ids[40..96]];
    let mut b = CpuBackend::new(AnalogWork {
        model: &model,
        mapping: &mapping,
        preset: &preset,
        router: RouterKind::default(),
        device: None,
        first_seed: 0,
    });
    let digital = b.log_likelihoods(&seqs, &[1, 10], false).unwrap();
    // From token 1, the sum is minus the window's NLL of the perplexity path.
    let refs = b.reference(&seqs).unwrap();
    let nll0 = refs[0].nll(&seqs[0][1..]);
    assert!(
        (digital[0] + nll0).abs() < 1e-3 * nll0,
        "{} vs {nll0}",
        digital[0]
    );
    // From token 10, only the tokens from 10 on count.
    let tail: f64 = (10..56)
        .map(|i| f64::from(refs[1].logp[[i - 1, seqs[1][i] as usize]]))
        .sum();
    assert!(
        (digital[1] - tail).abs() < 1e-3 * tail.abs(),
        "{} vs {tail}",
        digital[1]
    );
    // Ideal tiles reproduce the digital log-likelihoods.
    b.program(0).unwrap();
    b.drift_to(31_536_000.0).unwrap();
    let analog = b.log_likelihoods(&seqs, &[1, 10], true).unwrap();
    for (a, d) in analog.iter().zip(&digital) {
        assert!(
            (a - d).abs() < 1e-4 * d.abs(),
            "ideal analog {a} vs digital {d}"
        );
    }
    // A start that leaves nothing to score is an error, not a zero.
    assert!(b.log_likelihoods(&seqs, &[40, 1], false).is_err());
}

#[test]
fn the_builder_is_deterministic_and_the_shipped_task_is_its_output() {
    let text = include_str!("../data/kjv-heldout.txt");
    let a = build_jsonl(text, DEFAULT_SEED).unwrap();
    assert_eq!(
        a,
        build_jsonl(text, DEFAULT_SEED).unwrap(),
        "same seed, same bytes"
    );
    assert_ne!(a, build_jsonl(text, DEFAULT_SEED + 1).unwrap());
    let shipped = include_str!("../data/tasks/kjv-verse-continuation.jsonl");
    assert_eq!(
        a, shipped,
        "data/tasks/ holds the builder's output for the shipped seed"
    );
    let task = Task::shipped().unwrap();
    assert!(task.items.len() >= 500, "{} items", task.items.len());
    let verses = verses(text);
    let mut answers = [0usize; 4];
    for item in build_items(text, DEFAULT_SEED).unwrap() {
        assert_eq!(item.choices.len(), 4);
        let truth = format!("{}{}", item.context, item.choices[item.answer]);
        assert!(verses.contains(&truth.as_str()), "{truth}");
        for (j, c) in item.choices.iter().enumerate() {
            assert!(c.starts_with(' '));
            assert!(!item.choices[..j].contains(c), "distinct choices");
        }
        answers[item.answer] += 1;
    }
    // The answer's position is uniform: each of 4 positions within 5 sigma of n/4.
    let n = answers.iter().sum::<usize>() as f64;
    let sigma = (n * 0.25 * 0.75).sqrt();
    for c in answers {
        assert!((c as f64 - n / 4.0).abs() < 5.0 * sigma, "{answers:?}");
    }
}

//! Multiple-choice task accuracy (log-likelihood scoring, as lm-evaluation-harness scores
//! multiple choice): the task file format and its validation, the tokenised (context, choice)
//! sequences, the `acc` / `acc_norm` rule, and the per-point results of the evaluation
//! protocol.
//!
//! A task is a JSONL file, one item per line: `{"context": "…", "choices": ["…", …],
//! "answer": i}`. Each choice is scored by the summed log-probability of its tokens given the
//! context. `acc` counts the items whose correct choice has the largest sum; `acc_norm` the
//! items whose correct choice has the largest sum divided by the choice's length in UTF-8
//! bytes (the harness divides by the Python string length, which is the byte length for ASCII
//! text). Ties go to the first choice, as `numpy.argmax` does.
//!
//! Tokenisation follows the harness's `_encode_pair`: whitespace at the end of the context
//! moves to the front of the choice; the context is encoded alone and context + choice
//! together; the choice's tokens are the tokens of the whole past the context's token count
//! (so a token that straddles the boundary counts as the choice's). A context + choice longer
//! than the window keeps its last `window + 1` tokens (the harness's left truncation; the
//! model sees all but the last, hence `window`); a choice that alone needs more than the window
//! is an error.
//!
//! [`build`] writes the task shipped with the embedded model.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::Backend;
use crate::eval::analog::mean_std;

pub mod build;

/// File name of the task shipped with the embedded model.
pub const SHIPPED_NAME: &str = "kjv-verse-continuation.jsonl";

/// The shipped task (built by `examples/build_task.rs` from the held-out excerpt), compiled in
/// so `aimc report` runs it from anywhere.
const SHIPPED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/tasks/kjv-verse-continuation.jsonl"
));

/// Largest task file read (a guard before reading it whole).
pub const MAX_TASK_FILE_BYTES: u64 = 1 << 30;

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskItem {
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub answer: usize,
}

/// A validated task: its items and where they came from.
#[derive(Clone, Debug)]
pub struct Task {
    /// File name (or the built-in task's name), for reports.
    pub name: String,
    pub items: Vec<TaskItem>,
}

impl Task {
    /// Reads and validates a JSONL task file (every error names the file, the line and the
    /// field).
    pub fn load(path: &Path) -> Result<Self> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading task file {}", path.display()))?
            .len();
        ensure!(
            size <= MAX_TASK_FILE_BYTES,
            "{}: task file of {size} bytes is larger than the {MAX_TASK_FILE_BYTES} bytes accepted",
            path.display()
        );
        let bytes =
            std::fs::read(path).with_context(|| format!("reading task file {}", path.display()))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        Self::parse(&bytes, &path.display().to_string(), name)
    }

    /// The task shipped with the embedded model: complete a held-out verse among 4 choices
    /// (554 items).
    pub fn shipped() -> Result<Self> {
        Self::parse(SHIPPED.as_bytes(), SHIPPED_NAME, SHIPPED_NAME.to_string())
    }

    /// Parses and validates JSONL bytes; `location` names the source in errors. Blank lines
    /// are skipped; unknown fields are allowed (a task file may carry ids or metadata).
    pub fn parse(bytes: &[u8], location: &str, name: String) -> Result<Self> {
        let mut items = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let line = match std::str::from_utf8(line) {
                Ok(l) => l,
                Err(e) => bail!(
                    "{location}:{n}: not UTF-8 (invalid byte 0x{:02x} at byte {} of the line)",
                    line[e.valid_up_to()],
                    e.valid_up_to() + 1
                ),
            };
            if line.trim().is_empty() {
                continue;
            }
            items.push(parse_item(line).with_context(|| format!("{location}:{n}"))?);
        }
        ensure!(!items.is_empty(), "{location}: the task has no items");
        Ok(Self { name, items })
    }

    /// `n` items spread evenly over the task (item ⌊k·len/n⌋ for k = 0..n), all when `n` ≥ len:
    /// a smaller run over the whole task rather than its beginning.
    pub fn subset(&self, n: usize) -> Task {
        let len = self.items.len();
        let items = if n >= len {
            self.items.clone()
        } else {
            (0..n).map(|k| self.items[k * len / n].clone()).collect()
        };
        Task {
            name: self.name.clone(),
            items,
        }
    }
}

fn parse_item(line: &str) -> Result<TaskItem> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        anyhow::anyhow!("not valid JSON ({e}); each line holds one {{\"context\", \"choices\", \"answer\"}} object")
    })?;
    let obj = v
        .as_object()
        .with_context(|| format!("expected a JSON object, got {}", kind(&v)))?;
    let field = |name: &str| {
        obj.get(name)
            .with_context(|| format!("field `{name}` is missing"))
    };
    let context = field("context")?.as_str().with_context(|| {
        format!(
            "field `context`: expected a string, got {}",
            kind(&obj["context"])
        )
    })?;
    ensure!(
        !context.trim().is_empty(),
        "field `context` is empty (every choice is scored given the context)"
    );
    let choices = field("choices")?.as_array().with_context(|| {
        format!(
            "field `choices`: expected an array of strings, got {}",
            kind(&obj["choices"])
        )
    })?;
    ensure!(
        choices.len() >= 2,
        "field `choices` has {} choice(s); a multiple-choice item needs at least 2",
        choices.len()
    );
    let choices = choices
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let s = c.as_str().with_context(|| {
                format!("field `choices[{j}]`: expected a string, got {}", kind(c))
            })?;
            ensure!(!s.is_empty(), "field `choices[{j}]` is an empty string");
            Ok(s.to_string())
        })
        .collect::<Result<Vec<_>>>()?;
    let a = field("answer")?;
    let answer = a.as_u64().with_context(|| {
        format!(
            "field `answer`: expected an index 0..={} into `choices`, got {a}",
            choices.len() - 1
        )
    })?;
    ensure!(
        (answer as usize) < choices.len() && answer <= usize::MAX as u64,
        "field `answer`: {answer} is out of range 0..={} ({} choices)",
        choices.len() - 1,
        choices.len()
    );
    Ok(TaskItem {
        context: context.to_string(),
        choices,
        answer: answer as usize,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The token sequences of a task, one per (item, choice), item-major, ready to score.
#[derive(Clone, Debug)]
pub struct TaskSequences {
    pub name: String,
    /// Choices per item, and each item's answer.
    pub choices: Vec<usize>,
    pub answers: Vec<usize>,
    /// Context + choice tokens of each (item, choice), left-truncated to `window + 1`.
    pub tokens: Vec<Vec<u32>>,
    /// Index in `tokens[k]` of the choice's first token.
    pub from: Vec<usize>,
    /// UTF-8 byte length of each choice (the `acc_norm` divisor).
    pub choice_bytes: Vec<usize>,
    /// Items with at least one sequence left-truncated.
    pub truncated_items: usize,
    /// Longest model input (tokens) among the sequences.
    pub window: usize,
}

impl TaskSequences {
    /// Tokenises `task` with `encode` (the model's tokenizer) for a window of `window` tokens.
    pub fn prepare(
        task: &Task,
        window: usize,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
    ) -> Result<Self> {
        ensure!(window >= 1, "task window must be at least 1 token");
        let mut s = TaskSequences {
            name: task.name.clone(),
            choices: Vec::with_capacity(task.items.len()),
            answers: Vec::with_capacity(task.items.len()),
            tokens: Vec::new(),
            from: Vec::new(),
            choice_bytes: Vec::new(),
            truncated_items: 0,
            window,
        };
        for (i, item) in task.items.iter().enumerate() {
            let mut truncated = false;
            for (j, choice) in item.choices.iter().enumerate() {
                let (ctx, cont) = split_trailing_space(&item.context, choice);
                let ctx_ids = encode(ctx)?;
                let whole = encode(&format!("{ctx}{cont}"))?;
                ensure!(
                    whole.len() > ctx_ids.len(),
                    "{}: item {} (0-based), `choices[{j}]` = {choice:?} adds no token to the context",
                    task.name,
                    i
                );
                let cont_len = whole.len() - ctx_ids.len();
                ensure!(
                    cont_len <= window,
                    "{}: item {i} (0-based), `choices[{j}]` has {cont_len} tokens, more than the \
                     window of {window} tokens (raise --seq-len)",
                    task.name
                );
                let keep = whole.len().min(window + 1);
                truncated |= keep < whole.len();
                let start = whole.len() - keep;
                s.from.push(whole.len() - cont_len - start);
                s.tokens.push(whole[start..].to_vec());
                s.choice_bytes.push(choice.len());
            }
            s.truncated_items += usize::from(truncated);
            s.choices.push(item.choices.len());
            s.answers.push(item.answer);
        }
        Ok(s)
    }

    /// [`TaskSequences::prepare`] with `model`'s tokenizer.
    pub fn for_model(task: &Task, model: &crate::model::Model, window: usize) -> Result<Self> {
        let tok = model.tokenizer()?;
        Self::prepare(task, window, |s| tok.encode(s))
    }

    /// Number of items.
    pub fn items(&self) -> usize {
        self.answers.len()
    }

    /// Accuracy of the digital model (`analog` false) or of the backend's programmed analog
    /// model at its current drift time.
    pub fn score(&self, backend: &mut dyn Backend, analog: bool) -> Result<TaskAccuracy> {
        let seqs: Vec<&[u32]> = self.tokens.iter().map(Vec::as_slice).collect();
        let ll = backend.log_likelihoods(&seqs, &self.from, analog)?;
        accuracy(&self.choices, &self.answers, &self.choice_bytes, &ll)
    }
}

/// The harness moves whitespace at the end of the context to the front of the continuation.
fn split_trailing_space<'a>(context: &'a str, choice: &'a str) -> (&'a str, String) {
    let trimmed = context.trim_end();
    (trimmed, format!("{}{choice}", &context[trimmed.len()..]))
}

/// `acc` and `acc_norm` of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskAccuracy {
    pub acc: f64,
    pub acc_norm: f64,
}

/// `acc` and `acc_norm` from the log-likelihood of every (item, choice), item-major:
/// `choices[i]` choices for item i, `answers[i]` the correct one, `choice_bytes` each choice's
/// UTF-8 length. A non-finite log-likelihood is an error, not a silent wrong answer.
pub fn accuracy(
    choices: &[usize],
    answers: &[usize],
    choice_bytes: &[usize],
    ll: &[f64],
) -> Result<TaskAccuracy> {
    let total: usize = choices.iter().sum();
    ensure!(
        choices.len() == answers.len() && ll.len() == total && choice_bytes.len() == total,
        "task scoring: {} items, {} answers, {} choices, {} byte lengths, {} log-likelihoods",
        choices.len(),
        answers.len(),
        total,
        choice_bytes.len(),
        ll.len()
    );
    ensure!(!choices.is_empty(), "task scoring: no items");
    if let Some(k) = ll.iter().position(|x| !x.is_finite()) {
        bail!(
            "task scoring: the log-likelihood of sequence {k} is {}",
            ll[k]
        );
    }
    let (mut hits, mut hits_norm, mut k) = (0usize, 0usize, 0usize);
    for (&n, &answer) in choices.iter().zip(answers) {
        let item = &ll[k..k + n];
        let norm: Vec<f64> = item
            .iter()
            .zip(&choice_bytes[k..k + n])
            .map(|(l, &b)| l / b as f64)
            .collect();
        hits += usize::from(first_argmax(item) == answer);
        hits_norm += usize::from(first_argmax(&norm) == answer);
        k += n;
    }
    let items = choices.len() as f64;
    Ok(TaskAccuracy {
        acc: hits as f64 / items,
        acc_norm: hits_norm as f64 / items,
    })
}

/// Index of the first largest value.
fn first_argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Task accuracy at one (drift time, seed) point.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TaskPoint {
    pub t_seconds: f64,
    pub seed: u64,
    pub acc: f64,
    pub acc_norm: f64,
}

/// Mean ± standard deviation (sample, n − 1) over seeds at one drift time.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TaskTimeSummary {
    pub t_seconds: f64,
    pub acc_mean: f64,
    pub acc_std: f64,
    pub acc_norm_mean: f64,
    pub acc_norm_std: f64,
}

/// A task's accuracy over the sweep, beside the digital model's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskReport {
    /// Task file name.
    pub task: String,
    pub items: usize,
    /// Scored (context, choice) sequences.
    pub sequences: usize,
    /// Items with a sequence left-truncated to the window.
    pub truncated_items: usize,
    /// Window in tokens (the evaluation's sequence length).
    pub window: usize,
    pub digital: TaskAccuracy,
    pub points: Vec<TaskPoint>,
    pub summary: Vec<TaskTimeSummary>,
    /// When evaluated against a reference model: that model's digital accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_digital: Option<TaskAccuracy>,
}

impl TaskReport {
    /// The report of `points` (every seed × time) with the digital accuracy, summarised per
    /// drift time in the order of `times_s`.
    pub fn new(
        seqs: &TaskSequences,
        digital: TaskAccuracy,
        points: Vec<TaskPoint>,
        times_s: &[f64],
    ) -> Self {
        let summary = times_s
            .iter()
            .map(|&t| {
                let at: Vec<&TaskPoint> = points.iter().filter(|p| p.t_seconds == t).collect();
                let (am, asd) = mean_std(&at.iter().map(|p| p.acc).collect::<Vec<_>>());
                let (nm, nsd) = mean_std(&at.iter().map(|p| p.acc_norm).collect::<Vec<_>>());
                TaskTimeSummary {
                    t_seconds: t,
                    acc_mean: am,
                    acc_std: asd,
                    acc_norm_mean: nm,
                    acc_norm_std: nsd,
                }
            })
            .collect();
        TaskReport {
            task: seqs.name.clone(),
            items: seqs.items(),
            sequences: seqs.tokens.len(),
            truncated_items: seqs.truncated_items,
            window: seqs.window,
            digital,
            points,
            summary,
            reference_digital: None,
        }
    }

    /// Markdown: one row per drift time, digital beside analog mean ± std over seeds.
    pub fn markdown_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Task `{}`: {} items ({} choice sequences, {} left-truncated to {} tokens), \
             log-likelihood scoring.\n",
            self.task, self.items, self.sequences, self.truncated_items, self.window
        );
        if let Some(r) = &self.reference_digital {
            let _ = writeln!(
                s,
                "The original (reference) model's digital accuracy: acc {:.4}, acc_norm {:.4}; \
                 the columns below are this model's.\n",
                r.acc, r.acc_norm
            );
        }
        let _ = writeln!(
            s,
            "| drift time | acc, digital | acc, analog | acc_norm, digital | acc_norm, analog |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for t in &self.summary {
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.4} ± {:.4} | {:.4} | {:.4} ± {:.4} |",
                crate::eval::format_duration(t.t_seconds),
                self.digital.acc,
                t.acc_mean,
                t.acc_std,
                self.digital.acc_norm,
                t.acc_norm_mean,
                t.acc_norm_std
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_context_space_moves_to_the_choice() {
        assert_eq!(
            split_trailing_space("In the beginning ", "God"),
            ("In the beginning", " God".to_string())
        );
        assert_eq!(split_trailing_space("a", " b"), ("a", " b".to_string()));
    }

    #[test]
    fn ties_go_to_the_first_choice() {
        assert_eq!(first_argmax(&[-1.0, -1.0, -2.0]), 0);
        assert_eq!(first_argmax(&[-3.0, -1.0, -1.0]), 1);
    }
}

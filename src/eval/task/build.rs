//! The builder of the task shipped with the embedded model, `kjv-verse-continuation`:
//! complete a held-out verse, choosing among 4 continuations.
//!
//! Source: the held-out excerpt the embedded model never trained on (whole chapters whose
//! 0-based index is ≡ 19 mod 20, the evaluation text of `aimc eval`). Each verse of at least
//! [`MIN_WORDS`] words is cut at the word boundary after its first ⌊words/2⌋ words: the first
//! half is the context, the rest (with its leading space) the true continuation. The 3
//! distractors are the second halves of other verses of the excerpt drawn uniformly with a
//! SplitMix64 stream of the seed (redrawn while one equals the true continuation or an earlier
//! pick), and the 4 choices are shuffled with the same stream (Fisher–Yates), so the answer's
//! position is uniform. Items follow the text's order. The output is a pure function of the
//! text and the seed: the same bytes on every machine.

use std::fmt::Write as _;

use anyhow::{ensure, Result};

use super::TaskItem;
use crate::rng::SplitMix64;

/// Shortest verse (in words) that makes an item: both halves keep at least 4 words.
pub const MIN_WORDS: usize = 8;
/// Choices per item.
pub const CHOICES: usize = 4;
/// The seed of the shipped task.
pub const DEFAULT_SEED: u64 = 20_261_206;

/// A chapter header line of the excerpt: a book name followed by a chapter number, e.g.
/// `2 Chronicles 33` or `Psalms 102` (verse lines carry punctuation).
fn is_header(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let last_is_number = line
        .split_whitespace()
        .last()
        .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()));
    let words_ok = words.all(|w| w.chars().all(|c| c.is_alphanumeric()));
    last_is_number && words_ok && line.split_whitespace().count() >= 2
}

/// The verses of the excerpt, chapter headers and blank lines dropped.
pub fn verses(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_header(l))
        .collect()
}

/// Splits a verse after its first ⌊words/2⌋ words: (context, continuation with its leading
/// space), or `None` when the verse is shorter than [`MIN_WORDS`].
fn halves(verse: &str) -> Option<(&str, &str)> {
    let words = verse.split_whitespace().count();
    if words < MIN_WORDS {
        return None;
    }
    // Byte offset of the space before word number ⌊words/2⌋.
    let mut seen = 0;
    let mut in_word = false;
    for (i, c) in verse.char_indices() {
        if c.is_whitespace() {
            if in_word && seen == words / 2 {
                return Some((&verse[..i], &verse[i..]));
            }
            in_word = false;
        } else if !in_word {
            in_word = true;
            seen += 1;
        }
    }
    None
}

/// The items of the task built from `text` with `seed`.
pub fn build_items(text: &str, seed: u64) -> Result<Vec<TaskItem>> {
    let pairs: Vec<(&str, &str)> = verses(text).into_iter().filter_map(halves).collect();
    ensure!(
        pairs.len() > CHOICES,
        "the text has {} verses of at least {MIN_WORDS} words; a task needs more than {CHOICES}",
        pairs.len()
    );
    let mut rng = SplitMix64(seed);
    let mut items = Vec::with_capacity(pairs.len());
    for (i, &(context, truth)) in pairs.iter().enumerate() {
        let mut choices = vec![truth.to_string()];
        while choices.len() < CHOICES {
            let j = rng.below(pairs.len());
            let cand = pairs[j].1;
            if j != i && !choices.iter().any(|c| c == cand) {
                choices.push(cand.to_string());
            }
        }
        for k in (1..CHOICES).rev() {
            let r = rng.below(k + 1);
            choices.swap(k, r);
        }
        let answer = choices
            .iter()
            .position(|c| c == truth)
            .expect("the true continuation is among the choices");
        items.push(TaskItem {
            context: context.to_string(),
            choices,
            answer,
        });
    }
    Ok(items)
}

/// The task as JSONL bytes (one item per line, keys in the order context, choices, answer).
pub fn build_jsonl(text: &str, seed: u64) -> Result<String> {
    let mut s = String::new();
    for item in build_items(text, seed)? {
        let _ = writeln!(s, "{}", serde_json::to_string(&item)?);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_halves() {
        assert!(is_header("2 Chronicles 33"));
        assert!(is_header("Psalms 102"));
        assert!(!is_header("And he said, 12"));
        assert!(!is_header("Amen."));
        let v = "one two three four five six seven eight nine";
        assert_eq!(
            halves(v),
            Some(("one two three four", " five six seven eight nine"))
        );
        assert_eq!(halves("too short to split here"), None);
    }
}

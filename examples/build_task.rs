//! Builds the multiple-choice task shipped with the embedded model,
//! `data/tasks/kjv-verse-continuation.jsonl`: complete a held-out verse among 4 continuations,
//! the distractors drawn from other held-out verses (the rules are in `aimc::eval::task::build`).
//!
//! ```text
//! cargo run --release --example build_task -- [--seed N] [--text FILE] [--out FILE]
//! ```
//!
//! Defaults: the shipped seed, the held-out excerpt `data/kjv-heldout.txt`, and the output
//! printed on stdout (the committed file is this output for the defaults). The same text and
//! seed give the same bytes.
use std::path::PathBuf;

use aimc::eval::task::build::{build_jsonl, DEFAULT_SEED};
use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let mut seed = DEFAULT_SEED;
    let mut text = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv-heldout.txt"));
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seed" => {
                let v = value()?;
                seed = v
                    .parse()
                    .with_context(|| format!("--seed: `{v}` is not an unsigned integer"))?;
            }
            "--text" => text = value()?.into(),
            "--out" => out = Some(value()?.into()),
            other => bail!("unknown argument `{other}` (--seed N, --text FILE, --out FILE)"),
        }
    }
    let body = std::fs::read_to_string(&text)
        .with_context(|| format!("reading {} (UTF-8 text)", text.display()))?;
    let jsonl = build_jsonl(&body, seed)?;
    match out {
        Some(p) => {
            std::fs::write(&p, &jsonl).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("wrote {} items to {}", jsonl.lines().count(), p.display());
        }
        None => print!("{jsonl}"),
    }
    Ok(())
}

//! `aimc eval --digital [--model DIR] [--text FILE] [--tokens N] [--seq-len 512] [--json]`:
//! perplexity and throughput of the digital model on a text file.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::eval::perplexity;
use crate::model::{embedded, ForwardOptions, Model, RouterKind};

/// Arguments of `aimc eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Evaluate the digital (f32 CPU) model; the only mode in this build.
    #[arg(long)]
    pub digital: bool,
    /// HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// UTF-8 text to score (default: the held-out excerpt shipped with the embedded model).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Score at most the first N tokens of the text.
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Window length in tokens (non-overlapping windows).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Router: default, softmax:K, softmax-renorm:K, sigmoid:K, relu, adaptive:THRESHOLD.
    #[arg(long, default_value = "default")]
    pub router: RouterKind,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `aimc eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    if !args.digital {
        bail!("only `aimc eval --digital` is available in this build");
    }
    let model = match &args.model {
        Some(dir) => Model::load(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => embedded::load()?,
    };
    let text = match &args.text {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => embedded::default_text()?.to_owned(),
    };
    let mut ids = model.tokenizer()?.encode(&text)?;
    if let Some(n) = args.tokens {
        ids.truncate(n);
    }
    let opts = ForwardOptions {
        router: args.router,
        ..Default::default()
    };
    let report = perplexity(&model, &ids, args.seq_len, &opts, !args.json)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

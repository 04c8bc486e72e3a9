//! Model evaluation, the protocol only: the digital perplexity and throughput of a model
//! ([`perplexity`]), the accuracy of its analog version over drift time and seeds
//! ([`analog`]: windows, seeds × times, metrics, summaries; where it runs is the backend's
//! business), the same against another model's digital outputs ([`reference`]), the CPU
//! benchmarks ([`bench`]) and drift-time parsing ([`time`]).
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::ArrayView2;
use serde::Serialize;

use crate::model::{ForwardOptions, Model};

pub mod analog;
pub mod bench;
pub mod reference;
pub mod task;
pub mod time;

pub use time::format_duration;

/// Sequences evaluated per forward call: packs enough tokens that every expert sees a batched GEMM.
const SEQUENCES_PER_BATCH: usize = 4;

/// Perplexity and throughput of a model on a token stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerplexityReport {
    /// Tokens whose probability was scored (each window's first token has no context and is not).
    pub tokens: usize,
    /// Tokens run through the model (scored tokens + one per window).
    pub tokens_processed: usize,
    /// Number of windows of at most `seq_len` tokens.
    pub windows: usize,
    /// Window length used.
    pub seq_len: usize,
    /// Mean negative log-likelihood per scored token, nats.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Wall-clock seconds of the forward passes.
    pub seconds: f64,
    /// Processed tokens per wall-clock second (forward passes only).
    pub tokens_per_second: f64,
}

impl std::fmt::Display for PerplexityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "perplexity {:.3} (nll {:.4} nats/token) over {} tokens in {} windows of ≤{}; \
             {:.0} tokens/s ({:.2} s)",
            self.perplexity,
            self.nll,
            self.tokens,
            self.windows,
            self.seq_len,
            self.tokens_per_second,
            self.seconds
        )
    }
}

/// Perplexity of `model` on `token_ids`, split into non-overlapping windows of `seq_len` tokens
/// (the last one may be shorter; a window needs ≥ 2 tokens). Within a window token i is scored
/// from tokens 0..i, so the result depends on `seq_len` like any windowed perplexity.
pub fn perplexity(
    model: &Model,
    token_ids: &[u32],
    seq_len: usize,
    opts: &ForwardOptions<'_>,
    progress: bool,
) -> Result<PerplexityReport> {
    if seq_len < 2 {
        bail!("perplexity: seq_len must be at least 2 (got {seq_len})");
    }
    let windows: Vec<&[u32]> = token_ids.chunks(seq_len).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        bail!(
            "perplexity: need at least 2 tokens, got {}",
            token_ids.len()
        );
    }
    let processed: usize = windows.iter().map(|w| w.len()).sum();
    let bar = if progress {
        let b = ProgressBar::new(processed as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tokens [{elapsed_precise} < {eta_precise}] {per_sec}",
            )
            .expect("static template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    for batch in windows.chunks(SEQUENCES_PER_BATCH) {
        let outs = model.forward_batch(batch, opts)?;
        for (w, out) in batch.iter().zip(&outs) {
            nll_sum += window_nll(out.logits.view(), w);
            scored += w.len() - 1;
        }
        bar.inc(batch.iter().map(|w| w.len() as u64).sum());
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let nll = nll_sum / scored as f64;
    Ok(PerplexityReport {
        tokens: scored,
        tokens_processed: processed,
        windows: windows.len(),
        seq_len,
        nll,
        perplexity: nll.exp(),
        seconds,
        tokens_per_second: processed as f64 / seconds.max(1e-12),
    })
}

/// Sum over i ≥ 1 of −log p(`tokens[i]` given logits row i − 1), log-softmax in f64.
pub fn window_nll(logits: ArrayView2<'_, f32>, tokens: &[u32]) -> f64 {
    tokens
        .iter()
        .skip(1)
        .zip(logits.outer_iter())
        .map(|(&target, row)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            lse - row[target as usize] as f64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn window_nll_of_uniform_logits_is_log_vocab() {
        let logits = array![[0.0f32, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [9.0; 4]];
        let nll = window_nll(logits.view(), &[0, 3, 2]);
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-12);
        // A confident correct prediction costs almost nothing.
        let sharp = array![[0.0f32, 30.0]];
        assert!(window_nll(sharp.view(), &[0, 1]) < 1e-12);
    }
}

//! Validation of every subcommand's arguments before any long work: each flag is checked for its
//! allowed range (and presets, durations and router specs are parsed) as soon as the command
//! starts, including flags that only a later stage uses, so that a typo fails in milliseconds
//! rather than after a sweep. Each error names the flag, the bad value and what is allowed.
use anyhow::{bail, Context, Result};

use super::bench::BenchArgs;
use super::drift::DriftArgs;
use super::eval::EvalArgs;
use super::map::{MapArgs, MappingFlags};
use super::report::ReportArgs;
use crate::eval::time::{parse_duration, parse_durations};
use crate::model::{Model, RouterKind};
use crate::tile::TilePreset;

/// Largest input batch (vectors per MVM measurement, decode batch): a batch allocates
/// `batch × crossbar rows` values per MVM.
pub const MAX_BATCH: usize = 1 << 16;
/// Largest seed count of a sweep (each seed is a full analog evaluation).
pub const MAX_SEEDS: u64 = 10_000;
/// Largest window length in tokens (the RoPE table and attention scores grow with it).
pub const MAX_SEQ_LEN: usize = 1 << 20;

fn in_range_usize(flag: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if v < lo || v > hi {
        bail!("{flag} {v} is out of range (allowed {lo}..={hi})");
    }
    Ok(())
}

fn seeds(flag: &str, v: u64) -> Result<()> {
    if v == 0 || v > MAX_SEEDS {
        bail!("{flag} {v} is out of range (allowed 1..={MAX_SEEDS})");
    }
    Ok(())
}

/// A comma-separated list of drift times with at least one entry.
pub fn times(flag: &str, text: &str) -> Result<Vec<f64>> {
    let t = parse_durations(text).with_context(|| flag.to_string())?;
    if t.is_empty() {
        bail!("{flag} \"{text}\": no drift time given (example: 0,60,1h,1d)");
    }
    Ok(t)
}

/// A digital fraction: finite, within [0, 1].
fn fraction(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
        bail!("{flag} {v} is out of range (allowed 0..=1)");
    }
    Ok(())
}

fn preset(flag: &str, name: &str) -> Result<()> {
    TilePreset::resolve(name)
        .map(|_| ())
        .with_context(|| format!("{flag} {name}"))
}

fn mapping(m: &MappingFlags) -> Result<()> {
    if let Some(f) = m.digital_fraction {
        fraction("--digital-fraction", f)?;
    }
    Ok(())
}

fn tokens(flag: &str, v: usize) -> Result<()> {
    if v < 2 {
        bail!("{flag} {v} is out of range (at least 2 tokens are needed)");
    }
    Ok(())
}

/// Reads a UTF-8 text file named by `flag`, refusing anything but a regular file (a FIFO would
/// block, `/dev/zero` would be read until memory runs out).
pub fn read_text_file(flag: &str, path: &std::path::Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!("{flag} {}: not a regular file", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

/// Checks `aimc drift`'s arguments.
pub fn check_drift(a: &DriftArgs) -> Result<()> {
    preset("--preset", &a.preset)?;
    times("--times", &a.times)?;
    in_range_usize("--batch", a.batch, 1, MAX_BATCH)
}

/// Checks `aimc map`'s arguments.
pub fn check_map(a: &MapArgs) -> Result<()> {
    preset("--preset", &a.preset)?;
    mapping(&a.mapping)?;
    tokens("--calib-tokens", a.calib_tokens)
}

/// Checks `aimc eval`'s arguments, including those of the comparison runs and the sweep.
pub fn check_eval(a: &EvalArgs) -> Result<()> {
    if let Some(t) = a.tokens {
        tokens("--tokens", t)?;
    }
    in_range_usize("--seq-len", a.seq_len, 2, MAX_SEQ_LEN)?;
    if a.digital {
        return Ok(());
    }
    preset("--preset", &a.preset)?;
    mapping(&a.mapping)?;
    times("--times", &a.times)?;
    seeds("--seeds", a.seeds)?;
    for item in &a.compare_strategies {
        let (p, strategy) = match item.split_once(':') {
            Some((p, s)) => (p, Some(s)),
            None => (item.as_str(), None),
        };
        preset("--compare-strategies", p)?;
        if let Some(s) = strategy {
            super::eval::parse_strategy(s).context("--compare-strategies")?;
        }
    }
    for &f in &a.sweep_digital {
        fraction("--sweep-digital", f)?;
    }
    parse_duration(&a.sweep_time).context("--sweep-time")?;
    Ok(())
}

/// Checks `aimc report`'s arguments, including the later stages' (sweep, energy batch).
pub fn check_report(a: &ReportArgs) -> Result<()> {
    preset("--preset", &a.preset)?;
    mapping(&a.mapping)?;
    tokens("--tokens", a.tokens)?;
    times("--times", &a.times)?;
    seeds("--seeds", a.seeds)?;
    for &f in &a.sweep_digital {
        fraction("--sweep-digital", f)?;
    }
    parse_duration(&a.sweep_time).context("--sweep-time")?;
    seeds("--sweep-seeds", a.sweep_seeds)?;
    tokens("--sweep-tokens", a.sweep_tokens)?;
    if a.batch.is_empty() {
        bail!("--batch: no batch size given");
    }
    for &b in &a.batch {
        in_range_usize("--batch", b, 1, MAX_BATCH)?;
    }
    Ok(())
}

/// Checks `aimc bench`'s arguments.
pub fn check_bench(a: &BenchArgs) -> Result<()> {
    in_range_usize("--repeats", a.repeats, 1, 10_000)?;
    in_range_usize("--batch", a.batch, 1, MAX_BATCH)?;
    for p in &a.presets {
        preset("--presets", p)?;
    }
    preset("--gpu-preset", &a.gpu_preset)?;
    let names = ["T", "d", "n", "E", "k"];
    for (name, &v) in names.iter().zip(&a.moe_shape) {
        in_range_usize(&format!("--moe-shape {name}"), v, 1, MAX_BATCH)?;
    }
    if let [.., e, k] = a.moe_shape[..] {
        if k > e {
            bail!("--moe-shape: top-k {k} exceeds the {e} experts");
        }
    }
    Ok(())
}

/// Checks a `--router` spec against the loaded model: a fixed k must not exceed its experts.
pub fn check_router(router: &RouterKind, model: &Model) -> Result<()> {
    let experts = model.config.num_experts;
    if let RouterKind::SoftmaxTopK { k, .. } | RouterKind::SigmoidTopK { k } = *router {
        if k > experts {
            bail!(
                "--router: top-k {k} exceeds the model's {experts} experts (allowed 1..={experts})"
            );
        }
    }
    Ok(())
}

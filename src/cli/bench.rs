//! `aimc bench`: speed benchmarks, each timed against a reference measured in the same run.
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use ndarray::Array2;

use crate::rng::{Purpose, Stream};
use crate::tile::{Crossbar, TilePreset};

/// Benchmark suites (more join with later issues).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// CPU crossbar MVM with all nonidealities vs a plain f32 ndarray matmul of the same shape.
    Crossbar,
}

/// Arguments of `aimc bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which suite to run.
    #[arg(long, value_enum, default_value = "crossbar")]
    pub suite: Suite,
    /// Timed repeats per case (the median is reported).
    #[arg(long, default_value_t = 9)]
    pub repeats: usize,
    /// Batch of input vectors per MVM.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Presets to time (built-in names or paths).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "standard-hwa,aihwkit-default"
    )]
    pub presets: Vec<String>,
}

/// Run the chosen suite and print a markdown table.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be ≥ 1");
    }
    match args.suite {
        Suite::Crossbar => crossbar_suite(&args),
    }
}

/// Median wall time (s) of `repeats` runs of `f` after one warm-up run.
fn median_seconds(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn crossbar_suite(args: &BenchArgs) -> Result<()> {
    let (n, batch) = (512usize, args.batch);
    let data = Stream::new(0, Purpose::TestData, 0);
    let w = Array2::from_shape_fn((n, n), |(i, j)| data.normal((i * n + j) as u64, 0) * 0.1);
    let inputs = Stream::new(0, Purpose::TestData, 1);
    let x = Array2::from_shape_fn((batch, n), |(b, j)| {
        2.0 * inputs.uniform((b * n + j) as u64, 0) - 1.0
    });
    let threads = rayon::current_num_threads();
    println!("crossbar suite: {n}×{n} weights, batch {batch}, {threads} rayon threads, median of {} runs", args.repeats);
    let reference = median_seconds(args.repeats, || {
        std::hint::black_box(x.dot(&w.t()));
    });
    println!();
    println!("| case | median ms | ratio to plain matmul |");
    println!("|---|---:|---:|");
    println!(
        "| plain f32 ndarray `x.dot(&w.t())` (single-threaded matrixmultiply) | {:.2} | 1.00 |",
        reference * 1e3
    );
    for name in &args.presets {
        let preset = TilePreset::resolve(name)?;
        let mut xbar = Crossbar::program(w.view(), &preset, 0, 0)?;
        xbar.drift_to(3600.0);
        let mut id = 0u32;
        let t = median_seconds(args.repeats, || {
            id += 1;
            std::hint::black_box(xbar.mvm(x.view(), id));
        });
        println!(
            "| `{}` crossbar mvm (rayon, all nonidealities of the preset) | {:.2} | {:.2} |",
            preset.name,
            t * 1e3,
            t / reference
        );
    }
    Ok(())
}

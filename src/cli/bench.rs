//! `aimc bench`: speed benchmarks, each timed against a reference measured in the same run.
//!
//! Every suite renders a markdown report (machine, command, table); `--record DIR` also writes it
//! to `DIR/<YYYY-MM-DD>-<suite>-cpu.md` (the project keeps these under `reports/bench/`).
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
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
    /// Also write the report to `<DIR>/<date>-<suite>-cpu.md`.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
}

/// Run the chosen suite and print a markdown table.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be ≥ 1");
    }
    let (name, table) = match args.suite {
        Suite::Crossbar => ("crossbar", crossbar_suite(&args)?),
    };
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "n/a".into());
    let date = utc_date();
    let command: Vec<String> = std::env::args().collect();
    let report = format!(
        "# `{name}` benchmark, {date}\n\n- machine: {} ({} logical CPUs, {} rayon threads)\n- 1-min load average at the end (other processes share these CPUs): {load}\n- build: {}\n- command: `{}`\n\n{table}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rayon::current_num_threads(),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        command.join(" "),
    );
    println!("{report}");
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{date}-{name}-cpu.md"));
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// CPU model name from /proc/cpuinfo (what `lscpu` prints as "Model name").
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Today's UTC date as YYYY-MM-DD (civil-from-days, H. Hinnant's algorithm).
fn utc_date() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Median wall time (s) of each case over `repeats` rounds, after one warm-up round. Every round
/// times all cases back to back (interleaved), so that a change in machine load hits the
/// reference and the measured cases alike.
fn interleaved_medians(repeats: usize, cases: &mut [Box<dyn FnMut() + '_>]) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(repeats); cases.len()];
    for round in 0..=repeats {
        for (case, t) in cases.iter_mut().zip(&mut times) {
            let start = Instant::now();
            case();
            if round > 0 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// 512×512 crossbar MVM on a batch with every nonideality of each preset, after 1 h of drift,
/// against `x.dot(&w.t())` of the same shape; returns the markdown table.
fn crossbar_suite(args: &BenchArgs) -> Result<String> {
    let (n, batch) = (512usize, args.batch);
    let data = Stream::new(0, Purpose::TestData, 0);
    let w = Array2::from_shape_fn((n, n), |(i, j)| data.normal((i * n + j) as u64, 0) * 0.1);
    let inputs = Stream::new(0, Purpose::TestData, 1);
    let x = Array2::from_shape_fn((batch, n), |(b, j)| {
        2.0 * inputs.uniform((b * n + j) as u64, 0) - 1.0
    });
    let presets = args
        .presets
        .iter()
        .map(|name| TilePreset::resolve(name))
        .collect::<Result<Vec<_>, _>>()?;
    let crossbars = presets
        .iter()
        .map(|preset| {
            let mut xbar = Crossbar::program(w.view(), preset, 0, 0)?;
            xbar.drift_to(3600.0);
            Ok(xbar)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cases: Vec<Box<dyn FnMut() + '_>> = vec![Box::new(|| {
        std::hint::black_box(x.dot(&w.t()));
    })];
    for xbar in &crossbars {
        let mut id = 0u32;
        let x = &x;
        cases.push(Box::new(move || {
            id += 1;
            std::hint::black_box(xbar.mvm(x.view(), id));
        }));
    }
    let medians = interleaved_medians(args.repeats, &mut cases);
    let reference = medians[0];
    let mut table = format!(
        "512×512 weights, batch {batch}, median of {} interleaved rounds after one warm-up round \
         (each round times every case back to back).\n\n\
         | case | median ms | ratio to plain matmul |\n|---|---:|---:|\n\
         | plain f32 ndarray `x.dot(&w.t())` (matrixmultiply, one thread) | {:.2} | 1.00 |\n",
        args.repeats,
        reference * 1e3
    );
    for (preset, t) in presets.iter().zip(&medians[1..]) {
        writeln!(
            table,
            "| `{}` `Crossbar::mvm` (rayon over the batch, all nonidealities of the preset) | {:.2} | {:.2} |",
            preset.name,
            t * 1e3,
            t / reference
        )?;
    }
    Ok(table)
}

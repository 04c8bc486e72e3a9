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
use crate::tile::{AnalogMatrix, Crossbar, TilePreset};

/// Benchmark suites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// CPU crossbar MVM with all nonidealities vs a plain f32 ndarray matmul of the same shape.
    Crossbar,
    /// GPU MoE expert layer: cuBLAS BF16 GEMM of equal FLOPs vs digital vs analog grouped kernels.
    Gpu,
    /// Digital CPU forward of a model (tokens/s on 512-token sequences) and its expert FFN path vs a
    /// plain GEMM of the same FLOPs (`--model DIR`, default the embedded model).
    Model,
    /// Analog CPU forward of a model (mapped on `--presets`' first preset, drifted to 1 day) vs its digital
    /// forward on the same 4,096 tokens of the default text (the aim: at most 1.5× the digital time).
    Analog,
    /// CPU MoE expert layer: per-expert analog crossbars vs per-expert f32 matmuls vs one dense
    /// ndarray matmul of equal FLOPs (`--moe-shape`).
    MoeCpu,
}

/// Which grouped layers the GPU suite times beside cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GpuCase {
    /// The digital grouped kernels (mma.sync, and wgmma on sm_90).
    Digital,
    /// The analog grouped kernels (fp16 weights).
    Analog,
}

/// MoE layer shapes of docs/model.md §8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// OLMoE layer: T=16384, d=2048, n=1024, E=64, k=8.
    Olmoe,
    /// Fine-grained: T=24576, d=1536, n=256, E=128, k=8.
    FineGrained,
    /// Mixtral-like: T=8192, d=4096, n=14336, E=8, k=2.
    Mixtral,
    /// One OLMoE expert with its share of tokens: T=2048, d=2048, n=1024, E=1, k=1 (the shape
    /// `tools/aihwkit_lightning_bench.py` times AIHWKIT-Lightning on).
    Expert,
}

impl Shape {
    /// The name `--shapes` takes (`fine-grained`).
    pub fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }

    /// (tokens T, model width d, expert width n, experts E, top-k).
    pub fn dims(self) -> (usize, usize, usize, usize, usize) {
        match self {
            Self::Olmoe => (16384, 2048, 1024, 64, 8),
            Self::FineGrained => (24576, 1536, 256, 128, 8),
            Self::Mixtral => (8192, 4096, 14336, 8, 2),
            Self::Expert => (2048, 2048, 1024, 1, 1),
        }
    }
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
    /// GPU suite: layer shapes to time.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "olmoe,fine-grained,mixtral"
    )]
    pub shapes: Vec<Shape>,
    /// GPU suite: grouped layers to time beside cuBLAS.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "digital,analog"
    )]
    pub cases: Vec<GpuCase>,
    /// GPU suite: analog tile preset of the analog grouped kernel.
    #[arg(long, default_value = "standard-hwa")]
    pub gpu_preset: String,
    /// GPU suite: also write the table as markdown to this file (e.g. reports/bench/<date>-gpu.md).
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// moe-cpu suite: layer shape T,d,n,E,k (tokens, model width, expert width, experts, top-k).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "T,d,n,E,k",
        default_value = "256,512,256,8,2"
    )]
    pub moe_shape: Vec<usize>,
    /// model suite: HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Run the chosen suite and print a markdown table.
pub fn run(args: BenchArgs) -> Result<()> {
    super::args::check_bench(&args)?;
    let (name, table) = match args.suite {
        Suite::Crossbar => ("crossbar", crossbar_suite(&args)?),
        Suite::Model => ("model", model_suite(&args)?),
        Suite::Analog => ("analog", analog_suite(&args)?),
        // These two print their own tables (the GPU one can write `--report`).
        Suite::Gpu => return gpu_suite(&args),
        Suite::MoeCpu => return moe_cpu_suite(&args),
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

/// Digital forward throughput and expert-path efficiency of a model (the targets of
/// [`crate::eval::bench`]).
fn model_suite(args: &BenchArgs) -> Result<String> {
    let model = super::common::load_model(args.model.as_deref())?;
    let name = match &args.model {
        Some(d) => d.display().to_string(),
        None => crate::model::embedded::NAME.to_string(),
    };
    let bench = crate::eval::bench::model_bench(&model, &name, 512, 4, args.repeats);
    Ok(bench.to_string())
}

/// Analog vs digital forward of a model on the same tokens.
fn analog_suite(args: &BenchArgs) -> Result<String> {
    let model = super::common::load_model(args.model.as_deref())?;
    let name = match &args.model {
        Some(d) => d.display().to_string(),
        None => crate::model::embedded::NAME.to_string(),
    };
    let preset_name = args
        .presets
        .first()
        .map_or(super::common::DEFAULT_PRESET, String::as_str);
    let preset = TilePreset::resolve(preset_name)?;
    let tokens = super::common::load_tokens(&model, None, 4096)?;
    let specs = crate::mapping::MatrixSpec::from_model(&model);
    let lookup = |id| model.matrix(id);
    let mapping = crate::mapping::map_matrices(
        &specs,
        crate::mapping::ChipGeometry::from_preset(&preset),
        &Default::default(),
        &lookup,
        None,
    )?;
    let bench = crate::eval::bench::analog_bench(
        &model,
        &name,
        &mapping,
        &preset,
        &tokens,
        512,
        args.repeats,
    )?;
    Ok(bench.to_string())
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

/// Random top-k routing (distinct experts per token, equal weights), keyed by `Stream`.
fn random_routing(t: usize, k: usize, e: usize) -> Vec<u32> {
    let s = Stream::new(5, Purpose::TestData, 1000);
    let mut experts = Vec::with_capacity(t * k);
    for tok in 0..t {
        let mut chosen: Vec<u32> = Vec::with_capacity(k);
        let mut i = 0u64;
        while chosen.len() < k {
            let x = (s.uniform(((tok as u64) << 8) | i, 0) * e as f32) as u32 % e as u32;
            if !chosen.contains(&x) {
                chosen.push(x);
            }
            i += 1;
        }
        experts.extend(chosen);
    }
    experts
}

fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// The CPU side of the MoE-layer benchmark: one MoE expert layer (SwiGLU experts) per expert on
/// the CPU crossbar path vs plain f32 matmuls vs one dense matmul of equal FLOPs.
fn moe_cpu_suite(args: &BenchArgs) -> Result<()> {
    use crate::eval::bench::median_seconds;
    let [t, d, n, e, k] = args.moe_shape[..] else {
        bail!("--moe-shape takes 5 numbers T,d,n,E,k");
    };
    if e == 0 || k == 0 || k > e || t == 0 || d == 0 || n == 0 {
        bail!("--moe-shape {t},{d},{n},{e},{k}: need T, d, n ≥ 1 and 1 ≤ k ≤ E");
    }
    let preset = TilePreset::resolve(&args.gpu_preset)?;
    let matrix = |rows: usize, cols: usize, id: u32| {
        let s = Stream::new(0, Purpose::TestData, id);
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            s.normal((i * cols + j) as u64, 0) * 0.04
        })
    };
    let weights: Vec<[Array2<f32>; 3]> = (0..e as u32)
        .map(|i| {
            [
                matrix(n, d, 10 * i),
                matrix(n, d, 10 * i + 1),
                matrix(d, n, 10 * i + 2),
            ]
        })
        .collect();
    let mut analog = Vec::with_capacity(e);
    for (i, w) in weights.iter().enumerate() {
        let mut m = Vec::with_capacity(3);
        for (j, wj) in w.iter().enumerate() {
            let mut a = AnalogMatrix::program(wj.view(), &preset, 0, (3 * i + j) as u32)?;
            a.drift_to(3600.0);
            m.push(a);
        }
        analog.push(m);
    }
    let x = matrix(t, d, 99_999).mapv(|v| (v * 10.0).clamp(-1.0, 1.0));
    let experts = random_routing(t, k, e);
    let tokens: Vec<Vec<usize>> = (0..e as u32)
        .map(|ex| {
            (0..t * k)
                .filter(|&p| experts[p] == ex)
                .map(|p| p / k)
                .collect()
        })
        .collect();
    let gather =
        |ex: usize| Array2::from_shape_fn((tokens[ex].len(), d), |(i, j)| x[[tokens[ex][i], j]]);
    let scatter = |y: &mut Array2<f32>, ex: usize, ye: &Array2<f32>| {
        for (i, &tok) in tokens[ex].iter().enumerate() {
            y.row_mut(tok).scaled_add(1.0 / k as f32, &ye.row(i));
        }
    };
    let flops = 6.0 * (t * k) as f64 * d as f64 * n as f64;
    let dense_a = matrix(t * k, 3 * n, 7);
    let dense_b = matrix(3 * n, d, 8);
    let reference = median_seconds(args.repeats, || {
        std::hint::black_box(dense_a.dot(&dense_b));
    });
    let digital = median_seconds(args.repeats, || {
        let mut y = Array2::<f32>::zeros((t, d));
        for (ex, w) in weights.iter().enumerate() {
            let xe = gather(ex);
            let (g, u) = (xe.dot(&w[0].t()), xe.dot(&w[1].t()));
            let h = Array2::from_shape_fn(g.dim(), |(i, j)| silu_mul(g[[i, j]], u[[i, j]]));
            scatter(&mut y, ex, &h.dot(&w[2].t()));
        }
        std::hint::black_box(y);
    });
    let mut mvm_id = 0u32;
    let analog_s = median_seconds(args.repeats, || {
        mvm_id += 1;
        let mut y = Array2::<f32>::zeros((t, d));
        for (ex, m) in analog.iter().enumerate() {
            let xe = gather(ex);
            let (g, u) = (m[0].mvm(xe.view(), mvm_id), m[1].mvm(xe.view(), mvm_id));
            let h = Array2::from_shape_fn(g.dim(), |(i, j)| silu_mul(g[[i, j]], u[[i, j]]));
            scatter(&mut y, ex, &m[2].mvm(h.view(), mvm_id));
        }
        std::hint::black_box(y);
    });
    println!(
        "moe-cpu suite: T={t} d={d} n={n} E={e} k={k}, preset `{}`, {} rayon threads, median of {} runs",
        preset.name,
        rayon::current_num_threads(),
        args.repeats
    );
    println!();
    println!("| case | median ms | GFLOP/s | ratio to dense matmul |");
    println!("|---|---:|---:|---:|");
    for (case, sec) in [
        ("dense f32 ndarray matmul, equal FLOPs", reference),
        (
            "digital per-expert f32 matmuls (gather, SwiGLU, scatter)",
            digital,
        ),
        (
            "analog per-expert crossbars (all nonidealities of the preset)",
            analog_s,
        ),
    ] {
        println!(
            "| {case} | {:.2} | {:.1} | {:.2} |",
            sec * 1e3,
            flops / sec / 1e9,
            sec / reference
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_suite(_: &BenchArgs) -> Result<()> {
    bail!("this binary was built without the `cuda` feature: the GPU suite is unavailable")
}

#[cfg(feature = "cuda")]
fn gpu_suite(args: &BenchArgs) -> Result<()> {
    gpu::run(args)
}

/// The GPU suite: one process, CUDA events, warm-up, median of `--repeats` (≥ 20).
#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::{Context, Result};
    use cudarc::driver::{sys::CUevent_flags, CudaSlice};

    use super::{utc_date, BenchArgs, GpuCase, Shape};
    use crate::backend::cuda::blas::Blas;
    use crate::backend::cuda::env::switch as env_switch;
    use crate::backend::cuda::gemm::{
        analog_wgmma_tile, analog_wgmma_tile_of, GemmOutput, Precision, WgmmaTile,
        ANALOG_WGMMA_COLS,
    };
    use crate::backend::cuda::grouped::{to_bf16_device, GpuGroupedMatrix, GroupedMatrix};
    use crate::backend::cuda::layer::{DigitalCombine, GpuMoeLayer};
    use crate::backend::cuda::periphery::GemmPeriphery;
    use crate::backend::cuda::rng::fill_normal;
    use crate::backend::cuda::routing::route;
    use crate::backend::cuda::{CudaDevice, CudaResult};
    use crate::rng::Purpose;
    use crate::tile::TilePreset;

    /// Warm-up runs before timing.
    const WARMUP: usize = 3;

    /// Print a line and keep it for the `--report` file.
    macro_rules! say {
        ($out:expr) => {{
            println!();
            $out.push(String::new());
        }};
        ($out:expr, $($arg:tt)*) => {{
            let line = format!($($arg)*);
            println!("{line}");
            $out.push(line);
        }};
    }

    /// Median milliseconds of `repeats` runs of `f`, each bracketed by CUDA events. The runs are
    /// queued back to back and read after one synchronisation (as `triton.testing.do_bench`
    /// does), so each span is the GPU's time for the run with the host queueing ahead, as in a
    /// model's forward; a layer that synchronises inside (bound management's flags) still
    /// pays for it. `AIMC_BENCH_SYNC_EACH=1` waits for each run before queueing the next (the
    /// timing before session 14: it adds the host's launch latency at the head of each run).
    fn median_ms(
        dev: &CudaDevice,
        repeats: usize,
        mut f: impl FnMut() -> CudaResult<()>,
    ) -> Result<f64> {
        for _ in 0..WARMUP {
            f()?;
        }
        dev.synchronize()?;
        let sync_each = env_switch("AIMC_BENCH_SYNC_EACH")?;
        let ctx = dev.context();
        let mut spans = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            start.record(dev.stream())?;
            f()?;
            end.record(dev.stream())?;
            if sync_each {
                end.synchronize()?;
            }
            spans.push((start, end));
        }
        dev.synchronize()?;
        let mut t = spans
            .iter()
            .map(|(start, end)| Ok(f64::from(start.elapsed_ms(end)?)))
            .collect::<Result<Vec<f64>>>()?;
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// Kernel-layout tables of E random expert matrices (`[E, N, K]`, crossbar blocks of
    /// `k_block` rows and 512 columns); weights are drawn on the device.
    fn random_tables(e: usize, n: usize, k: usize, k_block: usize) -> GroupedMatrix {
        let n_kb = k / k_block;
        GroupedMatrix {
            n_experts: e,
            n_cols: n,
            k,
            k_block,
            weights: Vec::new(),
            col_tensor_id: (0..(e * n_kb * n) as u32).map(|i| i / 512).collect(),
            col_scale: vec![0.02; e * n_kb * n],
            col_local: (0..n as u32).map(|c| c % 512).collect(),
            col_block_cols: vec![512; n],
            col_xbar: (0..n as u32).map(|c| c / 512).collect(),
            n_xbar: n.div_ceil(512),
        }
    }

    fn random_device(dev: &CudaDevice, len: usize, id: u32) -> CudaResult<CudaSlice<f32>> {
        fill_normal(dev, 1, Purpose::TestData, id, 0, len, 0, 0)
    }

    pub fn run(args: &BenchArgs) -> Result<()> {
        let repeats = args.repeats.max(20);
        let dev = CudaDevice::open(0).context("--suite gpu needs a CUDA device")?;
        let blas = Blas::new(&dev)?;
        let preset = TilePreset::resolve(&args.gpu_preset)?;
        let periphery = GemmPeriphery::from_spec(&preset.periphery)
            .with_context(|| format!("preset `{}`", preset.name))?;
        let (free, total) = dev.memory_bytes()?;
        let mut out: Vec<String> = Vec::new();
        say!(
            out,
            "gpu suite on {} (sm_{}{}, {:.1} of {:.1} GiB free); median of {repeats} runs after {WARMUP} warm-ups, CUDA events",
            dev.name(),
            dev.compute_capability().0,
            dev.compute_capability().1,
            crate::backend::cuda::gib(free),
            crate::backend::cuda::gib(total)
        );
        // Device-to-device copy bandwidth (bytes read + written).
        let copy_len = 1usize << 28;
        let src = dev.zeros::<f32>(copy_len)?;
        let mut dst = dev.zeros::<f32>(copy_len)?;
        let copy_ms = median_ms(&dev, repeats, || {
            dev.stream().memcpy_dtod(&src, &mut dst).map_err(|source| {
                crate::backend::cuda::CudaError::Driver {
                    what: "timing a device copy".into(),
                    source,
                }
            })
        })?;
        drop((src, dst));
        let bandwidth = 2.0 * (copy_len * 4) as f64 / (copy_ms * 1e-3);
        say!(out, "measured copy bandwidth: {:.2} TB/s", bandwidth / 1e12);
        say!(
            out,
            "analog preset `{}`; operands: analog {}; digital {}",
            preset.name,
            Precision::AnalogF16.describe(),
            Precision::DigitalBf16.describe()
        );
        say!(out);
        say!(
            out,
            "| shape | case | ms | TFLOP/s | ratio to cuBLAS | GB moved (est.) | bandwidth floor ms |"
        );
        say!(out, "|---|---|---:|---:|---:|---:|---:|");
        for &shape in &args.shapes {
            shape_rows(
                &dev,
                &blas,
                shape,
                &periphery,
                preset.stack.rows,
                &args.cases,
                repeats,
                bandwidth,
                &mut out,
            )
            .with_context(|| format!("shape {}", shape.name()))?;
        }
        if let Some(path) = &args.report {
            let text = format!(
                "# GPU bench ({} UTC, {})\n\nCommand: `aimc {}`\n\n```text\n{}\n```\n",
                utc_date(),
                dev.name(),
                std::env::args().skip(1).collect::<Vec<_>>().join(" "),
                out.join("\n")
            );
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn shape_rows(
        dev: &CudaDevice,
        blas: &Blas,
        shape: Shape,
        periphery: &GemmPeriphery,
        crossbar_rows: usize,
        cases: &[GpuCase],
        repeats: usize,
        bandwidth: f64,
        out: &mut Vec<String>,
    ) -> Result<()> {
        let (t, d, n, e, k) = shape.dims();
        // The layers allocate their scratch per call, as the model's forward does: time them
        // with the freed blocks kept in the stream-ordered pool (as a framework's caching
        // allocator keeps them), not unmapped at each repetition's synchronisation and mapped
        // again inside the next (`AIMC_BENCH_RELEASE_POOL=1` times that instead).
        let _pool = if env_switch("AIMC_BENCH_RELEASE_POOL")? {
            None
        } else {
            Some(dev.retain_pool()?)
        };
        let pairs = t * k;
        let flops = 6.0 * pairs as f64 * d as f64 * n as f64;
        let name = format!("{} T={t} d={d} n={n} E={e} k={k}", shape.name());
        // (a) cuBLAS dense bf16 GEMM of equal FLOPs: [T·k, 3n] × [3n, d].
        let (gm, gn, gk) = (pairs, d, 3 * n);
        let a = to_bf16_device(dev, &random_device(dev, gm * gk, 1)?)?;
        let b = to_bf16_device(dev, &random_device(dev, gn * gk, 2)?)?;
        let mut c = dev.zeros::<f32>(gm * gn)?;
        let cublas_ms = median_ms(dev, repeats, || {
            blas.gemm_bf16_nt(dev, &a, &b, &mut c, (gm, gn, gk))
        })?;
        drop((a, b, c));
        let bytes_dense = 2.0 * (gm * gk + gn * gk) as f64 + 4.0 * (gm * gn) as f64;
        let row = |case: &str, ms: f64, bytes: f64| {
            format!(
                "| {name} | {case} | {ms:.3} | {:.1} | {:.2} | {:.2} | {:.3} |",
                flops / (ms * 1e-3) / 1e12,
                cublas_ms / ms,
                bytes / 1e9,
                bytes / bandwidth * 1e3
            )
        };
        say!(
            out,
            "{}",
            row(
                "(a) cuBLAS dense BF16 GEMM, equal FLOPs",
                cublas_ms,
                bytes_dense
            )
        );

        // Routing: random distinct experts per token, drawn on the host.
        let experts = super::random_routing(t, k, e);
        let weights = vec![1.0 / k as f32; pairs];
        let experts = dev.upload(&experts)?;
        let weights = dev.upload(&weights)?;
        let x = random_device(dev, t * d, 3)?;
        let kb1 = crossbar_rows.min(d);
        let kb2 = crossbar_rows.min(n);
        let gate_up_tab = random_tables(e, 2 * n, d, kb1);
        let down_tab = random_tables(e, d, n, kb2);
        let w1 = random_device(dev, e * 2 * n * d, 4)?;
        let w2 = random_device(dev, e * d * n, 5)?;
        let weight_elems = (e * 3 * n * d) as f64;
        let act_bytes =
            |elem: f64| (t * d) as f64 * (4.0 + 4.0) + pairs as f64 * n as f64 * (4.0 + 2.0 * elem);
        // On Hopper the digital layer runs the wgmma kernel (sm_90a) and the analog one the
        // analog wgmma kernel (the default there); the mma.sync kernels (those of other GPUs)
        // beside them.
        let hopper = dev.compute_capability() == (9, 0);
        // The analog wgmma rows: the tile `AIMC_ANALOG_WGMMA_TILE` gives where it is set, else
        // each tile that runs the periphery, in this process.
        let analog_cols: Vec<Option<usize>> =
            if std::env::var_os("AIMC_ANALOG_WGMMA_TILE").is_some() {
                vec![None]
            } else if periphery.side_products() {
                vec![Some(64)]
            } else {
                ANALOG_WGMMA_COLS.map(Some).to_vec()
            };
        let mut runs = vec![
            (
                "(b) digital grouped, mma.sync (bf16)",
                Precision::DigitalBf16,
                false,
                None,
            ),
            (
                "(b') digital grouped, wgmma (bf16, sm_90a)",
                Precision::DigitalBf16,
                true,
                None,
            ),
            (
                "(c) analog grouped, mma.sync (fp16)",
                Precision::AnalogF16,
                false,
                None,
            ),
        ];
        runs.extend(analog_cols.into_iter().map(|cols| {
            (
                "(c) analog grouped, wgmma (fp16, sm_90a)",
                Precision::AnalogF16,
                true,
                cols,
            )
        }));
        for (case, precision, wgmma, cols) in runs {
            let analog = precision != Precision::DigitalBf16;
            let wanted = if analog {
                GpuCase::Analog
            } else {
                GpuCase::Digital
            };
            if !cases.contains(&wanted) || wgmma && !hopper {
                continue;
            }
            let tile = |n_cols: usize, k: usize, k_block: usize| -> Result<Option<WgmmaTile>> {
                Ok(match (wgmma, analog) {
                    (false, _) => None,
                    (true, false) => WgmmaTile::choose(n_cols, k)?,
                    (true, true) => match cols {
                        Some(c) => analog_wgmma_tile_of(c, k_block),
                        None => analog_wgmma_tile(k_block)?,
                    },
                })
            };
            let (tile_gu, tile_down) = (tile(2 * n, d, kb1)?, tile(d, n, kb2)?);
            if wgmma && analog && (tile_gu.is_none() || tile_down.is_none()) {
                continue; // crossbar rows not whole 64-row wgmma steps
            }
            // The digital layer's combine (GpuMoeLayer::forward's choice): bf16 expert rows
            // summed per token, or the f32 scatter-add epilogue (every analog layer).
            let bf16_rows = !analog && DigitalCombine::for_layer(k)? == DigitalCombine::Bf16Rows;
            let down_mode = if bf16_rows {
                GemmOutput::StoreBf16
            } else {
                GemmOutput::ScatterAdd
            };
            let combine = if bf16_rows {
                "bf16 expert rows + combine"
            } else {
                "f32 scatter-add"
            };
            let case = match (tile_gu, tile_down) {
                (Some(a), Some(b)) => format!(
                    "{case}, tiles 128×{}/128×{}, {} stages, pipe {}/{}, {combine}",
                    a.cols,
                    b.cols,
                    a.stages,
                    a.for_gathered(true).pipe,
                    b.for_output(down_mode.mode()).pipe
                ),
                _ => format!("{case}, {combine}"),
            };
            let case = case.as_str();
            let layer = GpuMoeLayer {
                gate_up: GpuGroupedMatrix::from_device_weights(dev, &gate_up_tab, &w1, precision)?
                    .use_wgmma(tile_gu),
                down: GpuGroupedMatrix::from_device_weights(dev, &down_tab, &w2, precision)?
                    .use_wgmma(tile_down),
                periphery: (precision != Precision::DigitalBf16).then_some(*periphery),
                seed: 9,
            };
            let mut mvm = 0u32;
            let ms = median_ms(dev, repeats, || {
                mvm += 1;
                let r = route(dev, &experts, &weights, t, k, e)?;
                layer.forward(dev, &x, &r, mvm).map(drop)
            })?;
            let w_bytes = 2.0;
            say!(
                out,
                "{}",
                row(case, ms, weight_elems * w_bytes + act_bytes(2.0))
            );
        }
        Ok(())
    }
}

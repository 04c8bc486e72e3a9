//! `aimc eval`: accuracy of the analog model against the digital baseline over drift time and seeds
//! (docs/model.md §7), or with `--digital` the digital perplexity and throughput alone. With
//! `--reference DIR` the baseline is another model's digital outputs (the original a fine-tuned
//! checkpoint was made from), and both digital perplexities are reported.
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::common::DEFAULT_PRESET;
use super::common::{load_model, load_tokens, model_name};
use super::eval_analog::{
    digital_sweep, markdown_table, plot_runs, run_one, write_outputs, write_sweep, RunResult,
    RunSpec,
};
use super::map::MappingFlags;
use crate::backend::{BackendRequest, Execution, GpuMemory};
use crate::eval::analog::AnalogEvalConfig;
use crate::eval::perplexity;
use crate::eval::reference::{check_compatible, ReferenceModel};
use crate::eval::task::{Task, TaskAccuracy, TaskSequences};
use crate::eval::time::{format_duration, parse_duration, parse_durations};
use crate::mapping::Strategy;
use crate::model::{ForwardOptions, RouterKind};
use crate::tile::TilePreset;

/// Arguments of `aimc eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Evaluate only the digital (f32 CPU) model: perplexity and tokens/s.
    #[arg(long)]
    pub digital: bool,
    /// HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The original model (a checkpoint directory; `embedded` for the embedded model): measure
    /// KL, agreement and perplexity of --model's analog outputs against this model's digital
    /// outputs, and report both digital perplexities. Both must share architecture and tokenizer.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// UTF-8 text to score (default: the held-out excerpt shipped with the embedded model).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Score at most the first N tokens of the text (default: all with --digital, 4096 otherwise).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Window length in tokens (non-overlapping windows).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Router: default, softmax:K, softmax-renorm:K, sigmoid:K, relu, adaptive:THRESHOLD.
    #[arg(long, default_value = "default")]
    pub router: RouterKind,
    /// Multiple-choice task, JSONL lines `{"context": …, "choices": [...], "answer": i}`, scored
    /// at every point beside the digital model (log-likelihood `acc`, and `acc_norm` per choice
    /// byte), in windows of --seq-len tokens. With --digital: the digital accuracy alone.
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Score at most N items of --task, spread evenly over it (default: all).
    #[arg(long)]
    pub task_items: Option<usize>,
    /// Print the report as JSON on stdout (with --digital).
    #[arg(long)]
    pub json: bool,
    /// With --digital: also write the digital logits of the first window (at most --seq-len tokens of the text) to
    /// this safetensors file, `input_ids` (int64 [1, S]) and `logits` (f32 [1, S, V]) as in tests/fixtures/parity,
    /// to compare with another implementation (tools/check_finetuned_transformers.py).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Tile preset: a built-in name (`aimc presets`) or a JSON file.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    #[command(flatten)]
    pub mapping: MappingFlags,
    /// Drift times after programming (seconds, or with a unit: min, h, d, w, mo, y).
    #[arg(long, default_value = "0,60,1h,1d,1w,1mo,1y")]
    pub times: String,
    /// Number of seeds (programming + read + output noise), seeds 0..N.
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Overlay other configurations, each `PRESET[:STRATEGY]` (e.g. `standard-hwa,pcm-3d-8tier:heterogeneous`).
    #[arg(long, value_delimiter = ',')]
    pub compare_strategies: Vec<String>,
    /// Heterogeneous sweep: digital fractions to evaluate (e.g. 0,0.05,0.1,0.25), max-neuron-norm vs random.
    #[arg(long, value_delimiter = ',')]
    pub sweep_digital: Vec<f64>,
    /// Drift time of the heterogeneous sweep.
    #[arg(long, default_value = "1d")]
    pub sweep_time: String,
    /// Output folder for eval.json, eval.md and the PNG + SVG plots (created if missing).
    #[arg(long, default_value = "aimc-out/eval")]
    pub out: PathBuf,
    /// Where the routed experts' analog MVMs run: the CPU, CUDA (error without a GPU), or CUDA
    /// when available (else the CPU, with a notice).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendRequest,
    /// Where the GPU keeps the routed experts between drift points: the fastest that fits,
    /// programmed state resident, programmed again per point, or also the digital weights
    /// uploaded from the host per point (models larger than the GPU). The operands are
    /// bit-identical whichever is chosen.
    #[arg(long, value_enum, default_value = "auto")]
    pub gpu_memory: GpuMemory,
}

/// Runs `aimc eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    super::args::check_eval(&args)?;
    // The task is read and validated before any model work.
    let task = match &args.task {
        Some(path) => {
            let t = Task::load(path)?;
            match args.task_items {
                Some(0) => bail!("--task-items must be at least 1 (got 0)"),
                Some(n) => Some(t.subset(n)),
                None => Some(t),
            }
        }
        None if args.task_items.is_some() => bail!("--task-items needs --task FILE"),
        None => None,
    };
    if args.logits_out.is_some() && !args.digital {
        bail!("--logits-out writes the digital logits: it needs --digital");
    }
    if args.reference.is_some() && !args.sweep_digital.is_empty() {
        bail!(
            "--sweep-digital is measured against the model's own digital outputs: run it without \
             --reference"
        );
    }
    let clock = std::time::Instant::now();
    let model = load_model(args.model.as_deref())?;
    super::args::check_router(&args.router, &model)?;
    let name = model_name(args.model.as_deref());
    let reference = match &args.reference {
        None => None,
        Some(dir) => {
            let (reference, reference_name) = load_reference(dir)?;
            let text = eval_text(args.text.as_deref())?;
            check_compatible(&model, &name, &reference, &reference_name, &text)?;
            Some((reference, reference_name))
        }
    };
    let reference = reference.as_ref().map(|(m, n)| ReferenceModel {
        model: m,
        name: n.as_str(),
    });
    let load_s = clock.elapsed().as_secs_f64();
    let task = task
        .map(|t| TaskSequences::for_model(&t, &model, args.seq_len))
        .transpose()?;
    let default_tokens = if args.digital { usize::MAX } else { 4096 };
    let ids = load_tokens(
        &model,
        args.text.as_deref(),
        args.tokens.unwrap_or(default_tokens),
    )?;
    if args.digital {
        let opts = ForwardOptions {
            router: args.router,
            ..Default::default()
        };
        let report = perplexity(&model, &ids, args.seq_len, &opts, !args.json)?;
        super::results::check_perplexity(&report)?;
        if let Some(path) = &args.logits_out {
            write_logits(&model, &ids[..ids.len().min(args.seq_len)], &opts, path)?;
        }
        let task_acc = task
            .as_ref()
            .map(|t| digital_task_accuracy(&model, t, args.router))
            .transpose()?;
        if let Some(r) = reference {
            return digital_against(&args, &name, r, &ids, &report, task.as_ref(), task_acc);
        }
        if args.json {
            match (&task, task_acc) {
                (Some(t), Some(a)) => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "perplexity": report,
                        "task": {"task": t.name, "items": t.items(), "acc": a.acc, "acc_norm": a.acc_norm},
                    }))?
                ),
                _ => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        } else {
            println!("{report}");
            if let (Some(t), Some(a)) = (&task, task_acc) {
                println!(
                    "task {}: acc {:.4}, acc_norm {:.4} over {} items",
                    t.name,
                    a.acc,
                    a.acc_norm,
                    t.items()
                );
            }
        }
        return Ok(());
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let cfg = AnalogEvalConfig {
        times_s: parse_durations(&args.times).context("--times")?,
        seeds: (0..args.seeds).collect(),
        seq_len: args.seq_len,
        router: args.router,
        progress: true,
        device: None,
        execution: Execution::resolve(args.backend)?.with_gpu_memory(args.gpu_memory),
    };
    let mut specs = vec![RunSpec {
        label: format!("{} / {}", args.preset, args.mapping.strategy),
        preset: args.preset.clone(),
        options: args.mapping.options(),
    }];
    for item in &args.compare_strategies {
        let (preset, strategy) = match item.split_once(':') {
            Some((p, s)) => (p.to_string(), parse_strategy(s)?),
            None => (item.clone(), args.mapping.strategy),
        };
        let flags = MappingFlags {
            strategy,
            ..args.mapping.clone()
        };
        specs.push(RunSpec {
            label: format!("{preset} / {strategy}"),
            preset,
            options: flags.options(),
        });
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut md = String::new();
    let mut runs = Vec::new();
    for spec in specs {
        let preset = TilePreset::resolve(&spec.preset)?;
        eprintln!("evaluating {} on {} tokens", spec.label, ids.len());
        let clock = std::time::Instant::now();
        let (_, report) = run_one(
            &model,
            &preset,
            &spec.options,
            &ids,
            &cfg,
            task.as_ref(),
            reference,
        )?;
        super::results::check_analog(&report, &spec.label)?;
        let total_s = clock.elapsed().as_secs_f64();
        let _ = writeln!(md, "## {}\n\n{}", spec.label, markdown_table(&report));
        if let Some(t) = &report.task {
            let _ = writeln!(md, "{}", t.markdown_table());
        }
        eprintln!(
            "  analog sweep {:.2} s for {} (time × seed) points ({}); digital reference {:.2} s",
            report.analog_seconds,
            report.points.len(),
            report.phases,
            report.digital_seconds
        );
        eprintln!(
            "  wall {total_s:.2} s: the above and the mapping {:.2} s (model loaded in {load_s:.2} s)",
            total_s - report.analog_seconds - report.digital_seconds
        );
        eprintln!("  backend: {}", report.backend);
        runs.push(RunResult {
            model: model_name(args.model.as_deref()),
            spec,
            report,
        });
    }
    plot_runs(&runs, &args.out)?;
    let task_runs: Vec<(&str, &crate::eval::task::TaskReport)> = runs
        .iter()
        .filter_map(|r| Some((r.spec.label.as_str(), r.report.task.as_ref()?)))
        .collect();
    if !task_runs.is_empty() {
        crate::report::task_plot::write_task_plot(
            &model_name(args.model.as_deref()),
            &task_runs,
            &args.out.join("task_vs_time"),
        )?;
    }
    let sweep = if args.sweep_digital.is_empty() {
        None
    } else {
        let t = parse_duration(&args.sweep_time).context("--sweep-time")?;
        let sweep_cfg = AnalogEvalConfig {
            times_s: vec![t],
            ..cfg.clone()
        };
        let preset = TilePreset::resolve(&args.preset)?;
        eprintln!("heterogeneous sweep at {}", format_duration(t));
        let (points, digital_ppl) = digital_sweep(
            &model,
            &preset,
            &args.mapping.options(),
            &args.sweep_digital,
            &ids,
            &sweep_cfg,
        )?;
        super::results::check_sweep(&points, digital_ppl)?;
        let table = write_sweep(&points, t, digital_ppl, ids.len(), &args.out)?;
        let _ = writeln!(
            md,
            "## Heterogeneous sweep at {} ({})\n\n{table}",
            format_duration(t),
            args.preset
        );
        Some(points)
    };
    write_outputs(&runs, sweep.as_deref(), &args.out)?;
    std::fs::write(args.out.join("eval.md"), &md)
        .with_context(|| format!("writing {}", args.out.join("eval.md").display()))?;
    print!("{md}");
    eprintln!(
        "wrote {}/{{eval.json, eval.md, perplexity_vs_time, agreement_vs_time{}{}}}",
        args.out.display(),
        if task.is_some() { ", task_vs_time" } else { "" },
        if sweep.is_some() {
            ", digital_sweep"
        } else {
            ""
        }
    );
    Ok(())
}

/// `--reference DIR`: the model in `DIR` (or the embedded one for `embedded`, when no such
/// directory exists) and its name.
pub(super) fn load_reference(dir: &std::path::Path) -> Result<(crate::model::Model, String)> {
    if dir.as_os_str() == "embedded" && !dir.exists() {
        return Ok((
            crate::model::embedded::load()?,
            crate::model::embedded::NAME.to_string(),
        ));
    }
    let model = crate::model::Model::load(dir)
        .with_context(|| format!("loading the --reference model in {}", dir.display()))?;
    Ok((model, dir.display().to_string()))
}

/// The evaluation text (`--text`, else the embedded held-out excerpt).
pub(super) fn eval_text(path: Option<&std::path::Path>) -> Result<String> {
    match path {
        Some(p) => super::args::read_text_file("text file", p),
        None => Ok(crate::model::embedded::default_text()?.to_string()),
    }
}

/// `--digital --reference`: both digital perplexities (and task accuracies) on the same tokens.
fn digital_against(
    args: &EvalArgs,
    name: &str,
    reference: ReferenceModel<'_>,
    ids: &[u32],
    own: &crate::eval::PerplexityReport,
    task: Option<&TaskSequences>,
    task_acc: Option<TaskAccuracy>,
) -> Result<()> {
    let opts = ForwardOptions {
        router: args.router,
        ..Default::default()
    };
    let theirs = perplexity(reference.model, ids, args.seq_len, &opts, !args.json)?;
    super::results::check_perplexity(&theirs)?;
    let summary = crate::eval::reference::ReferenceSummary::new(
        reference.name,
        theirs.perplexity,
        own.perplexity,
    );
    let ref_task = task
        .map(|t| digital_task_accuracy(reference.model, t, args.router))
        .transpose()?;
    if args.json {
        let task_json = task.zip(task_acc).map(|(t, a)| {
            serde_json::json!({"task": t.name, "items": t.items(), "acc": a.acc,
                "acc_norm": a.acc_norm, "reference_acc": ref_task.map(|r| r.acc),
                "reference_acc_norm": ref_task.map(|r| r.acc_norm)})
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": name,
                "perplexity": own,
                "reference_perplexity": theirs,
                "reference": summary,
                "task": task_json,
            }))?
        );
    } else {
        println!("{name}: {own}");
        println!("original {}: {theirs}", reference.name);
        println!("{}", summary.describe());
        if let (Some(t), Some(a), Some(r)) = (task, task_acc, ref_task) {
            println!(
                "task {}: acc {:.4} (original {:.4}), acc_norm {:.4} (original {:.4}) over {} items",
                t.name,
                a.acc,
                r.acc,
                a.acc_norm,
                r.acc_norm,
                t.items()
            );
        }
    }
    Ok(())
}

/// `--logits-out`: the digital logits of `ids` as a safetensors file (`input_ids` int64 [1, S], `logits` f32
/// [1, S, V]).
fn write_logits(
    model: &crate::model::Model,
    ids: &[u32],
    opts: &ForwardOptions<'_>,
    path: &std::path::Path,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let logits = model.forward(ids, opts)?.logits;
    let id_bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (s, v) = logits.dim();
    let tensors = [
        (
            "input_ids",
            TensorView::new(Dtype::I64, vec![1, s], &id_bytes)?,
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, vec![1, s, v], &logit_bytes)?,
        ),
    ];
    safetensors::tensor::serialize_to_file(tensors, None, path)
        .map_err(|e| anyhow::anyhow!("--logits-out {}: {e}", path.display()))?;
    eprintln!(
        "wrote the digital logits of {s} tokens to {}",
        path.display()
    );
    Ok(())
}

/// The digital model's accuracy on `task` (the `--digital` path: no crossbars programmed).
fn digital_task_accuracy(
    model: &crate::model::Model,
    task: &TaskSequences,
    router: RouterKind,
) -> Result<TaskAccuracy> {
    let seqs: Vec<&[u32]> = task.tokens.iter().map(Vec::as_slice).collect();
    let ll = crate::backend::cpu::digital_log_likelihoods(model, router, &seqs, &task.from)?;
    crate::eval::task::accuracy(&task.choices, &task.answers, &task.choice_bytes, &ll)
}

pub(super) fn parse_strategy(s: &str) -> Result<Strategy> {
    use clap::ValueEnum;
    Strategy::from_str(s, true).map_err(|_| {
        anyhow::anyhow!("unknown strategy `{s}` (packed, expert-per-tier, affinity, heterogeneous)")
    })
}

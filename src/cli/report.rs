//! `aimc report`: the whole study in one command — drift of the preset's device, mapping, accuracy over drift time,
//! the heterogeneous digital-fraction sweep — written as `index.md`, `report.json` and PNG/SVG plots.
//!
//! With `--reference DIR` (a fine-tuned `--model` and the original it was made from) the accuracy section is a
//! before/after comparison: the original's analog sweep and the fine-tuned model's, both against the original's
//! digital outputs, on one plot per metric (`report::before_after`); the heterogeneous sweep is not run.
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::common::DEFAULT_PRESET;
use super::common::{load_model, load_tokens, model_name, write_json};
use super::eval_analog::{
    digital_sweep, markdown_table, plot_runs, run_one, thousands, write_sweep, RunResult, RunSpec,
    SweepPoint,
};
use super::map::{map_model, MappingFlags};
use crate::backend::{BackendRequest, Execution, GpuMemory};
use crate::energy::{
    cost_of, estimate, EnergyOptions, EnergyReport, GpuEstimate, GpuPreset, ModelShape, PhaseCost,
};
use crate::eval::analog::{AnalogEvalConfig, AnalogEvalReport};
use crate::eval::reference::{check_compatible, ReferenceModel};
use crate::eval::task::{Task, TaskSequences};
use crate::eval::time::{format_duration, parse_duration, parse_durations};
use crate::mapping::MappingSummary;
use crate::model::{ParamCounts, RouterKind};
use crate::report::before_after::{write_before_after, FINE_TUNED, ORIGINAL};
use crate::tile::{drift_study, DriftStudy, DriftStudyConfig, TilePreset};

/// Task items a report scores by default (of the shipped task's 554): an analog point costs
/// about 0.1 CPU-second per item on the embedded model (four choices of ~45 tokens), so 40
/// items over the default 7 times × 5 seeds add about 140 CPU-seconds, about a minute on 2
/// cores. `--task-items 554` scores the whole task.
pub const DEFAULT_TASK_ITEMS: usize = 40;

/// Version of `report.json`'s layout; bump when a field changes meaning.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The original model --model was fine-tuned from (a checkpoint directory; `embedded` for the embedded
    /// model): the accuracy section compares both on the analog tiles (before/after), each measured against this
    /// model's digital outputs. The heterogeneous sweep is not run then.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Tile preset: a built-in name (`aimc presets`) or a JSON file.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    #[command(flatten)]
    pub mapping: MappingFlags,
    /// Text for calibration and evaluation (default: the embedded held-out text).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Evaluation tokens.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Drift times after programming (seconds, or with a unit: min, h, d, w, mo, y).
    #[arg(long, default_value = "0,60,1h,1d,1w,1mo,1y")]
    pub times: String,
    /// Multiple-choice task (JSONL `{"context", "choices", "answer"}`) scored at every point of
    /// the accuracy sweep (default: the shipped held-out verse-continuation task).
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Items of the task, spread evenly over it; 0 skips the task. The default keeps the task
    /// to about a minute of a 2-core CPU report (its accuracies then carry a sampling error of
    /// about ±0.08; raise it for figures to quote).
    #[arg(long, default_value_t = DEFAULT_TASK_ITEMS)]
    pub task_items: usize,
    /// Seeds of the accuracy sweep (0..N).
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Digital fractions of the heterogeneous sweep (empty to skip it).
    #[arg(long, value_delimiter = ',', default_value = "0,0.125,0.25,0.5")]
    pub sweep_digital: Vec<f64>,
    /// Drift time of the heterogeneous sweep.
    #[arg(long, default_value = "1d")]
    pub sweep_time: String,
    /// Seeds of the heterogeneous sweep.
    #[arg(long, default_value_t = 3)]
    pub sweep_seeds: u64,
    /// Tokens of the heterogeneous sweep: the first N of the evaluation tokens (fewer keeps the report fast; the
    /// sweep has its own digital baseline on the same tokens).
    #[arg(long, default_value_t = 2048)]
    pub sweep_tokens: usize,
    /// GPU preset the energy estimate is compared with (a name under tiles/gpu/ or a JSON file).
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    /// Decode batch sizes of the energy estimate.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Output folder (created if missing). The committed example is `--out reports/kjv-moe`.
    #[arg(long, default_value = "aimc-out/report")]
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

/// Everything `report.json` holds.
#[derive(Serialize)]
struct Report<'a> {
    schema_version: u32,
    aimc_version: &'a str,
    command: String,
    elapsed_seconds: f64,
    model: String,
    parameters: ParamCounts,
    preset: &'a TilePreset,
    seeds: Vec<u64>,
    drift: &'a DriftStudy,
    mapping: &'a MappingSummary,
    accuracy: &'a AnalogEvalReport,
    /// With `--reference`: the original model's name and its own analog sweep (the "before" of `accuracy`, which
    /// is then measured against the original's digital outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy_original: Option<&'a AnalogEvalReport>,
    digital_sweep: Option<&'a [SweepPoint]>,
    /// Energy, latency and throughput per token (absent when the preset has no `cost` section).
    energy: Option<&'a EnergyReport>,
    stage_seconds: &'a [(String, f64)],
}

/// Stage timer that prints progress to stderr.
struct Stages {
    start: Instant,
    current: Option<(String, Instant)>,
    done: Vec<(String, f64)>,
    total: usize,
}

impl Stages {
    fn begin(&mut self, name: &str) {
        self.end();
        eprintln!("[{}/{}] {name} …", self.done.len() + 1, self.total);
        self.current = Some((name.to_string(), Instant::now()));
    }

    fn end(&mut self) {
        if let Some((name, t)) = self.current.take() {
            let s = t.elapsed().as_secs_f64();
            eprintln!("      {name}: {s:.1} s");
            self.done.push((name, s));
        }
    }
}

pub fn run(args: ReportArgs) -> Result<()> {
    super::args::check_report(&args)?;
    let mut stages = Stages {
        start: Instant::now(),
        current: None,
        done: Vec::new(),
        total: if args.reference.is_some() { 7 } else { 6 },
    };
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    stages.begin("load model and text");
    // The task is read and validated before any model work.
    let task = match (&args.task, args.task_items) {
        (_, 0) => None,
        (Some(path), n) => Some(Task::load(path)?.subset(n)),
        (None, n) => Some(Task::shipped()?.subset(n)),
    };
    let model = load_model(args.model.as_deref())?;
    let model_name = model_name(args.model.as_deref());
    let reference = match &args.reference {
        None => None,
        Some(dir) => {
            let (reference, name) = super::eval::load_reference(dir)?;
            let text = super::eval::eval_text(args.text.as_deref())?;
            check_compatible(&model, &model_name, &reference, &name, &text)?;
            Some((reference, name))
        }
    };
    let reference_model = reference.as_ref().map(|(m, n)| ReferenceModel {
        model: m,
        name: n.as_str(),
    });
    let preset = TilePreset::resolve(&args.preset)?;
    let tokens = load_tokens(&model, args.text.as_deref(), args.tokens)?;
    let times = parse_durations(&args.times).context("--times")?;
    let seeds: Vec<u64> = (0..args.seeds.max(1)).collect();

    stages.begin("drift study of the preset's device");
    let mut drift_cfg = DriftStudyConfig::for_preset(&preset, 0);
    drift_cfg.times_s = times.clone();
    let drift = drift_study(&preset, &drift_cfg)?;
    super::results::check_drift(&drift)?;
    super::drift::write_outputs(&drift, out)?;

    stages.begin("map the model onto the chip");
    let map = map_model(&model, &preset, &args.mapping.options(), &tokens)?;
    super::map::write_outputs(&model_name, &model, &preset, &map, out)?;

    stages.begin("accuracy over drift time (analog vs digital)");
    let cfg = AnalogEvalConfig {
        times_s: times,
        seeds: seeds.clone(),
        seq_len: 512,
        router: RouterKind::default(),
        progress: true,
        device: None,
        execution: Execution::resolve(args.backend)?.with_gpu_memory(args.gpu_memory),
    };
    let task = task
        .map(|t| TaskSequences::for_model(&t, &model, cfg.seq_len))
        .transpose()?;
    let (_, accuracy) = run_one(
        &model,
        &preset,
        &args.mapping.options(),
        &tokens,
        &cfg,
        task.as_ref(),
        reference_model,
    )?;
    super::results::check_analog(&accuracy, &preset.name)?;
    let run = RunResult {
        model: model_name.clone(),
        spec: RunSpec {
            label: format!("{} / {}", preset.name, args.mapping.strategy),
            preset: preset.name.clone(),
            options: args.mapping.options(),
        },
        report: accuracy,
    };
    let original = match reference_model {
        None => {
            plot_runs(std::slice::from_ref(&run), out)?;
            if let Some(t) = &run.report.task {
                crate::report::task_plot::write_task_plot(
                    &run.model,
                    &[(run.spec.label.as_str(), t)],
                    &out.join("task_vs_time"),
                )?;
            }
            None
        }
        Some(r) => {
            stages.begin("accuracy of the original model over drift time (before)");
            let (_, before) = run_one(
                r.model,
                &preset,
                &args.mapping.options(),
                &tokens,
                &cfg,
                task.as_ref(),
                None,
            )?;
            super::results::check_analog(&before, r.name)?;
            write_before_after(&model_name, &before, &run.report, out)?;
            Some(before)
        }
    };

    stages.begin("heterogeneous digital-fraction sweep");
    let sweep_t = parse_duration(&args.sweep_time).context("--sweep-time")?;
    let sweep = if args.sweep_digital.is_empty() || reference.is_some() {
        None
    } else {
        let sweep_tokens = &tokens[..args.sweep_tokens.min(tokens.len())];
        let sweep_cfg = AnalogEvalConfig {
            times_s: vec![sweep_t],
            seeds: (0..args.sweep_seeds.max(1)).collect(),
            ..cfg.clone()
        };
        let (points, digital_ppl) = digital_sweep(
            &model,
            &preset,
            &args.mapping.options(),
            &args.sweep_digital,
            sweep_tokens,
            &sweep_cfg,
        )?;
        super::results::check_sweep(&points, digital_ppl)?;
        let table = write_sweep(&points, sweep_t, digital_ppl, sweep_tokens.len(), out)?;
        Some((points, table, digital_ppl, sweep_tokens.len()))
    };

    stages.begin("energy, latency and throughput per token");
    let energy = match cost_of(&preset) {
        Err(e) => {
            eprintln!("      skipped: {e:#}");
            None
        }
        Ok(_) => {
            let gpu = GpuPreset::resolve(&args.gpu)?;
            let opts = EnergyOptions {
                batches: args.batch.clone(),
                ..Default::default()
            };
            let shape = ModelShape::from_model(&model_name, &model);
            // The costed system puts every linear layer on tiers; where that places more than the
            // accuracy mapping (shared experts, dense MLPs), map again so the report costs what
            // `aimc energy` costs.
            let base = args.mapping.options();
            let costed = crate::energy::paper_mapping(base.clone(), opts.projections);
            let remapped;
            let mapping = if costed == base {
                &map.mapping
            } else {
                let lookup = |id| model.matrix(id);
                remapped = crate::energy::map_shape(&preset, &shape, &costed, &lookup, &map.trace)?;
                &remapped
            };
            let e = estimate(&preset, &gpu, &shape, mapping, &map.trace, &opts)?;
            crate::energy::plots::write_all(&e, out)?;
            Some(e)
        }
    };
    stages.end();

    let elapsed = stages.start.elapsed().as_secs_f64();
    // The command as a person would type it: `aimc` and the arguments, whatever path the binary ran from.
    let command = std::iter::once("aimc".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let report = Report {
        schema_version: REPORT_SCHEMA_VERSION,
        aimc_version: env!("CARGO_PKG_VERSION"),
        command: command.clone(),
        elapsed_seconds: elapsed,
        model: model_name.clone(),
        parameters: model.param_counts(),
        preset: &preset,
        seeds: seeds.clone(),
        drift: &drift,
        mapping: &map.summary,
        accuracy: &run.report,
        reference: reference.as_ref().map(|(_, n)| n.clone()),
        accuracy_original: original.as_ref(),
        digital_sweep: sweep.as_ref().map(|s| s.0.as_slice()),
        energy: energy.as_ref(),
        stage_seconds: &stages.done,
    };
    write_json(&out.join("report.json"), &report)?;
    let md = index_md(
        &args,
        &report,
        sweep.as_ref().map(|s| (s.1.as_str(), s.2, s.3)),
        sweep_t,
    );
    std::fs::write(out.join("index.md"), md)
        .with_context(|| format!("writing {}", out.join("index.md").display()))?;
    eprintln!(
        "wrote {}/index.md and report.json in {elapsed:.1} s",
        out.display()
    );
    Ok(())
}

fn index_md(
    args: &ReportArgs,
    r: &Report<'_>,
    sweep: Option<(&str, f64, usize)>,
    sweep_t: f64,
) -> String {
    let mut s = String::new();
    let p = r.preset;
    let _ = writeln!(s, "# aimc report: {} on {}\n", r.model, p.name);
    let _ = writeln!(
        s,
        "Generated by aimc {} in {:.0} s with\n\n```\n{}\n```\n",
        r.aimc_version, r.elapsed_seconds, r.command
    );
    let _ = writeln!(s, "## Setup\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| model | {} ({} parameters, {} routed-expert parameters, {} active per token) |",
        r.model,
        thousands(r.parameters.total),
        thousands(r.parameters.experts),
        thousands(r.parameters.active_per_token)
    );
    if let Some(name) = &r.reference {
        let _ = writeln!(
            s,
            "| reference | {name}, the {ORIGINAL} model {} was fine-tuned from (the accuracy section compares \
             both) |",
            r.model
        );
    }
    let _ = writeln!(s, "| preset | `{}`: {} |", p.name, p.description);
    let _ = writeln!(
        s,
        "| chip | {} stacks × {} tiers of {}×{} crossbars (the mapping uses {}) |",
        thousands(p.stack.stacks),
        p.stack.tiers_per_stack,
        p.stack.rows,
        p.stack.cols,
        r.mapping.stacks_used
    );
    let _ = writeln!(s, "| mapping | {} |", r.mapping.strategy);
    let _ = writeln!(
        s,
        "| evaluation | {} tokens of {} in windows of {}; seeds 0 to {} |",
        thousands(r.accuracy.tokens),
        args.text
            .as_ref()
            .map_or("the embedded held-out text".to_string(), |t| t
                .display()
                .to_string()),
        r.accuracy.seq_len,
        r.seeds.len().saturating_sub(1)
    );
    let _ = writeln!(s, "| stages | {} |\n", stage_list(r.stage_seconds));

    let _ = writeln!(s, "## Device drift ({})\n", p.name);
    let _ = writeln!(
        s,
        "A {}×{} test matrix programmed with seed 0 and drifted (`drift.json`).\n",
        r.drift.config.n_out, r.drift.config.n_in
    );
    let _ = writeln!(
        s,
        "| drift time | mean g [µS] | MVM rel. error, GDC | MVM rel. error, no GDC |\n|---|---|---|---|"
    );
    for d in &r.drift.points {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.4} | {:.4} |",
            format_duration(d.t_seconds),
            d.g_mean_us,
            d.mvm_rel_err_gdc,
            d.mvm_rel_err_no_gdc
        );
    }
    let _ = writeln!(
        s,
        "\n![drift fan](drift_fan.png)\n\n![MVM error](mvm_error.png)\n"
    );

    let _ = writeln!(s, "## Mapping\n\n```\n{}```\n", r.mapping);
    let _ = writeln!(s, "![occupancy](occupancy.png)\n");

    if let (Some(name), Some(before)) = (&r.reference, r.accuracy_original) {
        before_after_md(&mut s, name, before, r.accuracy);
        return finish_md(s, args, r, sweep, sweep_t);
    }
    let _ = writeln!(s, "## Accuracy over drift time\n");
    let _ = writeln!(
        s,
        "Analog forwards: {:.1} s on {}.\n",
        r.accuracy.analog_seconds, r.accuracy.backend
    );
    let _ = writeln!(s, "{}", markdown_table(r.accuracy));
    let _ = writeln!(
        s,
        "![perplexity](perplexity_vs_time.png)\n\n![agreement](agreement_vs_time.png)\n"
    );

    if let Some(t) = &r.accuracy.task {
        let _ = writeln!(
            s,
            "## Multiple-choice task accuracy over drift time\n\nEach choice scored by the summed \
             log-probability of its tokens given the context (`acc`), and by that sum per byte of \
             the choice (`acc_norm`), as lm-evaluation-harness scores multiple choice; the same \
             programmed and drifted crossbars as the table above.\n"
        );
        let _ = writeln!(
            s,
            "{}\n![task accuracy](task_vs_time.png)\n",
            t.markdown_table()
        );
    }
    finish_md(s, args, r, sweep, sweep_t)
}

/// The before/after accuracy section of a report with `--reference`: the original's sweep and the fine-tuned
/// model's, both against the original's digital outputs, and the plots of `report::before_after`.
fn before_after_md(
    s: &mut String,
    name: &str,
    before: &AnalogEvalReport,
    after: &AnalogEvalReport,
) {
    let _ = writeln!(
        s,
        "## Before and after: {ORIGINAL} vs {FINE_TUNED} on the analog tiles\n\n\
         Both models are measured against the {ORIGINAL} model's digital outputs ({name}): \
         the {ORIGINAL} model's own analog sweep (before) and the {FINE_TUNED} model's (after), on the same \
         tokens, seeds and drift times. Analog forwards: {:.1} s and {:.1} s on {}.\n",
        before.analog_seconds, after.analog_seconds, after.backend
    );
    if let Some(r) = &after.reference {
        let _ = writeln!(
            s,
            "Digital perplexity: {:.3} {ORIGINAL}, {:.3} {FINE_TUNED} ({:+.2}%).\n",
            r.reference_digital_perplexity,
            r.model_digital_perplexity,
            r.digital_perplexity_change_percent
        );
    }
    let _ = writeln!(
        s,
        "| drift time | KL, {ORIGINAL} | KL, {FINE_TUNED} | agreement, {ORIGINAL} | agreement, {FINE_TUNED} | \
         perplexity, {ORIGINAL} | perplexity, {FINE_TUNED} |\n|---|---|---|---|---|---|---|"
    );
    for (b, a) in before.summary.iter().zip(&after.summary) {
        let _ = writeln!(
            s,
            "| {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.3} ± {:.3} | {:.3} ± {:.3} |",
            format_duration(a.t_seconds),
            b.kl_mean,
            b.kl_std,
            a.kl_mean,
            a.kl_std,
            b.agreement_mean,
            b.agreement_std,
            a.agreement_mean,
            a.agreement_std,
            b.perplexity_mean,
            b.perplexity_std,
            a.perplexity_mean,
            a.perplexity_std
        );
    }
    let _ = writeln!(
        s,
        "\nKL is KL(original digital ‖ analog) in nats; agreement is the top-1 agreement with the original's digital \
         outputs.\n\n![KL](kl_vs_time.png)\n\n![agreement](agreement_vs_time.png)\n\n\
         ![perplexity](perplexity_vs_time.png)\n"
    );
    if let (Some(tb), Some(ta)) = (&before.task, &after.task) {
        let _ = writeln!(
            s,
            "### Multiple-choice task `{}` ({} items)\n\n| drift time | acc, {ORIGINAL} | acc, {FINE_TUNED} | \
             acc_norm, {ORIGINAL} | acc_norm, {FINE_TUNED} |\n|---|---|---|---|---|",
            ta.task, ta.items
        );
        let _ = writeln!(
            s,
            "| digital | {:.4} | {:.4} | {:.4} | {:.4} |",
            tb.digital.acc, ta.digital.acc, tb.digital.acc_norm, ta.digital.acc_norm
        );
        for (b, a) in tb.summary.iter().zip(&ta.summary) {
            let _ = writeln!(
                s,
                "| {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} |",
                format_duration(a.t_seconds),
                b.acc_mean,
                b.acc_std,
                a.acc_mean,
                a.acc_std,
                b.acc_norm_mean,
                b.acc_norm_std,
                a.acc_norm_mean,
                a.acc_norm_std
            );
        }
        let _ = writeln!(s, "\n![task accuracy](task_vs_time.png)\n");
    }
    let _ = writeln!(
        s,
        "The heterogeneous analog–digital sweep is not run with `--reference` (it measures a model against its own \
         digital outputs); run `aimc report` on either model alone for it.\n"
    );
}

/// The sections after the accuracy one: the sweep, energy, files.
fn finish_md(
    mut s: String,
    args: &ReportArgs,
    r: &Report<'_>,
    sweep: Option<(&str, f64, usize)>,
    sweep_t: f64,
) -> String {
    if let Some((table, digital, n)) = sweep {
        let _ = writeln!(
            s,
            "## Heterogeneous analog–digital sweep at {}\n\nPerplexity when the top fraction of each layer's experts \
             stays digital, chosen by max neuron norm or at random, at {} seeds. To keep the report fast the sweep \
             scores the first {} of the {} evaluation tokens (`--sweep-tokens`); the digital model's perplexity on \
             those tokens is {digital:.3} (on all {}: {:.3}), so compare the sweep with its own digital line only.\n",
            format_duration(sweep_t),
            args.sweep_seeds.max(1),
            thousands(n),
            thousands(r.accuracy.tokens),
            thousands(r.accuracy.tokens),
            r.accuracy.digital_perplexity
        );
        let _ = writeln!(s, "{table}\n![digital sweep](digital_sweep.png)\n");
    }
    if let Some(e) = r.energy {
        let _ = writeln!(s, "{}", energy_md(e));
    }
    let _ = writeln!(
        s,
        "## Files\n\n`report.json` (schema version {}), `drift.json`, `mapping.json`, `summary.json`, and every plot \
         above as PNG and SVG.",
        r.schema_version
    );
    s
}

fn energy_md(e: &EnergyReport) -> String {
    use crate::energy::{joules_si, seconds_si};
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Energy, latency and throughput per token\n\nCost constants of `{}` (each with its source in the preset), \
         against the `{}` roofline estimate; costed system: {}. {} stacks used.\n",
        e.preset, e.gpu, e.system, e.stacks_used
    );
    let _ = writeln!(
        s,
        "| phase | batch | energy/token | latency/token | tokens/s | tier switches/token | {0} energy/token | {0} tokens/s | bottleneck |\n|---|---|---|---|---|---|---|---|---|",
        e.gpu
    );
    let row = |s: &mut String, phase: &str, batch: usize, a: &PhaseCost, g: &GpuEstimate| {
        let _ = writeln!(
            s,
            "| {phase} | {batch} | {} | {} | {:.0} | {:.2} | {} | {:.0} | {} |",
            joules_si(a.energy.total()),
            seconds_si(a.latency_per_token_s),
            a.tokens_per_s,
            a.tier_switches_per_token,
            joules_si(g.energy_per_token_j),
            g.tokens_per_s,
            a.bottleneck.description
        );
    };
    for ((a, g), b) in e.decode.iter().zip(&e.gpu_decode).zip(&e.options.batches) {
        row(&mut s, "decode", *b, a, g);
    }
    row(
        &mut s,
        "prefill",
        e.options.prefill_tokens,
        &e.prefill,
        &e.gpu_prefill,
    );
    let _ = writeln!(
        s,
        "\n![energy breakdown](breakdown.png)\n\n![energy vs batch](energy_vs_batch.png)\n\n![throughput vs batch](throughput_vs_batch.png)\n\n![busy time per step vs batch](busy_vs_batch.png)\n"
    );
    s
}

fn stage_list(stages: &[(String, f64)]) -> String {
    stages
        .iter()
        .map(|(n, s)| format!("{n} {s:.1} s"))
        .collect::<Vec<_>>()
        .join("; ")
}

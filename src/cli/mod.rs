//! Command-line interface: one subcommand per job, each in its own file.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod args;
mod bench;
mod common;
mod drift;
mod energy;
mod eval;
mod eval_analog;
mod finetune;
mod info;
mod map;
mod presets;
mod report;
mod results;

#[derive(Parser, Debug)]
#[command(
    name = "aimc",
    version,
    about = "Analog in-memory computing simulator for Mixture-of-Experts LLMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the built-in chips (tile presets): crossbar size, tiers, stacks, energy costs; the default is marked.
    Presets(presets::PresetsArgs),
    /// Program a test matrix on a chip, drift it over time; JSON and plots in aimc-out/drift/.
    Drift(drift::DriftArgs),
    /// Map a model onto the chip's 3D stacks; summary, JSON and occupancy picture in aimc-out/map/.
    Map(map::MapArgs),
    /// Accuracy of the analog model vs the digital one over drift time and seeds, in aimc-out/eval/ (`--digital`:
    /// digital perplexity only).
    Eval(eval::EvalArgs),
    /// Print a model's architecture and parameter counts.
    Info(info::InfoArgs),
    /// The whole study in aimc-out/report/: drift, mapping, accuracy over drift time, heterogeneous sweep, energy.
    Report(report::ReportArgs),
    /// CPU/GPU benchmarks, each timed against a reference measured in the same run.
    Bench(bench::BenchArgs),
    /// Energy, latency and throughput per token on a costed chip, against a GPU, in aimc-out/energy/.
    Energy(energy::EnergyArgs),
    /// Hardware-aware fine-tuning of the routed experts against a chip's noise, layer by layer; writes a checkpoint.
    Finetune(finetune::FinetuneArgs),
}

/// Parse the process arguments and run the chosen subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Presets(a) => presets::run(a),
        Command::Drift(a) => drift::run(a),
        Command::Map(a) => map::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Info(a) => info::run(a),
        Command::Report(a) => report::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Energy(a) => energy::run(a),
        Command::Finetune(a) => finetune::run(a),
    }
}

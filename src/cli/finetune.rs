//! `aimc finetune`: hardware-aware fine-tuning of the routed experts by layer-wise distillation
//! (docs/finetune.md). Validates every flag, records calibration data, trains layer by layer
//! with progress on stderr, writes the checkpoint in the input's own layout and `finetune.json`.
//! `--backend` picks where the layers train as `aimc eval` picks where its analog products run
//! (`auto`: the GPU when there is one and the preset's objective runs there, else the CPU with
//! a notice); on the GPU one layer's experts are on the device at a time.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::common::{load_model, model_name, write_versioned_json, DEFAULT_PRESET};
use crate::backend::{BackendRequest, Execution};
use crate::eval::time::{format_duration, parse_duration};
use crate::finetune::calib::LayerCalib;
use crate::finetune::calib::{self, EMBEDDED_CALIB_NAME, EMBEDDED_CALIB_TEXT};
use crate::finetune::noisy::CpuObjective;
use crate::finetune::{finetune_layer, FinetuneConfig, LayerRecord};
use crate::model::common::SwiGlu;
use crate::model::write::{write_checkpoint, write_checkpoint_from, ExpertUpdates};
use crate::model::{Ffn, RouterKind};
use crate::tile::TilePreset;

/// Fewest calibration tokens accepted (a few windows' worth of routing per expert).
const MIN_CALIB_TOKENS: usize = 64;
/// Most steps per layer accepted.
const MAX_STEPS: usize = 1_000_000;

/// Arguments of `aimc finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// HuggingFace checkpoint directory to fine-tune (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tile preset whose physics the experts are trained against: a built-in name or a JSON file.
    #[arg(long, default_value = DEFAULT_PRESET)]
    pub preset: String,
    /// UTF-8 calibration text (default with the embedded model: an excerpt of its training
    /// split, Genesis 1-24; required with --model). Never use the evaluation text.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens: the first N tokens of the text (or all it holds, if fewer).
    #[arg(long, default_value_t = 16384)]
    pub calib_tokens: usize,
    /// Calibration window length in tokens (non-overlapping windows, as `aimc eval`).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Output checkpoint directory (must not exist or be empty).
    #[arg(long, default_value = "aimc-out/finetune/model")]
    pub out: PathBuf,
    /// Adam steps per layer.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Initial learning rate (weight units per step), decayed by a cosine to a tenth.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// Seed of the training noise and of the token batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration tokens per step.
    #[arg(long, default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Read-out time after programming of the training noise (drift, read noise and drift
    /// compensation at that time; `none`: programming noise only). Default: one year, the
    /// time the evaluation's last point measures.
    #[arg(long, default_value = "1y")]
    pub drift_time: String,
    /// MoE layers to train, e.g. `0,2` (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Router used while recording the calibration routing.
    #[arg(long, default_value = "default")]
    pub router: RouterKind,
    /// Where the layers train: the CPU, CUDA (error without a GPU or for a preset whose
    /// objective the GPU does not run), or CUDA when available (else the CPU, with a notice).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendRequest,
}

/// `finetune.json`.
#[derive(Serialize)]
struct FinetuneRecord<'a> {
    model: String,
    preset: &'a TilePreset,
    calibration_text: String,
    calibration_tokens: usize,
    seq_len: usize,
    drift_time: String,
    config: &'a FinetuneConfig,
    layers: &'a [LayerRecord],
    /// `cpu` or `cuda (<GPU name>)`.
    backend: String,
    /// Where the calibration data was recorded: `cpu`, or `cuda` (the digital forward on the
    /// GPU the layers train on).
    calibration_backend: &'static str,
    /// Recording the calibration data, s.
    calibration_seconds: f64,
    /// Training all layers (loss before and after included), s.
    training_seconds: f64,
    /// Loading the checkpoint, s.
    load_seconds: f64,
    /// Writing the fine-tuned checkpoint, s.
    write_seconds: f64,
    /// On the GPU: the largest peak of a layer's device buffers (the memory pool's high-water
    /// mark), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    device_peak_bytes: Option<u64>,
    /// On the GPU: the most device memory in use (all processes, the context and the memory
    /// pool's cached blocks included) at the end of a layer, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    device_in_use_bytes: Option<u64>,
    wall_seconds: f64,
    checkpoint: String,
}

/// The GPU the layers train on (`None`: the CPU).
#[cfg(feature = "cuda")]
type Gpu = Option<std::sync::Arc<crate::backend::cuda::CudaDevice>>;
#[cfg(not(feature = "cuda"))]
type Gpu = Option<std::convert::Infallible>;

/// `--backend` resolved for `preset`: under `cuda` an error when there is no GPU or the GPU
/// does not run the preset's objective, under `auto` a notice and the CPU.
fn choose_backend(request: BackendRequest, preset: &TilePreset) -> Result<(Gpu, String)> {
    let execution = Execution::resolve(request)?;
    #[cfg(feature = "cuda")]
    {
        let Some(dev) = execution.gpu_for(preset)? else {
            return Ok((None, "cpu".into()));
        };
        match crate::backend::cuda::finetune::unsupported(preset) {
            None => Ok((Some(dev), execution.describe())),
            Some(why) if request == BackendRequest::Cuda => bail!(
                "--backend cuda with preset `{}`: {why} (use --backend cpu)",
                preset.name
            ),
            Some(why) => {
                eprintln!(
                    "note: fine-tuning with preset `{}` runs on the CPU ({why})",
                    preset.name
                );
                Ok((None, "cpu".into()))
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (execution, preset);
        Ok((None, "cpu".into()))
    }
}

/// Records the calibration data on the GPU the layers train on (its digital forward, the
/// device memory handed back before training), else on the CPU; with where it ran. A model
/// whose digital forward the GPU cannot run (dense weights beyond its memory, an attention it
/// does not take) records on the CPU, with a notice.
fn record_calibration(
    gpu: &Gpu,
    model: &crate::model::Model,
    tokens: &[u32],
    a: &FinetuneArgs,
) -> Result<(Vec<LayerCalib>, &'static str)> {
    #[cfg(feature = "cuda")]
    if let Some(dev) = gpu {
        use crate::backend::cuda::CudaError;
        match crate::backend::cuda::finetune::calib::record(dev, model, tokens, a.seq_len, a.router)
        {
            Ok(recorded) => return Ok((recorded, "cuda")),
            Err(e)
                if matches!(
                    e.downcast_ref::<CudaError>(),
                    Some(CudaError::Unsupported(_))
                ) =>
            {
                eprintln!("note: calibration runs the digital model on the CPU ({e:#})");
            }
            Err(e) => return Err(e),
        }
    }
    let _ = gpu;
    Ok((calib::record(model, tokens, a.seq_len, a.router)?, "cpu"))
}

/// Device memory figures of a GPU run: (largest layer peak, most in use at a layer's end).
#[derive(Default)]
struct DeviceMemory {
    peak: Option<u64>,
    in_use: Option<u64>,
}

/// Trains one layer on `gpu` (its experts on the device for the layer only), or on the CPU.
#[allow(clippy::too_many_arguments)]
fn train(
    (gpu, request): (&Gpu, BackendRequest),
    preset: &TilePreset,
    drift_s: Option<f64>,
    calib: &LayerCalib,
    experts: &mut [SwiGlu],
    cfg: &FinetuneConfig,
    progress: &dyn Fn(&str),
    memory: &mut DeviceMemory,
) -> Result<LayerRecord> {
    #[cfg(feature = "cuda")]
    if let Some(dev) = gpu {
        use crate::backend::cuda::finetune::CudaTrainer;
        use crate::finetune::trainer::LayerTrainer;
        // The pool keeps the step's freed buffers for the next step; its guard hands them back
        // to the driver when the layer is done.
        let pool = dev.retain_pool()?;
        dev.reset_pool_peak()?;
        let setup = Instant::now();
        let mut trainer = match CudaTrainer::new(dev.clone(), preset, drift_s, calib, experts) {
            Ok(t) => t,
            // A layer the GPU cannot train (e.g. a router with a varying number of experts
            // per token) trains on the CPU under `auto`.
            Err(e)
                if request == BackendRequest::Auto
                    && matches!(
                        e.downcast_ref::<crate::backend::cuda::CudaError>(),
                        Some(crate::backend::cuda::CudaError::Unsupported(_))
                    ) =>
            {
                drop(pool);
                eprintln!("note: layer {} trains on the CPU ({e})", calib.layer);
                let objective = CpuObjective::new(preset, drift_s);
                return finetune_layer(calib, experts, &objective, cfg, progress);
            }
            Err(e) => return Err(e),
        };
        let setup_seconds = setup.elapsed().as_secs_f64();
        let mut record = crate::finetune::train_layer(calib, &mut trainer, cfg, progress)?;
        let read_back = Instant::now();
        for (dst, trained) in experts.iter_mut().zip(trainer.experts()?) {
            *dst = trained;
        }
        record.transfer_seconds = Some(setup_seconds + read_back.elapsed().as_secs_f64());
        // AIMC_PROFILE_FORWARD=1: where the layer's time went.
        for s in trainer.stage_seconds() {
            progress(&format!(
                "layer {}: {:<40} {:8.3} s ({:.3} s host)",
                calib.layer, s.name, s.seconds, s.host_seconds
            ));
        }
        let peak = dev.pool_peak_bytes()?;
        let (free, total) = dev.memory_bytes()?;
        let in_use = total.saturating_sub(free) as u64;
        drop(trainer);
        drop(pool);
        record.device_peak_bytes = Some(peak);
        memory.peak = memory.peak.max(Some(peak));
        memory.in_use = memory.in_use.max(Some(in_use));
        progress(&format!(
            "layer {}: peak device memory {:.2} GiB (pool high-water mark), {:.2} GiB in use on the device; \
             set-up and read-back {:.1} s",
            calib.layer,
            peak as f64 / f64::from(1u32 << 30),
            in_use as f64 / f64::from(1u32 << 30),
            record.transfer_seconds.unwrap_or(0.0)
        ));
        return Ok(record);
    }
    let _ = (gpu, request, &memory);
    let objective = CpuObjective::new(preset, drift_s);
    finetune_layer(calib, experts, &objective, cfg, progress)
}

/// The flags' checks that need no model (each error names the flag).
fn check(a: &FinetuneArgs) -> Result<(TilePreset, Option<f64>)> {
    if a.steps == 0 || a.steps > MAX_STEPS {
        bail!(
            "--steps {} is out of range (allowed 1..={MAX_STEPS})",
            a.steps
        );
    }
    if !(a.lr.is_finite() && a.lr > 0.0 && a.lr <= 1.0) {
        bail!("--lr {} is out of range (a finite number in (0, 1])", a.lr);
    }
    if a.batch_tokens == 0 {
        bail!("--batch-tokens 0 is out of range (at least 1)");
    }
    if a.calib_tokens < MIN_CALIB_TOKENS {
        bail!(
            "--calib-tokens {} is out of range (at least {MIN_CALIB_TOKENS})",
            a.calib_tokens
        );
    }
    if a.seq_len < 2 {
        bail!("--seq-len {} is out of range (at least 2)", a.seq_len);
    }
    let preset =
        TilePreset::resolve(&a.preset).with_context(|| format!("--preset {}", a.preset))?;
    let drift = match a.drift_time.as_str() {
        "none" => None,
        t => Some(parse_duration(t).with_context(|| format!("--drift-time {t}"))?),
    };
    if a.model.is_some() && a.calib.is_none() {
        bail!("--calib TEXT is required with --model (the default calibration text belongs to the embedded model)");
    }
    check_out(&a.out)?;
    Ok((preset, drift))
}

/// `--out` must not exist or be an empty directory.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("--out {}", out.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "--out {}: exists and is not an empty directory (choose a new one)",
                out.display()
            );
        }
    }
    Ok(())
}

/// Runs `aimc finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    let clock = Instant::now();
    let (preset, drift_s) = check(&a)?;
    let (gpu, backend) = choose_backend(a.backend, &preset)?;
    let (text, text_name) = match &a.calib {
        Some(p) => (
            super::args::read_text_file("--calib", p)?,
            p.display().to_string(),
        ),
        None => (
            EMBEDDED_CALIB_TEXT.to_string(),
            EMBEDDED_CALIB_NAME.to_string(),
        ),
    };
    let load_clock = Instant::now();
    let mut model = load_model(a.model.as_deref())?;
    let load_seconds = load_clock.elapsed().as_secs_f64();
    super::args::check_router(&a.router, &model)?;
    let moe: Vec<usize> = (0..model.config.num_layers)
        .filter(|&l| model.config.moe_layers[l])
        .collect();
    let layers: Vec<usize> = if a.layers.is_empty() {
        moe.clone()
    } else {
        for &l in &a.layers {
            if !moe.contains(&l) {
                bail!("--layers {l}: not a MoE layer of this model (MoE layers: {moe:?})");
            }
        }
        let mut l = a.layers.clone();
        l.sort_unstable();
        l.dedup();
        l
    };
    let mut tokens = model.tokenizer()?.encode(&text)?;
    tokens.truncate(a.calib_tokens);
    if tokens.len() < MIN_CALIB_TOKENS {
        bail!(
            "--calib {text_name}: gives {} tokens, at least {MIN_CALIB_TOKENS} are needed",
            tokens.len()
        );
    }
    let cfg = FinetuneConfig {
        steps: a.steps,
        lr: a.lr,
        seed: a.seed,
        batch_tokens: a.batch_tokens,
        drift_s,
    };
    eprintln!(
        "finetune: {} on `{}`, {} calibration tokens, {} steps per layer, layers {layers:?}, on {backend}",
        model_name(a.model.as_deref()),
        preset.name,
        tokens.len(),
        a.steps
    );
    let calib_clock = Instant::now();
    let (recorded, calibration_backend) = record_calibration(&gpu, &model, &tokens, &a)?;
    let calibration_seconds = calib_clock.elapsed().as_secs_f64();
    eprintln!(
        "finetune: calibration recorded in {calibration_seconds:.1} s on the {}",
        if calibration_backend == "cpu" {
            "CPU"
        } else {
            "GPU"
        }
    );
    let progress = |line: &str| eprintln!("{line}");
    let mut updates = BTreeMap::new();
    let mut records = Vec::new();
    let mut memory = DeviceMemory::default();
    let train_clock = Instant::now();
    let todo: Vec<&LayerCalib> = recorded
        .iter()
        .filter(|c| layers.contains(&c.layer))
        .collect();
    for (i, c) in todo.iter().enumerate() {
        let Ffn::Moe(block) = &mut model.layers[c.layer].ffn else {
            unreachable!("recorded layers are MoE layers")
        };
        progress(&format!(
            "finetune: layer {} ({} of {})",
            c.layer,
            i + 1,
            todo.len()
        ));
        records.push(train(
            (&gpu, a.backend),
            &preset,
            drift_s,
            c,
            &mut block.experts,
            &cfg,
            &progress,
            &mut memory,
        )?);
        // The trained experts move to the checkpoint writer: calibration recorded every
        // layer's inputs before training, so the model never runs again.
        updates.insert(c.layer, std::mem::take(&mut block.experts));
    }
    let training_seconds = train_clock.elapsed().as_secs_f64();
    let updates = ExpertUpdates { layers: updates };
    let write_clock = Instant::now();
    let written = match &a.model {
        Some(dir) => write_checkpoint(dir, &a.out, &updates)?,
        None => write_checkpoint_from(&crate::model::embedded::source(), &a.out, &updates)?,
    };
    let write_seconds = write_clock.elapsed().as_secs_f64();
    let record = FinetuneRecord {
        model: model_name(a.model.as_deref()),
        preset: &preset,
        calibration_text: text_name,
        calibration_tokens: tokens.len(),
        seq_len: a.seq_len,
        drift_time: drift_s.map_or("none".into(), format_duration),
        config: &cfg,
        layers: &records,
        backend,
        calibration_backend,
        calibration_seconds,
        training_seconds,
        load_seconds,
        write_seconds,
        device_peak_bytes: memory.peak,
        device_in_use_bytes: memory.in_use,
        wall_seconds: clock.elapsed().as_secs_f64(),
        checkpoint: written.dir.display().to_string(),
    };
    let json = a.out.join("finetune.json");
    write_versioned_json(&json, &record)?;
    eprintln!(
        "finetune: wrote {} and {} ({:.1} s: loading {:.1} s, calibration {:.1} s, training {:.1} s, \
         writing {:.1} s)",
        written.dir.display(),
        json.display(),
        record.wall_seconds,
        record.load_seconds,
        record.calibration_seconds,
        record.training_seconds,
        record.write_seconds
    );
    if let Some(peak) = record.device_peak_bytes {
        eprintln!(
            "finetune: peak device memory {:.2} GiB (largest layer, memory pool high-water mark); \
             at most {:.2} GiB in use on the device at a layer's end",
            peak as f64 / f64::from(1u32 << 30),
            record.device_in_use_bytes.unwrap_or(0) as f64 / f64::from(1u32 << 30)
        );
    }
    Ok(())
}

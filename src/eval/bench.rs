//! CPU benchmark of the digital model (issue 3 targets: ≥ 2,000 tokens/s forward on 2 cores for
//! 512-token sequences; expert FFN path within 2× of a plain matmul of the same FLOPs).
//!
//! Each figure is timed against a reference measured in the same run (docs/model.md §8): the expert
//! path ([`crate::model::moe::dispatch`]: grouping, gather, gate/up/down GEMMs, SiLU, weighted
//! scatter) against one plain `[T·k, H] × [H, 3I]` GEMM, which has exactly its multiply-adds.
use std::time::Instant;

use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::model::common::Linear;
use crate::model::common::{matmul_t, RmsNorm, StandardAttention, SwiGlu};
use crate::model::config::{AttentionConfig, Family, ModelConfig, QkNorm};
use crate::model::moe::{dispatch, MoeBlock};
use crate::model::rope::{RopeConfig, RopeScaling};
use crate::model::{Attention, DecoderLayer, Ffn, ForwardOptions, Model, RouterKind, RouterRule};

/// Results of [`model_bench`]; `Display` renders a markdown table.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBench {
    /// One-line description of the model measured.
    pub model: String,
    /// Total parameters.
    pub params: usize,
    /// rayon threads.
    pub threads: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per forward call.
    pub batch: usize,
    /// Timed repetitions per measurement.
    pub reps: usize,
    /// Median over `reps` of processed tokens per second, whole forward (logits included).
    pub forward_tokens_per_s: f64,
    /// Tokens per CPU-second of this process over all forward repetitions (Linux `/proc`; `None`
    /// elsewhere). Unlike wall time it does not drop when other processes share the cores;
    /// × threads it bounds what those threads reach alone.
    pub forward_tokens_per_cpu_s: Option<f64>,
    /// Tokens routed through layer 0's experts in the FFN comparison (= seq_len · batch).
    pub ffn_tokens: usize,
    /// Multiply-adds ×2 of the expert path (= of the plain GEMM).
    pub ffn_flops: f64,
    /// Median seconds of the expert path.
    pub ffn_dispatch_s: f64,
    /// Median seconds of `ndarray` `dot` of the same FLOPs (one thread).
    pub plain_dot_s: f64,
    /// Median seconds of the same GEMM split over row blocks on all threads.
    pub plain_parallel_s: f64,
    /// Median over repetitions of expert-path time / fastest plain GEMM time (target ≤ 2).
    pub ffn_ratio: f64,
}

impl std::fmt::Display for ModelBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gflops = |s: f64| self.ffn_flops / s / 1e9;
        writeln!(
            f,
            "model: {} ({} parameters), {} threads",
            self.model, self.params, self.threads
        )?;
        writeln!(f)?;
        writeln!(f, "| measurement | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(
            f,
            "| forward, {} × {}-token sequences per call (median of {}) | {:.0} tokens/s |",
            self.batch, self.seq_len, self.reps, self.forward_tokens_per_s
        )?;
        if let Some(cpu) = self.forward_tokens_per_cpu_s {
            writeln!(
                f,
                "| forward, tokens per CPU-second (all repetitions) | {cpu:.0} |"
            )?;
        }
        writeln!(
            f,
            "| expert FFN path, layer 0, {} tokens | {:.2} ms ({:.1} GFLOP/s) |",
            self.ffn_tokens,
            self.ffn_dispatch_s * 1e3,
            gflops(self.ffn_dispatch_s)
        )?;
        writeln!(
            f,
            "| plain ndarray `dot`, same FLOPs, 1 thread | {:.2} ms ({:.1} GFLOP/s) |",
            self.plain_dot_s * 1e3,
            gflops(self.plain_dot_s)
        )?;
        writeln!(
            f,
            "| plain GEMM, same FLOPs, row blocks on {} threads | {:.2} ms ({:.1} GFLOP/s) |",
            self.threads,
            self.plain_parallel_s * 1e3,
            gflops(self.plain_parallel_s)
        )?;
        writeln!(
            f,
            "| expert path / fastest plain GEMM (median of per-rep ratios) | {:.2}× |",
            self.ffn_ratio
        )
    }
}

/// Median wall time of `reps` runs of `f` (after one warm-up run), seconds.
pub fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Benchmarks `model`: forward throughput on `batch` random sequences of `seq_len` tokens, and the
/// expert FFN path of its first MoE layer against a plain GEMM of the same FLOPs.
pub fn model_bench(
    model: &Model,
    description: &str,
    seq_len: usize,
    batch: usize,
    reps: usize,
) -> ModelBench {
    let cfg = &model.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq_len)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let opts = ForwardOptions::default();
    let cpu_before = process_cpu_seconds();
    let forward_s = median_seconds(reps, || {
        model
            .forward_batch(&refs, &opts)
            .expect("benchmark forward");
    });
    // `median_seconds` runs the closure reps + 1 times (one warm-up).
    let forward_tokens_per_cpu_s = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => Some(((reps.max(1) + 1) * seq_len * batch) as f64 / (b - a)),
        _ => None,
    };

    let (layer, moe) = model
        .layers
        .iter()
        .enumerate()
        .find_map(|(l, x)| match &x.ffn {
            Ffn::Moe(m) => Some((l, m)),
            Ffn::Dense(_) => None,
        })
        .expect("a MoE model has a MoE layer");
    let tokens = seq_len * batch;
    let x = random_matrix(&mut rng, tokens, cfg.hidden_size, 1.0);
    let logits = matmul_t(x.view(), moe.router.view());
    let assignments = RouterKind::CheckpointDefault.route(logits.view(), &cfg.router);
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let rows = assignments.len();
    let a = random_matrix(&mut rng, rows, h, 1.0);
    let b = random_matrix(&mut rng, h, 3 * i, 0.1);
    let bt = b.t().as_standard_layout().into_owned();
    // The three timings alternate within each repetition, so a load change on a shared machine
    // hits all three alike; the ratio is the median of per-repetition ratios.
    let time = |f: &mut dyn FnMut()| {
        let s = Instant::now();
        f();
        s.elapsed().as_secs_f64()
    };
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let d = time(&mut || {
            dispatch(layer, x.view(), &assignments, moe.experts.len(), model);
        });
        let p1 = time(&mut || {
            std::hint::black_box(a.dot(&b));
        });
        let pn = time(&mut || {
            std::hint::black_box(matmul_t(a.view(), bt.view()));
        });
        if rep > 0 {
            samples.push([d, p1, pn, d / p1.min(pn)]);
        }
    }
    let median = |k: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ffn_dispatch_s, plain_dot_s, plain_parallel_s) = (median(0), median(1), median(2));
    ModelBench {
        model: description.to_owned(),
        params: model.param_counts().total,
        threads: rayon::current_num_threads(),
        seq_len,
        batch,
        reps,
        forward_tokens_per_s: tokens as f64 / forward_s,
        forward_tokens_per_cpu_s,
        ffn_tokens: tokens,
        ffn_flops: 2.0 * rows as f64 * h as f64 * 3.0 * i as f64,
        ffn_dispatch_s,
        plain_dot_s,
        plain_parallel_s,
        ffn_ratio: median(3),
    }
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, fields 14–15, in clock
/// ticks of 1/100 s, the `USER_HZ` Linux exposes to user space).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields restart after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn random_matrix(rng: &mut impl Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        scale * rng.sample::<f32, _>(StandardNormal)
    })
}

/// Sizes of a random OLMoE-style model for benchmarks when no trained checkpoint is at hand.
#[derive(Debug, Clone, Copy, Serialize)]
#[allow(missing_docs)] // sizes named as in `ModelConfig`
pub struct SyntheticSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
}

impl SyntheticSpec {
    /// The issue's reference size: hidden 256, 4 layers, 16 experts of 128, top-4, vocab 4096.
    pub const ISSUE_3: SyntheticSpec = SyntheticSpec {
        vocab: 4096,
        hidden: 256,
        layers: 4,
        heads: 4,
        experts: 16,
        top_k: 4,
        intermediate: 128,
    };
}

/// A randomly initialised OLMoE-style model (weights N(0, 0.02²) as transformers'
/// `initializer_range`, norms 1) with `spec`'s sizes.
pub fn synthetic_olmoe(spec: &SyntheticSpec, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (h, v, i) = (spec.hidden, spec.vocab, spec.intermediate);
    let head_dim = h / spec.heads;
    let config = ModelConfig {
        family: Family::Olmoe,
        vocab_size: v,
        hidden_size: h,
        num_layers: spec.layers,
        num_heads: spec.heads,
        num_kv_heads: spec.heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            dim: head_dim,
            interleaved: false,
            scaling: RopeScaling::None,
        },
        attention: AttentionConfig::Standard {
            qk_norm: QkNorm::Full,
            qkv_bias: false,
            o_bias: false,
            clip_qkv: None,
        },
        num_experts: spec.experts,
        top_k: spec.top_k,
        moe_intermediate_size: i,
        dense_intermediate_size: 0,
        shared_intermediate_size: 0,
        shared_expert_gated: false,
        moe_layers: vec![true; spec.layers],
        router: RouterRule {
            top_k: spec.top_k,
            renormalize: false,
            scaling: 1.0,
            group_limit: None,
        },
        tie_word_embeddings: false,
        sliding_window: None,
    };
    let mut m = |r, c| random_matrix(&mut rng, r, c, 0.02);
    let norm = |n| RmsNorm {
        weight: Array1::ones(n),
        eps: 1e-5,
    };
    let lin = |w| Linear {
        weight: w,
        bias: None,
    };
    let layers = (0..spec.layers)
        .map(|_| DecoderLayer {
            input_norm: norm(h),
            attention: Attention::Standard(StandardAttention {
                q: lin(m(h, h)),
                k: lin(m(h, h)),
                v: lin(m(h, h)),
                o: lin(m(h, h)),
                qk_norm: Some((QkNorm::Full, norm(h), norm(h))),
                clip_qkv: None,
                heads: spec.heads,
                kv_heads: spec.heads,
                head_dim,
            }),
            post_attention_norm: norm(h),
            ffn: Ffn::Moe(MoeBlock {
                router: m(spec.experts, h),
                experts: (0..spec.experts)
                    .map(|_| SwiGlu {
                        gate_up: m(2 * i, h),
                        down: m(h, i),
                    })
                    .collect(),
                shared: None,
            }),
        })
        .collect();
    Model {
        config,
        tokenizer: None,
        embed_tokens: m(v, h),
        layers,
        final_norm: norm(h),
        lm_head: Some(m(v, h)),
    }
}

/// Results of [`analog_bench`]; `Display` renders a markdown table.
#[derive(Debug, Clone, Serialize)]
pub struct AnalogBench {
    pub model: String,
    pub preset: String,
    pub threads: usize,
    /// Tokens per forward (all windows of one measurement).
    pub tokens: usize,
    pub seq_len: usize,
    pub reps: usize,
    /// Median seconds of the digital forward over the tokens.
    pub digital_s: f64,
    /// Median seconds of the analog forward (programmed, drifted to 1 day, GDC) over the same tokens.
    pub analog_s: f64,
    /// Median of per-repetition analog / digital ratios (issue 4 target ≤ 1.5).
    pub ratio: f64,
    /// Seconds to program every mapped matrix (once per seed).
    pub program_s: f64,
    /// Median seconds of `drift_to` (read noise + GDC readout; once per drift time and seed).
    pub drift_s: f64,
}

impl std::fmt::Display for AnalogBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model: {}, preset {}, {} tokens in windows of {}, {} threads, median of {}\n",
            self.model, self.preset, self.tokens, self.seq_len, self.threads, self.reps
        )?;
        writeln!(f, "| measurement | seconds | tokens/s |\n|---|---|---|")?;
        let tps = |s: f64| self.tokens as f64 / s;
        writeln!(
            f,
            "| digital forward | {:.3} | {:.0} |",
            self.digital_s,
            tps(self.digital_s)
        )?;
        writeln!(
            f,
            "| analog forward (t = 1 d, GDC) | {:.3} | {:.0} |",
            self.analog_s,
            tps(self.analog_s)
        )?;
        writeln!(
            f,
            "| program all analog matrices (per seed) | {:.3} | |",
            self.program_s
        )?;
        writeln!(
            f,
            "| drift to t + GDC readout (per time and seed) | {:.3} | |",
            self.drift_s
        )?;
        writeln!(
            f,
            "| **analog / digital forward (median of per-rep ratios)** | **{:.2}×** | |",
            self.ratio
        )
    }
}

/// Times the analog forward of `model` mapped with `mapping` on `preset` against the digital forward on the same
/// `tokens`, interleaved within each repetition so load changes hit both alike.
pub fn analog_bench(
    model: &Model,
    description: &str,
    mapping: &crate::mapping::Mapping,
    preset: &crate::tile::TilePreset,
    tokens: &[u32],
    seq_len: usize,
    reps: usize,
) -> anyhow::Result<AnalogBench> {
    use rayon::prelude::*;
    let windows: Vec<&[u32]> = tokens.chunks(seq_len.max(1)).collect();
    let opts = ForwardOptions::default();
    let t = Instant::now();
    let mut experts = crate::backend::AnalogExperts::program(model, mapping, preset, 0)?;
    let program_s = t.elapsed().as_secs_f64();
    let digital = || -> anyhow::Result<()> {
        windows
            .par_iter()
            .try_for_each(|w| model.forward(w, &opts).map(|_| ()))
    };
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let s = Instant::now();
        experts.drift_to(86_400.0);
        let drift = s.elapsed().as_secs_f64();
        let s = Instant::now();
        digital()?;
        let d = s.elapsed().as_secs_f64();
        let s = Instant::now();
        windows.par_iter().enumerate().try_for_each(|(k, w)| {
            let call = experts.call(k as u32);
            let o = ForwardOptions {
                experts: Some(&call),
                ..opts
            };
            model.forward(w, &o).map(|_| ())
        })?;
        let a = s.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push([d, a, a / d, drift]);
        }
    }
    let median = |k: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(AnalogBench {
        model: description.to_owned(),
        preset: preset.name.clone(),
        threads: rayon::current_num_threads(),
        tokens: tokens.len(),
        seq_len,
        reps,
        digital_s: median(0),
        analog_s: median(1),
        ratio: median(2),
        program_s,
        drift_s: median(3),
    })
}

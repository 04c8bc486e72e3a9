//! Scores of analog forward passes on the device: the digital reference of an evaluation
//! uploaded once ([`GpuReference`]) and the per-position sums of each analog forward computed
//! where its logits are (kernel `token_metrics` of `kernels/model.cu`, which mirrors
//! [`crate::backend::score::compare`]), so that no logits cross the bus.
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use ndarray::ArrayView2;

use super::compile::MODEL_CU;
use super::{gib, CudaDevice, CudaError, CudaResult};
use crate::backend::score::ScoreSums;

/// The digital reference of an evaluation on the device: per sequence the log-probabilities
/// `[n, V]` of its scored positions, their argmax and the target tokens, the sequences one
/// after another.
pub struct GpuReference {
    /// `[Σn, V]` digital log-probabilities.
    logp: CudaSlice<f32>,
    /// `[Σn]` digital argmax.
    argmax: CudaSlice<u32>,
    /// `[Σn]` next tokens.
    targets: CudaSlice<u32>,
    /// First row of each sequence, and the total: `[seqs + 1]`.
    starts: Vec<usize>,
    vocab: usize,
}

impl GpuReference {
    /// Uploads `(log-probabilities [n, V], argmax [n], targets [n])` per sequence.
    pub fn upload(
        dev: &CudaDevice,
        seqs: &[(ArrayView2<'_, f32>, &[usize], &[u32])],
    ) -> CudaResult<Self> {
        let vocab = seqs.first().map_or(0, |s| s.0.ncols());
        let need: usize = seqs.iter().map(|s| s.0.len() * 4).sum();
        let (free, total) = dev.memory_bytes()?;
        if need.saturating_add(total / 8) > free {
            return Err(CudaError::Unsupported(format!(
                "device memory: the digital reference log-probabilities need {:.2} GiB, {:.2} GiB are free",
                gib(need),
                gib(free)
            )));
        }
        let mut starts = vec![0];
        let (mut logp, mut argmax, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (lp, am, tg) in seqs {
            if lp.dim() != (tg.len(), vocab) || am.len() != tg.len() {
                return Err(CudaError::Unsupported(format!(
                    "reference: {:?} log-probabilities, {} argmax and {} targets (vocabulary {vocab})",
                    lp.dim(),
                    am.len(),
                    tg.len()
                )));
            }
            logp.extend(lp.iter());
            argmax.extend(am.iter().map(|&a| a as u32));
            targets.extend_from_slice(tg);
            starts.push(targets.len());
        }
        Ok(Self {
            logp: dev.upload(&logp)?,
            argmax: dev.upload(&argmax)?,
            targets: dev.upload(&targets)?,
            starts,
            vocab,
        })
    }

    /// Metrics of sequence `k` for the device logits `[≥ n, V]` of its forward pass.
    pub fn compare(
        &self,
        dev: &CudaDevice,
        k: usize,
        logits: &CudaSlice<f32>,
    ) -> CudaResult<ScoreSums> {
        self.compare_sequences(dev, k..k + 1, logits)
    }

    /// Metrics of sequences `seqs` for the logits of their batched forward pass
    /// ([`GpuModel::forward_sequences`](super::model::GpuModel::forward_sequences): `n + 1` rows per sequence, the last scoring nothing;
    /// every sequence but the last as long as the first).
    pub fn compare_sequences(
        &self,
        dev: &CudaDevice,
        seqs: std::ops::Range<usize>,
        logits: &CudaSlice<f32>,
    ) -> CudaResult<ScoreSums> {
        let (a, b) = (self.starts[seqs.start], self.starts[seqs.end]);
        let n = b - a;
        if n == 0 {
            return Ok(ScoreSums::default());
        }
        let per_seq = (self.starts[seqs.start + 1] - a) as u32;
        let v = self.vocab;
        let rows = n + seqs.len();
        if logits.len() < (rows - 1) * v {
            return Err(CudaError::Unsupported(format!(
                "metrics: {} logits for {rows} rows of {v}",
                logits.len()
            )));
        }
        let mut out = dev.scratch::<f64>(3 * n)?;
        let f = dev.function(&MODEL_CU, &[], "token_metrics")?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let vocab = v as u32;
        let (logp, argmax, targets) = (
            self.logp.slice(a * v..b * v),
            self.argmax.slice(a..b),
            self.targets.slice(a..b),
        );
        dev.launch(&f, "token_metrics", cfg, |bld| {
            bld.arg(logits)
                .arg(&logp)
                .arg(&argmax)
                .arg(&targets)
                .arg(&vocab)
                .arg(&per_seq)
                .arg(&mut out);
        })?;
        let mut sums = ScoreSums {
            positions: n,
            ..Default::default()
        };
        for row in dev.download(&out)?.chunks_exact(3) {
            sums.nll += row[0];
            sums.kl += row[1];
            sums.agree += usize::from(row[2] > 0.5);
        }
        Ok(sums)
    }
}

//! Calibration for fine-tuning (docs/finetune.md §1): the digital model runs on calibration text
//! and every MoE layer's routed-expert input x (the post-attention-norm hidden state), its
//! routing (token, expert, weight) and the digital routed-expert output y are recorded.
//!
//! Also the default calibration text of the embedded model: an excerpt of its *training* split,
//! never its held-out split (the evaluation text and the shipped task are drawn from that).
use std::sync::Mutex;

use anyhow::{ensure, Result};
use ndarray::{concatenate, Array2, ArrayView2, Axis};

use super::noisy::LayerBatch;
use crate::model::moe::{dispatch, RoutedIo};
use crate::model::{
    Assignment, ExpertLinear, ExpertSlot, ForwardOptions, MatrixId, Model, RouterKind,
};

/// The embedded model's default calibration text: Genesis 1–24 without Genesis 20 (23 whole
/// chapters, 80,585 bytes), the first chapters of the training split (chapters whose 0-based
/// index in the King James Bible is not 19 mod 20), in the corpus format of the held-out
/// excerpt. Disjoint from `data/kjv-heldout.txt` and the task built from it.
pub const EMBEDDED_CALIB_TEXT: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv-calib.txt"));

/// How the embedded calibration text is named in `finetune.json`.
pub const EMBEDDED_CALIB_NAME: &str =
    "embedded training split excerpt data/kjv-calib.txt (Genesis 1-24 without Genesis 20, bytes 0..80585)";

/// Windows per digital forward while recording (bounds the logits' memory to 8 windows).
const WINDOWS_PER_PASS: usize = 8;

/// One MoE layer's recorded calibration data.
#[derive(Clone, Debug)]
pub struct LayerCalib {
    /// Decoder layer index.
    pub layer: usize,
    /// Routed-expert inputs `[T, hidden]` (post-norm hidden states), one row per token.
    pub x: Array2<f32>,
    /// Digital routed-expert output `[T, hidden]`: Σ over the token's experts of weight × expert(x).
    pub y: Array2<f32>,
    /// Routing in token order; `token` indexes the rows of `x`.
    pub assignments: Vec<Assignment>,
}

impl LayerCalib {
    /// The whole recording as one batch of the layer objective.
    pub fn batch(&self) -> LayerBatch<'_> {
        LayerBatch {
            layer: self.layer,
            x: self.x.view(),
            y: self.y.view(),
            assignments: &self.assignments,
        }
    }
}

/// A digital [`ExpertLinear`] that records the input and routing of every MoE layer.
struct Recorder<'m> {
    model: &'m Model,
    seen: Mutex<Vec<RoutedIo>>,
}

impl ExpertLinear for Recorder<'_> {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.model.linear(id, x)
    }

    fn gate_up(&self, layer: usize, slot: ExpertSlot, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.model.gate_up(layer, slot, x)
    }

    fn routed_experts(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        n_experts: usize,
    ) -> Result<Option<Array2<f32>>> {
        // The model's own digital path (what it runs for `None`), computed once here for the
        // forward and the recorded target alike (it was computed again over the whole
        // recording before: the same bits, since each output row depends on its own input row
        // only, checked on the embedded model's default calibration, and one routed-expert
        // pass less).
        let y = dispatch(layer, x, assignments, n_experts, self.model);
        self.seen.lock().expect("recorder lock").push(RoutedIo {
            layer,
            x: x.to_owned(),
            assignments: assignments.to_vec(),
            y: y.clone(),
        });
        Ok(Some(y))
    }
}

/// Runs the digital model on the CPU over `tokens` in windows of `seq_len` and records every
/// MoE layer (layers in model order). Deterministic: windows are processed in order and each
/// layer's rows are concatenated in window order.
pub fn record(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    router: RouterKind,
) -> Result<Vec<LayerCalib>> {
    record_with(model, tokens, seq_len, WINDOWS_PER_PASS, |group| {
        let rec = Recorder {
            model,
            seen: Mutex::new(Vec::new()),
        };
        let opts = ForwardOptions {
            router,
            experts: Some(&rec),
            record_routing: false,
        };
        model.forward_batch(group, &opts)?;
        Ok(rec.seen.into_inner().expect("recorder lock"))
    })
}

/// The recording of [`record`] wherever the forward runs: `tokens` in windows of `seq_len`,
/// `per_pass` windows at a time handed to `pass`, which returns what each MoE layer saw in
/// that group (any layer order); each layer's rows are concatenated in window order and its
/// routing re-indexed to them.
pub fn record_with(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    per_pass: usize,
    mut pass: impl FnMut(&[&[u32]]) -> Result<Vec<RoutedIo>>,
) -> Result<Vec<LayerCalib>> {
    ensure!(seq_len >= 2, "calibration window must be at least 2 tokens");
    let windows: Vec<&[u32]> = tokens.chunks(seq_len).collect();
    let moe_layers: Vec<usize> = (0..model.config.num_layers)
        .filter(|&l| model.config.moe_layers[l])
        .collect();
    ensure!(
        !moe_layers.is_empty(),
        "the model has no MoE layer to fine-tune"
    );
    let mut parts: Vec<Vec<RoutedIo>> = std::iter::repeat_with(Vec::new)
        .take(moe_layers.len())
        .collect();
    for group in windows.chunks(per_pass.max(1)) {
        let rows: usize = group.iter().map(|w| w.len()).sum();
        for seen in pass(group)? {
            let Some(k) = moe_layers.iter().position(|&l| l == seen.layer) else {
                anyhow::bail!("calibration: layer {} is not a MoE layer", seen.layer);
            };
            ensure!(
                seen.x.nrows() == rows && seen.y.dim() == seen.x.dim(),
                "calibration: layer {} recorded {}×{} inputs and {}×{} outputs for {rows} tokens",
                seen.layer,
                seen.x.nrows(),
                seen.x.ncols(),
                seen.y.nrows(),
                seen.y.ncols()
            );
            parts[k].push(seen);
        }
    }
    moe_layers
        .iter()
        .zip(parts)
        .map(|(&layer, chunks)| {
            let mut offset = 0u32;
            let mut assignments = Vec::new();
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for seen in &chunks {
                assignments.extend(seen.assignments.iter().map(|a| Assignment {
                    token: a.token + offset,
                    ..*a
                }));
                offset += seen.x.nrows() as u32;
                xs.push(seen.x.view());
                ys.push(seen.y.view());
            }
            ensure!(!xs.is_empty(), "calibration: layer {layer} saw no tokens");
            let x = concatenate(Axis(0), &xs)?;
            let y = concatenate(Axis(0), &ys)?;
            Ok(LayerCalib {
                layer,
                x,
                y,
                assignments,
            })
        })
        .collect()
}

//! Fine-tuning's calibration recording on the GPU: the digital model's forward on the device
//! ([`GpuModel::record_sequences`]: cuBLAS f32, each MoE layer's routed experts uploaded for the
//! pass), every MoE layer's expert inputs, routing and digital routed-expert output copied back
//! and assembled as `finetune::calib::record` assembles the CPU's.
//!
//! The same function as the CPU recording, summed in another order (f32 GEMMs), so the rows
//! agree to f32 rounding through the layers before, and a token whose k-th and (k+1)-th router
//! scores are that close may route to another expert. One model's weights are on the device
//! at a time: the dense weights for the whole recording, one MoE layer's experts per product.
use anyhow::{Context, Result};

use super::super::model::GpuModel;
use super::super::CudaDevice;
use crate::finetune::calib::{record_with, LayerCalib};
use crate::model::{Model, RouterKind};

/// [`crate::finetune::calib::record`] with the forward on `dev`: `tokens` in windows of
/// `seq_len`, as many windows per pass as half the free device memory holds.
pub fn record(
    dev: &CudaDevice,
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    router: RouterKind,
) -> Result<Vec<LayerCalib>> {
    let mut gpu = GpuModel::upload(dev, model).context("calibration on the GPU")?;
    let per_pass = gpu.sequences_per_pass(dev, seq_len)?;
    record_with(model, tokens, seq_len, per_pass, |group| {
        let mut seen = Vec::new();
        gpu.record_sequences(dev, group, &router, &mut |s| {
            seen.push(s);
            Ok(())
        })?;
        Ok(seen)
    })
}

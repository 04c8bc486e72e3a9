//! The routed experts of a whole model on the GPU: one grouped analog layer
//! ([`GpuMoeLayer`]) per MoE layer, built from the crossbars the CPU backend programmed and
//! drifted ([`AnalogExperts`]), so both backends run the same conductances with the same
//! Philox streams.
//!
//! The model calls [`ExpertLinear::routed_experts`] once per MoE layer; the adapter uploads the
//! layer input and the (token, expert, weight) pairs, sorts them on the GPU and runs the fused
//! gate/up → SwiGLU → down kernels, then copies the weighted sum back. Everything else of the
//! forward pass (attention, router, norms, shared experts, dense MLPs) stays on the CPU path.
//!
//! A layer stays on the CPU (listed in [`GpuExperts::cpu_layers`] with the reason) when some of
//! its routed experts are digital (heterogeneous mappings), when its crossbar blocks do not
//! fit the kernel tiles (output columns a multiple of [`super::moe::TILE_COLS`], crossbar rows
//! a multiple of [`super::moe::TILE_K`]), or when the device memory left would not hold its
//! weights plus a reserve for the activations ([`memory_plan`]): a model larger than the GPU
//! runs its first layers there and the rest on the CPU instead of failing with out-of-memory.
use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayView2};

use super::error::DriverContext;
use super::moe::{route, GemmPeriphery, GpuGroupedMatrix, GpuMoeLayer, GroupedMatrix, Precision};
use super::{CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::{AnalogCall, AnalogExperts};
use crate::model::{Assignment, ExpertLinear, ExpertSlot, MatrixId, Proj};
use crate::tile::{AnalogMatrix, PeripherySpec};

/// Device memory kept free for the activations of the grouped layers (routing, DAC codes,
/// hidden rows, outputs) and the cuBLAS/NVRTC workspaces: the larger of 1 GiB and 1/16 of the
/// device.
pub fn activation_reserve_bytes(total: usize) -> usize {
    (1usize << 30).max(total / 16)
}

/// Device bytes a layer with grouped matrices of (resident, transient) bytes `gate_up` and
/// `down` needs while it uploads: both resident parts plus the larger transient f32 staging
/// copy (uploads run one matrix at a time).
pub fn layer_need_bytes(gate_up: (usize, usize), down: (usize, usize)) -> usize {
    gate_up.0 + down.0 + gate_up.1.max(down.1)
}

/// Whether a layer with grouped matrices of (resident, transient) device bytes `gate_up` and
/// `down` fits in `free` of `total` bytes, keeping [`activation_reserve_bytes`] free: the
/// resident bytes of both plus the larger transient f32 staging copy (uploads run one matrix
/// at a time). The error names both sizes.
pub fn memory_plan(
    gate_up: (usize, usize),
    down: (usize, usize),
    free: usize,
    total: usize,
) -> Result<(), String> {
    let need = layer_need_bytes(gate_up, down);
    let reserve = activation_reserve_bytes(total);
    if need.saturating_add(reserve) <= free {
        return Ok(());
    }
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    Err(format!(
        "device memory: the layer needs {:.2} GiB ({:.2} GiB resident) and {:.2} GiB stay reserved for \
         activations, {:.2} of {:.2} GiB are free",
        gib(need),
        gib(gate_up.0 + down.0),
        gib(reserve),
        gib(free),
        gib(total)
    ))
}

/// Every MoE layer whose routed experts are all analog, as grouped GPU layers.
pub struct GpuExperts<'a, 'm> {
    dev: &'a CudaDevice,
    cpu: &'a AnalogExperts<'m>,
    layers: BTreeMap<usize, GpuMoeLayer>,
    cpu_layers: Vec<(usize, String)>,
    /// One layer at a time on the device's single stream (the CPU side runs sequences in
    /// parallel; their GPU layers queue here).
    lock: Mutex<()>,
}

impl<'a, 'm> GpuExperts<'a, 'm> {
    /// Uploads the routed experts of every MoE layer of `cpu` (programmed and drifted) in the
    /// operand format of `precision`, with the kernel form of `periphery`.
    pub fn upload(
        dev: &'a CudaDevice,
        cpu: &'a AnalogExperts<'m>,
        periphery: &PeripherySpec,
        precision: Precision,
    ) -> CudaResult<Self> {
        let gemm = GemmPeriphery::from_spec(periphery)?;
        let cfg = &cpu.model().config;
        let mut layers = BTreeMap::new();
        let mut cpu_layers = Vec::new();
        // Free memory is read once and the resident bytes of each uploaded layer subtracted:
        // the driver's figure lags the stream-ordered frees and reuses of the memory pool.
        let (free_at_start, total) = dev.memory_bytes()?;
        let mut resident = 0usize;
        for l in (0..cfg.num_layers).filter(|&l| cfg.moe_layers[l]) {
            let proj = |proj| -> Option<Vec<&AnalogMatrix>> {
                (0..cfg.num_experts)
                    .map(|e| {
                        cpu.matrix(MatrixId {
                            layer: l,
                            slot: ExpertSlot::Routed(e),
                            proj,
                        })
                    })
                    .collect()
            };
            let (Some(gate), Some(up), Some(down)) =
                (proj(Proj::Gate), proj(Proj::Up), proj(Proj::Down))
            else {
                cpu_layers.push((l, "some of its routed experts are digital".to_string()));
                continue;
            };
            let built = (|| -> CudaResult<GpuMoeLayer> {
                let gate_up = GroupedMatrix::interleave_swiglu(
                    &GroupedMatrix::from_analog(&gate)?,
                    &GroupedMatrix::from_analog(&up)?,
                )?;
                let down = GroupedMatrix::from_analog(&down)?;
                let (gu_bytes, down_bytes) = (
                    GpuGroupedMatrix::device_bytes(&gate_up, precision),
                    GpuGroupedMatrix::device_bytes(&down, precision),
                );
                memory_plan(
                    gu_bytes,
                    down_bytes,
                    free_at_start.saturating_sub(resident),
                    total,
                )
                .map_err(CudaError::Unsupported)?;
                resident += gu_bytes.0 + down_bytes.0;
                Ok(GpuMoeLayer {
                    gate_up: GpuGroupedMatrix::upload(dev, &gate_up, precision)?,
                    down: GpuGroupedMatrix::upload(dev, &down, precision)?,
                    periphery: Some(gemm),
                    seed: cpu.seed(),
                })
            })();
            match built {
                Ok(layer) => {
                    layers.insert(l, layer);
                }
                Err(CudaError::Unsupported(why)) => cpu_layers.push((l, why)),
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            dev,
            cpu,
            layers,
            cpu_layers,
            lock: Mutex::new(()),
        })
    }

    /// MoE layers whose routed experts run on the GPU.
    pub fn gpu_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.keys().copied()
    }

    /// MoE layers left on the CPU, with the reason.
    pub fn cpu_layers(&self) -> &[(usize, String)] {
        &self.cpu_layers
    }

    /// A view that runs MVMs with the per-MVM noise of call `mvm_id` (the id
    /// [`AnalogExperts::call`] takes, so both backends draw the same output noise).
    pub fn call(&self, mvm_id: u32) -> GpuCall<'_, 'a, 'm> {
        GpuCall {
            experts: self,
            cpu: self.cpu.call(mvm_id),
            mvm_id,
        }
    }

    /// The CPU backend these layers were built from (programmed and drifted crossbars, and the
    /// digital weights of every matrix that is not analog).
    pub fn cpu(&self) -> &'a AnalogExperts<'m> {
        self.cpu
    }

    /// The device the layers live on.
    pub fn device(&self) -> &'a CudaDevice {
        self.dev
    }

    /// The routed experts of MoE layer `layer` applied to the device rows `x` (`[n_tokens, d]`):
    /// `Σ w · expert_e(x[t])` over `assignments`, or `None` when the layer stays on the CPU or
    /// the routing does not give every token the same number of experts.
    pub fn routed_on_device(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        assignments: &[Assignment],
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<Option<CudaSlice<f32>>> {
        let Some(gpu_layer) = self.layers.get(&layer) else {
            return Ok(None);
        };
        let Some(k) = uniform_top_k(assignments, n_tokens, n_experts) else {
            return Ok(None);
        };
        self.run_device(gpu_layer, x, n_tokens, assignments, k, n_experts, mvm_id)
            .map(Some)
    }

    /// One grouped layer on device rows: sort the pairs by expert, gate/up → SwiGLU → down.
    #[allow(clippy::too_many_arguments)]
    fn run_device(
        &self,
        layer: &GpuMoeLayer,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        assignments: &[Assignment],
        top_k: usize,
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<CudaSlice<f32>> {
        let dev = self.dev;
        let experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
        let weights: Vec<f32> = assignments.iter().map(|a| a.weight).collect();
        let routing = route(
            dev,
            &dev.upload(&experts)?,
            &dev.upload(&weights)?,
            n_tokens,
            top_k,
            n_experts,
        )?;
        layer.forward(dev, x, &routing, mvm_id)
    }

    /// One grouped layer from host rows: upload, [`GpuExperts::run_device`], copy back.
    fn run(
        &self,
        layer: &GpuMoeLayer,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        top_k: usize,
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<Array2<f32>> {
        let _queue = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let dev = self.dev;
        dev.context()
            .bind_to_thread()
            .while_(|| "binding the CUDA context to a worker thread".into())?;
        let (t, d) = x.dim();
        let x = x.as_standard_layout();
        let x_dev = dev.upload(x.as_slice().expect("standard layout"))?;
        let y = self.run_device(layer, &x_dev, t, assignments, top_k, n_experts, mvm_id)?;
        let host = dev.download(&y)?;
        Ok(Array2::from_shape_vec((t, d), host).expect("kernel output is [T, d]"))
    }
}

/// [`GpuExperts`] bound to one MVM call id; implements the model's [`ExpertLinear`].
pub struct GpuCall<'g, 'a, 'm> {
    experts: &'g GpuExperts<'a, 'm>,
    cpu: AnalogCall<'a, 'm>,
    mvm_id: u32,
}

/// `Some(k)` when `assignments` are exactly `k` per token in token order (what the GPU sort
/// takes: pair `p` belongs to token `p / k`), with every expert index below `n_experts`.
fn uniform_top_k(assignments: &[Assignment], n_tokens: usize, n_experts: usize) -> Option<usize> {
    if n_tokens == 0 || assignments.is_empty() || !assignments.len().is_multiple_of(n_tokens) {
        return None;
    }
    let k = assignments.len() / n_tokens;
    assignments
        .iter()
        .enumerate()
        .all(|(p, a)| a.token as usize == p / k && (a.expert as usize) < n_experts)
        .then_some(k)
}

impl ExpertLinear for GpuCall<'_, '_, '_> {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.cpu.linear(id, x)
    }

    fn routed_experts(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        n_experts: usize,
    ) -> Result<Option<Array2<f32>>> {
        let Some(gpu_layer) = self.experts.layers.get(&layer) else {
            return Ok(None);
        };
        // Routers with a variable number of experts per token (relu, adaptive) take the
        // per-expert CPU path.
        let Some(k) = uniform_top_k(assignments, x.nrows(), n_experts) else {
            return Ok(None);
        };
        self.experts
            .run(gpu_layer, x, assignments, k, n_experts, self.mvm_id)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("MoE layer {layer} on the GPU: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(token: u32, expert: u32) -> Assignment {
        Assignment {
            token,
            expert,
            weight: 0.5,
        }
    }

    #[test]
    fn uniform_top_k_accepts_only_token_major_fixed_k() {
        assert_eq!(
            uniform_top_k(&[a(0, 1), a(0, 2), a(1, 0), a(1, 3)], 2, 4),
            Some(2)
        );
        // A token with 3 experts and one with 1 (adaptive routing).
        assert_eq!(
            uniform_top_k(&[a(0, 1), a(0, 2), a(0, 0), a(1, 3)], 2, 4),
            None
        );
        // Out of token order.
        assert_eq!(
            uniform_top_k(&[a(1, 1), a(1, 2), a(0, 0), a(0, 3)], 2, 4),
            None
        );
        // Expert index out of range.
        assert_eq!(uniform_top_k(&[a(0, 4), a(1, 0)], 2, 4), None);
        assert_eq!(uniform_top_k(&[], 2, 4), None);
        assert_eq!(uniform_top_k(&[a(0, 0)], 0, 4), None);
    }

    const GIB: usize = 1 << 30;

    #[test]
    fn device_bytes_count_operands_tables_and_the_f32_staging_copy() {
        let (e, n, k, k_block) = (2, 256, 1024, 512);
        let m = GroupedMatrix {
            n_experts: e,
            n_cols: n,
            k,
            k_block,
            weights: Vec::new(),
            col_tensor_id: vec![0; e * 2 * n],
            col_scale: vec![0.0; e * 2 * n],
            col_local: vec![0; n],
            col_block_cols: vec![0; n],
            col_xbar: vec![0; n],
            n_xbar: 1,
        };
        let elems = e * n * k;
        // Tables: [E, KB, N] u32 ids + f32 scales; [N] three u32 arrays.
        let tables = 8 * e * 2 * n + 12 * n;
        assert_eq!(
            GpuGroupedMatrix::device_bytes(&m, Precision::AnalogSplitF16),
            (4 * elems + tables, 4 * elems)
        );
        assert_eq!(
            GpuGroupedMatrix::device_bytes(&m, Precision::DigitalBf16),
            (2 * elems + tables, 4 * elems)
        );
    }

    #[test]
    fn memory_plan_keeps_the_activation_reserve_and_names_the_sizes() {
        let total = 80 * GIB;
        let reserve = activation_reserve_bytes(total);
        assert_eq!(reserve, 5 * GIB);
        assert_eq!(activation_reserve_bytes(8 * GIB), GIB);
        let (gate_up, down) = ((2 * GIB, 3 * GIB), (GIB, GIB + GIB / 2));
        // Resident 3 GiB plus the larger staging copy (3 GiB), plus the reserve.
        let need = 6 * GIB + reserve;
        assert_eq!(memory_plan(gate_up, down, need, total), Ok(()));
        let err = memory_plan(gate_up, down, need - 1, total).unwrap_err();
        assert!(
            err.contains("needs 6.00 GiB (3.00 GiB resident)")
                && err.contains("5.00 GiB stay reserved")
                && err.contains("of 80.00 GiB are free"),
            "{err}"
        );
        // Sizes near usize::MAX do not wrap into a false fit.
        assert!(memory_plan((usize::MAX / 2, 0), (usize::MAX / 2, 0), total, total).is_err());
    }
}

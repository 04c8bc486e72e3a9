//! Routing on the GPU: the (token, expert, weight) pairs of a layer sorted by expert with a
//! stable counting sort ([`route`]: kernels `moe_count` → `moe_scan` → `moe_scatter` of
//! `kernels/routing.cu`), and the per-MVM noise keys of sequences routed together
//! (`moe_noise_keys`). Pairs keep their (token, slot) order inside an expert, the order
//! `model::moe::dispatch` gathers tokens in on the CPU.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::gemm::allow_dynamic_shared;
use super::gemm::tile::{MAX_SHARED_BYTES, TILE_ROWS};
use crate::backend::cuda::compile::{MODEL_CU, MOE_CU};
use crate::backend::cuda::{linear_launch, CudaDevice, CudaError, CudaResult};

/// Token→expert pairs sorted by expert on the device (stable: token order inside an expert).
pub struct GpuRouting {
    /// Tokens T.
    pub n_tokens: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Experts E.
    pub n_experts: usize,
    /// `[E + 1]` start of each expert's rows in sorted order.
    pub offsets: CudaSlice<u32>,
    /// `[E + 1]` start of each expert's CTA row tiles.
    pub tile_offsets: CudaSlice<u32>,
    /// `[T·k]` token of each sorted pair.
    pub sorted_token: CudaSlice<u32>,
    /// `[T·k]` router weight of each sorted pair.
    pub sorted_weight: CudaSlice<f32>,
    /// `[T·k]` original pair index (token·k + slot) of each sorted pair.
    pub sorted_pair: CudaSlice<u32>,
    /// `[T·k]` (noise row, call) of each sorted pair when the tokens are several sequences
    /// run together ([`GpuRouting::key_sequences`]); `None`: row inside the expert, the GEMM's
    /// `mvm_id`.
    pub noise_key: Option<CudaSlice<u32>>,
}

impl GpuRouting {
    /// `[T·k]` the sorted row of each (token, slot) pair, the inverse of `sorted_pair`
    /// (`invert_pairs` in kernels/model.cu): where the combines find a token's expert outputs.
    pub fn pos_of_pair(&self, dev: &CudaDevice) -> CudaResult<CudaSlice<u32>> {
        let pairs = self.n_tokens * self.top_k;
        let p32 = pairs as u32;
        let mut pos = dev.scratch::<u32>(pairs)?;
        let f = dev.function(&MODEL_CU, &[], "invert_pairs")?;
        dev.launch(&f, "invert_pairs", linear_launch(pairs as u64), |b| {
            b.arg(&self.sorted_pair).arg(&mut pos).arg(&p32);
        })?;
        Ok(pos)
    }

    /// (expert, first sorted row, rows) of every expert that has rows, in expert order: the
    /// per-expert GEMMs' row ranges (the offsets copied to the host).
    pub fn expert_rows(&self, dev: &CudaDevice) -> CudaResult<Vec<(usize, usize, usize)>> {
        let offsets = dev.download(&self.offsets)?;
        Ok((0..self.n_experts)
            .map(|e| {
                let r0 = offsets[e] as usize;
                (e, r0, offsets[e + 1] as usize - r0)
            })
            .filter(|&(_, _, rows)| rows > 0)
            .collect())
    }

    /// Keys the per-MVM noise of the tokens as consecutive sequences of `window` tokens (the
    /// last may be shorter), sequence q being call `first_call + q`: each draws the noise it
    /// draws when routed alone (`AnalogExperts::call(first_call + q)` on the CPU).
    pub fn key_sequences(
        &mut self,
        dev: &CudaDevice,
        window: usize,
        first_call: u32,
    ) -> CudaResult<()> {
        let pairs = self.n_tokens * self.top_k;
        if window == 0 {
            return Err(CudaError::Unsupported(
                "noise keys: sequences of 0 tokens".into(),
            ));
        }
        if window >= self.n_tokens || pairs == 0 {
            self.noise_key = None;
            return Ok(());
        }
        let mut key = dev.scratch::<u32>(2 * pairs)?;
        let f = dev.function(&MOE_CU, &[], "moe_noise_keys")?;
        let (e32, p32, w32) = (self.n_experts as u32, pairs as u32, window as u32);
        dev.launch(&f, "moe_noise_keys", linear_launch(pairs as u64), |b| {
            b.arg(&self.sorted_token)
                .arg(&self.offsets)
                .arg(&e32)
                .arg(&p32)
                .arg(&w32)
                .arg(&first_call)
                .arg(&mut key);
        })?;
        self.noise_key = Some(key);
        Ok(())
    }
}

/// Pairs per slice of the routing sort: one block per slice counts them, one places them.
const ROUTE_SLICE_PAIRS: usize = 1024;

/// Counting sort of the `[T·k]` pairs (expert of pair, weight of pair) by expert:
/// histogram → scan → stable scatter, all on the device.
pub fn route(
    dev: &CudaDevice,
    expert_of_pair: &CudaSlice<u32>,
    weight_of_pair: &CudaSlice<f32>,
    n_tokens: usize,
    top_k: usize,
    n_experts: usize,
) -> CudaResult<GpuRouting> {
    let pairs = n_tokens * top_k;
    if expert_of_pair.len() != pairs || weight_of_pair.len() != pairs || n_experts == 0 {
        return Err(CudaError::Unsupported(format!(
            "routing: {} experts-of-pair and {} weights for T={n_tokens}, k={top_k}, E={n_experts}",
            expert_of_pair.len(),
            weight_of_pair.len()
        )));
    }
    let slices = pairs.div_ceil(ROUTE_SLICE_PAIRS).max(1);
    let mut counts = dev.scratch::<u32>(n_experts * slices)?;
    let mut slice_offsets = dev.scratch::<u32>(n_experts * slices)?;
    let mut offsets = dev.scratch::<u32>(n_experts + 1)?;
    let mut tile_offsets = dev.scratch::<u32>(n_experts + 1)?;
    let mut sorted_token = dev.scratch::<u32>(pairs)?;
    let mut sorted_weight = dev.scratch::<f32>(pairs)?;
    let mut sorted_pair = dev.scratch::<u32>(pairs)?;
    // moe_count's histogram; moe_scatter's [warps][E] table, two per-expert arrays (and a total)
    // and three per-pair ones, with as many ranking warps (8 at most) as leave that within the
    // shared memory.
    let count_shared = (4 * n_experts) as u32;
    let scatter_words =
        |warps: usize| warps * n_experts + 2 * n_experts + 1 + 3 * ROUTE_SLICE_PAIRS;
    let scatter_bytes = |warps: usize| 4 * scatter_words(warps);
    let Some(scatter_warps) = [8, 4, 2, 1]
        .into_iter()
        .find(|&w| scatter_bytes(w) <= MAX_SHARED_BYTES)
    else {
        return Err(CudaError::Unsupported(format!(
            "routing {n_experts} experts: moe_scatter needs {} B of shared memory, at most \
             {MAX_SHARED_BYTES}",
            scatter_bytes(1)
        )));
    };
    let scatter_shared = scatter_bytes(scatter_warps) as u32;
    let per_slice = |threads: usize, shared| LaunchConfig {
        grid_dim: (slices as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: shared,
    };
    let (p32, e32, k32, tile32, s32, slice32) = (
        pairs as u32,
        n_experts as u32,
        top_k as u32,
        TILE_ROWS as u32,
        slices as u32,
        ROUTE_SLICE_PAIRS as u32,
    );
    let f = dev.function(&MOE_CU, &[], "moe_count")?;
    allow_dynamic_shared(&f, "moe_count", 256, count_shared)?;
    dev.launch(&f, "moe_count", per_slice(256, count_shared), |b| {
        b.arg(expert_of_pair)
            .arg(&p32)
            .arg(&e32)
            .arg(&slice32)
            .arg(&mut counts);
    })?;
    let f = dev.function(&MOE_CU, &[], "moe_scan")?;
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1), // MOE_SCAN_THREADS
        shared_mem_bytes: 0,
    };
    dev.launch(&f, "moe_scan", one, |b| {
        b.arg(&counts)
            .arg(&e32)
            .arg(&s32)
            .arg(&tile32)
            .arg(&mut offsets)
            .arg(&mut tile_offsets)
            .arg(&mut slice_offsets);
    })?;
    let f = dev.function(&MOE_CU, &[], "moe_scatter")?;
    let threads = 32 * scatter_warps;
    allow_dynamic_shared(&f, "moe_scatter", threads as u32, scatter_shared)?;
    dev.launch(&f, "moe_scatter", per_slice(threads, scatter_shared), |b| {
        b.arg(expert_of_pair)
            .arg(weight_of_pair)
            .arg(&p32)
            .arg(&e32)
            .arg(&slice32)
            .arg(&k32)
            .arg(&slice_offsets)
            .arg(&mut sorted_token)
            .arg(&mut sorted_weight)
            .arg(&mut sorted_pair);
    })?;
    Ok(GpuRouting {
        n_tokens,
        top_k,
        n_experts,
        offsets,
        tile_offsets,
        sorted_token,
        sorted_weight,
        sorted_pair,
        noise_key: None,
    })
}

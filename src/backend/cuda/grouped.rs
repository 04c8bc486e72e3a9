//! Grouped matrices: the E expert matrices of one kind (gate/up interleaved for the SwiGLU
//! epilogue, or down) in kernel layout, on the host ([`GroupedMatrix`]: normalised crossbar
//! weights, per-column tensor ids and digital scales) and on the device ([`GpuGroupedMatrix`]:
//! the operands in the format of a [`Precision`], the column tables shared with the programming
//! and drift kernels), with the bf16 conversion of digital operands (kernel `to_bf16`).
use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::gemm::tile::{
    analog_wgmma_off, analog_wgmma_tile, WgmmaTile, TILE_COLS, TILE_K, WGMMA_TILE_K,
};
use super::gemm::variant::Precision;
use crate::backend::cuda::compile::MOE_CU;
use crate::backend::cuda::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::tile::{AnalogMatrix, Crossbar};

/// E expert matrices of one kind in kernel layout, on the host: normalised crossbar weights
/// `[E, N, K]` plus per-(expert, K block, column) tensor id and digital scale s_map·α_GDC.
#[derive(Clone, Debug)]
pub struct GroupedMatrix {
    /// Experts E.
    pub n_experts: usize,
    /// Output columns N.
    pub n_cols: usize,
    /// Inputs K.
    pub k: usize,
    /// Crossbar rows per block along K (all blocks equal).
    pub k_block: usize,
    /// W̃ per crossbar, assembled to `[E, N, K]` (normalised units).
    pub weights: Vec<f32>,
    /// `[E, K/k_block, N]`: tensor id of the crossbar holding each (column, K block).
    pub col_tensor_id: Vec<u32>,
    /// `[E, K/k_block, N]`: s_map · α_GDC of each (column, K block).
    pub col_scale: Vec<f32>,
    /// `[N]`: column index inside its crossbar.
    pub col_local: Vec<u32>,
    /// `[N]`: columns of its crossbar (the stride of output-noise indices).
    pub col_block_cols: Vec<u32>,
    /// `[N]`: which crossbar column block (0..`n_xbar`) holds the column, the unit of
    /// iterative bound management (a saturated output re-runs its whole crossbar row).
    pub col_xbar: Vec<u32>,
    /// Crossbar column blocks across N.
    pub n_xbar: usize,
}

impl GroupedMatrix {
    /// Every 4 consecutive columns (from column 0) lie in one crossbar, starting at a crossbar
    /// column that is a multiple of 4, in a crossbar whose width is a multiple of 4. The output
    /// noise of 4 such columns of one row is then one Philox block (`rng::Stream::block`),
    /// which `moe_gemm` (`MOE_NOISE_QUADS`) draws once for two lanes.
    pub fn noise_quads(&self) -> bool {
        self.n_cols.is_multiple_of(4)
            && (0..self.n_cols).step_by(4).all(|c| {
                self.col_local[c].is_multiple_of(4)
                    && self.col_block_cols[c].is_multiple_of(4)
                    && (1..4).all(|i| {
                        self.col_xbar[c + i] == self.col_xbar[c]
                            && self.col_local[c + i] == self.col_local[c] + i as u32
                    })
            })
    }

    /// Kernel layout of one programmed (and drifted) [`AnalogMatrix`] per expert.
    pub fn from_analog(experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        Self::from_blocks(experts, |b| b.weights())
    }

    /// The layout of [`GroupedMatrix::from_analog`] with `weights` taken from `select` of each
    /// crossbar (`[n_out, n_in]` of the block: programmed weights, drift exponents, …).
    pub fn from_blocks<'x>(
        experts: &[&'x AnalogMatrix],
        select: impl Fn(&'x Crossbar) -> ndarray::ArrayView2<'x, f32>,
    ) -> CudaResult<Self> {
        Self::grouped(experts, Some(&select))
    }

    /// The column tables of [`GroupedMatrix::from_blocks`] with no weights (`weights` empty):
    /// for a backend that computes the weights on the device (GPU programming).
    pub fn tables(experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        Self::grouped(experts, None)
    }

    /// [`GroupedMatrix::from_blocks`], copying the weights when `select` is given.
    #[allow(clippy::type_complexity)]
    fn grouped<'x>(
        experts: &[&'x AnalogMatrix],
        select: Option<&dyn Fn(&'x Crossbar) -> ndarray::ArrayView2<'x, f32>>,
    ) -> CudaResult<Self> {
        let first = experts
            .first()
            .ok_or_else(|| CudaError::Unsupported("grouped matrix: no experts".into()))?;
        let (n, k) = (first.n_out(), first.n_in());
        let k_block = first.in_ranges()[0].len();
        if first.in_ranges().iter().any(|r| r.len() != k_block) || k_block % TILE_K != 0 {
            return Err(CudaError::Unsupported(format!(
                "tensor {}: the CUDA kernels need equal crossbar blocks along K that are multiples of {TILE_K} rows; \
                 got K = {k} split into {:?}",
                first.tensor_id(),
                first.in_ranges().iter().map(|r| r.len()).collect::<Vec<_>>()
            )));
        }
        let n_kb = k / k_block;
        let e_count = experts.len();
        let mut m = Self {
            n_experts: e_count,
            n_cols: n,
            k,
            k_block,
            weights: if select.is_some() {
                vec![0.0; e_count * n * k]
            } else {
                Vec::new()
            },
            col_tensor_id: vec![0; e_count * n_kb * n],
            col_scale: vec![0.0; e_count * n_kb * n],
            col_local: vec![0; n],
            col_block_cols: vec![0; n],
            col_xbar: vec![0; n],
            n_xbar: first.out_ranges().len(),
        };
        for (xb, r) in first.out_ranges().iter().enumerate() {
            for c in r.clone() {
                m.col_local[c] = (c - r.start) as u32;
                m.col_block_cols[c] = r.len() as u32;
                m.col_xbar[c] = xb as u32;
            }
        }
        for (e, mat) in experts.iter().enumerate() {
            if (mat.n_out(), mat.n_in()) != (n, k) || mat.in_ranges() != first.in_ranges() {
                return Err(CudaError::Unsupported(format!(
                    "tensor {}: expert {e} has shape {}×{}, expert 0 {n}×{k}",
                    mat.tensor_id(),
                    mat.n_out(),
                    mat.n_in()
                )));
            }
            for (g, block) in mat.geometry().iter().zip(mat.blocks()) {
                let w = select.map(|f| f(block));
                let alpha = block.gdc_alpha();
                for (lc, c) in g.out_range.clone().enumerate() {
                    if let Some(w) = &w {
                        let row = &mut m.weights[(e * n + c) * k..][g.in_range.clone()];
                        for (dst, src) in row.iter_mut().zip(w.row(lc)) {
                            *dst = *src;
                        }
                    }
                    let t = (e * n_kb + g.in_block) * n + c;
                    m.col_tensor_id[t] = g.tensor_id;
                    let a = if alpha.len() == 1 {
                        alpha[0]
                    } else {
                        alpha[lc]
                    };
                    m.col_scale[t] = block.map_scale()[lc] * a;
                }
            }
        }
        Ok(m)
    }

    /// Gate and up matrices interleaved column-wise in groups of 8 (gate 0..8, up 0..8, gate
    /// 8..16, ...), the layout the SwiGLU epilogue reads.
    pub fn interleave_swiglu(gate: &Self, up: &Self) -> CudaResult<Self> {
        let n = gate.n_cols;
        if (up.n_experts, up.n_cols, up.k, up.k_block) != (gate.n_experts, n, gate.k, gate.k_block)
            || !n.is_multiple_of(8)
        {
            return Err(CudaError::Unsupported(format!(
                "SwiGLU: gate {}×{} and up {}×{} must have equal shapes with N a multiple of 8",
                n, gate.k, up.n_cols, up.k
            )));
        }
        let (e_count, k, n_kb) = (gate.n_experts, gate.k, gate.k / gate.k_block);
        let nf = 2 * n;
        let mut m = Self {
            n_experts: e_count,
            n_cols: nf,
            k,
            k_block: gate.k_block,
            weights: interleave_rows(&gate.weights, &up.weights, e_count, n, k),
            col_tensor_id: interleave_rows(
                &gate.col_tensor_id,
                &up.col_tensor_id,
                e_count * n_kb,
                n,
                1,
            ),
            col_scale: interleave_rows(&gate.col_scale, &up.col_scale, e_count * n_kb, n, 1),
            col_local: vec![0; nf],
            col_block_cols: vec![0; nf],
            col_xbar: vec![0; nf],
            n_xbar: gate.n_xbar + up.n_xbar,
        };
        for f in 0..nf {
            // Up crossbars are numbered after the gate ones.
            let (is_up, c) = swiglu_source(f);
            let (s, xbar0) = if is_up {
                (up, gate.n_xbar as u32)
            } else {
                (gate, 0)
            };
            m.col_local[f] = s.col_local[c];
            m.col_block_cols[f] = s.col_block_cols[c];
            m.col_xbar[f] = s.col_xbar[c] + xbar0;
        }
        Ok(m)
    }
}

/// Interleaved gate/up column `f` → (from the up matrix, its column there): groups of 8.
pub(crate) fn swiglu_source(f: usize) -> (bool, usize) {
    let g8 = f / 8;
    (g8 % 2 == 1, (g8 / 2) * 8 + f % 8)
}

/// The inverse of [`swiglu_source`]: the interleaved row of gate (`is_up` false) or up row `c`.
pub(crate) fn swiglu_row(is_up: bool, c: usize) -> usize {
    (c / 8) * 16 + usize::from(is_up) * 8 + c % 8
}

/// `[G, N, row]` gate and up arrays → `[G, 2N, row]` with the columns interleaved as
/// [`GroupedMatrix::interleave_swiglu`] does (N a multiple of 8). Empty inputs stay empty.
pub fn interleave_rows<T: Copy>(
    gate: &[T],
    up: &[T],
    groups: usize,
    n: usize,
    row: usize,
) -> Vec<T> {
    if gate.is_empty() {
        return Vec::new();
    }
    let nf = 2 * n;
    let mut out = Vec::with_capacity(groups * nf * row);
    for g in 0..groups {
        for f in 0..nf {
            let (is_up, c) = swiglu_source(f);
            let src = if is_up { up } else { gate };
            out.extend_from_slice(&src[(g * n + c) * row..][..row]);
        }
    }
    out
}

/// The seed-independent column tables of a [`GroupedMatrix`] on the device, shared by the
/// operand sets built from them ([`GpuGroupedMatrix::from_device_parts`]) and by the
/// programming and drift kernels.
#[derive(Clone)]
pub struct GpuColumnTables {
    /// `[E, KB, N]` tensor id of the crossbar holding (column, K block).
    pub col_tensor_id: Arc<CudaSlice<u32>>,
    /// `[N]` column inside its crossbar.
    pub col_local: Arc<CudaSlice<u32>>,
    /// `[N]` columns of its crossbar.
    pub col_block_cols: Arc<CudaSlice<u32>>,
    /// `[N]` crossbar column block.
    pub col_xbar: Arc<CudaSlice<u32>>,
}

impl GpuColumnTables {
    /// Uploads the tables of `m`.
    pub fn upload(dev: &CudaDevice, m: &GroupedMatrix) -> CudaResult<Self> {
        Ok(Self {
            col_tensor_id: Arc::new(dev.upload(&m.col_tensor_id)?),
            col_local: Arc::new(dev.upload(&m.col_local)?),
            col_block_cols: Arc::new(dev.upload(&m.col_block_cols)?),
            col_xbar: Arc::new(dev.upload(&m.col_xbar)?),
        })
    }
}

/// A [`GroupedMatrix`] on the device with its weights in the operand format of `precision`.
/// The operands and the seed-independent column tables are shared (`Arc`) with the view the
/// GDC readout runs through (`GpuGroupedMatrix::crossbar_blocks`).
pub struct GpuGroupedMatrix {
    pub(crate) n_experts: usize,
    pub(crate) n_cols: usize,
    pub(crate) k: usize,
    pub(crate) k_block: usize,
    pub(crate) precision: Precision,
    /// `[E, N, K]` 16-bit operand words: W̃ in fp16 (analog) or W in bf16 (digital).
    pub(crate) w: Arc<CudaSlice<u16>>,
    pub(crate) col_tensor_id: Arc<CudaSlice<u32>>,
    pub(crate) col_scale: Arc<CudaSlice<f32>>,
    pub(crate) col_local: Arc<CudaSlice<u32>>,
    pub(crate) col_block_cols: Arc<CudaSlice<u32>>,
    pub(crate) col_xbar: Arc<CudaSlice<u32>>,
    pub(crate) n_xbar: usize,
    pub(crate) noise_quads: bool,
    pub(crate) wgmma: Option<WgmmaTile>,
    /// `Some((K, KB))`: this matrix is `GpuGroupedMatrix::crossbar_blocks`'s view, its expert
    /// g crossbar block g % KB of expert g / KB of operands `[E, N, K]`.
    pub(crate) block_view: Option<(usize, usize)>,
}

impl GpuGroupedMatrix {
    /// Device bytes of `m` uploaded: (resident, transient). Resident are the operand weights
    /// (one 16-bit array, fp16 or bf16) and the column tables; transient is the f32 copy of
    /// the weights that [`Self::upload`] converts from and then frees.
    pub fn device_bytes(m: &GroupedMatrix) -> (usize, usize) {
        let elems = m.n_experts * m.n_cols * m.k;
        let operand = 2;
        // [E, KB, N] tensor ids (u32) and scales (f32); [N] local column, crossbar width and
        // crossbar index (u32 each).
        let tables = 8 * m.n_experts * (m.k / m.k_block.max(1)) * m.n_cols + 12 * m.n_cols;
        (elems * operand + tables, elems * 4)
    }

    /// Upload `m` and convert its weights on the device.
    pub fn upload(dev: &CudaDevice, m: &GroupedMatrix, precision: Precision) -> CudaResult<Self> {
        let w = dev.upload(&m.weights)?;
        Self::from_device_weights(dev, m, &w, precision)
    }

    /// Use weights already on the device (`[E, N, K]` f32, e.g. programmed there) with the
    /// tables of `m` (whose `weights` may be empty).
    pub fn from_device_weights(
        dev: &CudaDevice,
        m: &GroupedMatrix,
        w: &CudaSlice<f32>,
        precision: Precision,
    ) -> CudaResult<Self> {
        let tables = GpuColumnTables::upload(dev, m)?;
        let col_scale = Arc::new(dev.upload(&m.col_scale)?);
        Self::from_device_parts(dev, m, w, precision, &tables, col_scale)
    }

    /// [`GpuGroupedMatrix::from_device_weights`] with `m`'s column tables and digital scales
    /// already on the device (shared, not copied): a drift point rebuilds only the operands.
    pub fn from_device_parts(
        dev: &CudaDevice,
        m: &GroupedMatrix,
        w: &CudaSlice<f32>,
        precision: Precision,
        tables: &GpuColumnTables,
        col_scale: Arc<CudaSlice<f32>>,
    ) -> CudaResult<Self> {
        let len = m.n_experts * m.n_cols * m.k;
        if w.len() != len
            || !m.n_cols.is_multiple_of(TILE_COLS)
            || !m.k_block.is_multiple_of(TILE_K)
            || !m.k.is_multiple_of(m.k_block)
        {
            return Err(CudaError::Unsupported(format!(
                "grouped matrix {}×[{}×{}] (crossbar rows {}): N must be a multiple of {TILE_COLS}, \
                 crossbar rows of {TILE_K}, weights {len} elements (got {})",
                m.n_experts, m.n_cols, m.k, m.k_block, w.len()
            )));
        }
        // Read on every GPU, so that a malformed value is an error wherever it is set, not
        // only where it would take effect (Hopper).
        let analog_off = precision.analog() && analog_wgmma_off()?;
        let mut words = dev.scratch::<u16>(len)?;
        let n = len as u64;
        if precision == Precision::DigitalBf16 {
            to_bf16_into(dev, w, &mut words)?;
        } else {
            // W̃ is binary16 already (drift_grouped, tile::operand): exact.
            let f = dev.function(&MOE_CU, &[], "to_f16")?;
            dev.launch(&f, "to_f16", linear_launch(n), |b| {
                b.arg(w).arg(&n).arg(&mut words);
            })?;
        }
        Ok(Self {
            n_experts: m.n_experts,
            n_cols: m.n_cols,
            k: m.k,
            k_block: m.k_block,
            precision,
            w: Arc::new(words),
            col_tensor_id: Arc::clone(&tables.col_tensor_id),
            col_scale,
            col_local: Arc::clone(&tables.col_local),
            col_block_cols: Arc::clone(&tables.col_block_cols),
            col_xbar: Arc::clone(&tables.col_xbar),
            block_view: None,
            n_xbar: m.n_xbar,
            noise_quads: m.noise_quads(),
            // On Hopper the wgmma kernels run where their tile fits. Digital: 1.6× the
            // mma.sync kernel on the OLMoE layer, bit-identical outputs
            // (reports/bench/2026-11-23-wgmma.md); `AIMC_WGMMA_TILE` picks the tile. Analog
            // (variants with an f32 output, [`GemmVariant::wgmma_ready`]; bound management's
            // attempts and GDC readouts fall back to mma.sync at launch): on its 64-column
            // tile 15 to 19 % faster than mma.sync at the Lightning set, within the layer
            // parity bound of it (reports/bench/2026-12-07-analog-wgmma-default.md), and with
            // side products (PCM_READ, IR drop) on that tile too; `AIMC_ANALOG_WGMMA_TILE`
            // picks the tile and `AIMC_ANALOG_WGMMA=0` runs mma.sync instead.
            wgmma: if dev.compute_capability() != (9, 0) || !m.k.is_multiple_of(WGMMA_TILE_K) {
                None
            } else if precision == Precision::DigitalBf16 {
                WgmmaTile::choose(m.n_cols, m.k)?
            } else if analog_off {
                None
            } else {
                analog_wgmma_tile(m.k_block)?
            },
        })
    }

    /// Run this matrix's GEMMs with the sm_90a wgmma kernels on `tile` (Hopper only; `None`:
    /// the mma.sync kernel). See [`WgmmaTile::choose`] for the default digital tile and
    /// [`analog_wgmma_tile`] for the analog one.
    pub fn use_wgmma(mut self, tile: Option<WgmmaTile>) -> Self {
        self.wgmma = tile;
        self
    }

    /// The wgmma tile this matrix's GEMMs run on (`None`: the mma.sync kernel).
    pub fn wgmma(&self) -> Option<WgmmaTile> {
        self.wgmma
    }

    /// The digital scales s_map·α_GDC per (expert, K block, column), copied back.
    pub fn col_scale(&self, dev: &CudaDevice) -> CudaResult<Vec<f32>> {
        dev.download(&self.col_scale)
    }

    /// Replaces the digital scales (`[E, K/k_block, N]` on the device), e.g. with s_map·α_GDC
    /// once the readout of these operands is known.
    pub fn set_col_scale(&mut self, scale: CudaSlice<f32>) -> CudaResult<()> {
        if scale.len() != self.col_scale.len() {
            return Err(CudaError::Unsupported(format!(
                "digital scales: {} values for a matrix with {}",
                scale.len(),
                self.col_scale.len()
            )));
        }
        self.col_scale = Arc::new(scale);
        Ok(())
    }

    /// Each crossbar block along K as an expert of its own (`[E·KB, N, k_block]`, digital scale
    /// `ones`), sharing this matrix's operands and column tables: what the GDC readout
    /// ([`crossbar_readout`]) multiplies the identity with. The kernel reads block g of the
    /// operands in place (`MOE_DIAG`), so no regrouped copy of the weights exists.
    pub(crate) fn crossbar_blocks(&self, ones: &Arc<CudaSlice<f32>>) -> Self {
        let blocks = self.k / self.k_block;
        let groups = self.n_experts * blocks;
        Self {
            n_experts: groups,
            n_cols: self.n_cols,
            k: self.k_block,
            k_block: self.k_block,
            precision: self.precision,
            w: Arc::clone(&self.w),
            col_tensor_id: Arc::clone(&self.col_tensor_id),
            col_scale: Arc::clone(ones),
            col_local: Arc::clone(&self.col_local),
            col_block_cols: Arc::clone(&self.col_block_cols),
            col_xbar: Arc::clone(&self.col_xbar),
            n_xbar: self.n_xbar,
            noise_quads: self.noise_quads,
            wgmma: None,
            block_view: Some((self.k, blocks)),
        }
    }

    /// The 16-bit operand words of the weights `[E, N, K]`, copied back.
    pub fn weight_bits(&self, dev: &CudaDevice) -> CudaResult<Vec<u16>> {
        dev.download(&self.w)
    }

    /// Output columns.
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }
    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Operand precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }
}

/// A bf16 copy (`u16` bits, round to nearest even) of a device buffer.
pub fn to_bf16_device(dev: &CudaDevice, x: &CudaSlice<f32>) -> CudaResult<CudaSlice<u16>> {
    let mut out = dev.scratch::<u16>(x.len())?;
    to_bf16_into(dev, x, &mut out)?;
    Ok(out)
}

/// `out[i]` = bf16 bits of `x[i]` (round to nearest even) for the first `x.len()` elements.
pub(crate) fn to_bf16_into(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<u16>,
) -> CudaResult<()> {
    if out.len() < x.len() {
        return Err(CudaError::Unsupported(format!(
            "to_bf16: {} values into {}",
            x.len(),
            out.len()
        )));
    }
    let f = dev.function(&MOE_CU, &[], "to_bf16")?;
    let n = x.len() as u64;
    // 8 values per thread (`to_bf16` in kernels/dac.cuh).
    dev.launch(&f, "to_bf16", linear_launch(n.div_ceil(8)), |b| {
        b.arg(x).arg(&n).arg(out);
    })
}

//! Grouped MoE expert layers on the GPU (`kernels/analog_moe.cu`).
//!
//! Pipeline of one layer (issue 5): routing pairs → stable counting sort by expert on the GPU
//! ([`route`]) → DAC prologue once per token and crossbar block ([`quantize`]) → grouped GEMM of
//! the interleaved gate/up matrices with the crossbar periphery fused per block along K and
//! SwiGLU fused in the epilogue → DAC of the hidden rows → grouped GEMM of the down matrices with
//! the weighted scatter-add fused ([`GpuMoeLayer::forward`]). No per-expert copies of the inputs.
//!
//! Operand precision (stated in every output): analog = DAC codes exact in fp16 × weights as
//! fp16 hi + fp16 lo (≈ 22-bit significand, two MMAs), f32 accumulation; digital = bf16 × bf16,
//! f32 accumulation.
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::compile::{ANALOG_MOE_CU, MODEL_CU};
use super::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::tile::{AnalogMatrix, Crossbar, NoiseManagement, PeripherySpec, WeightNoise};

/// Rows (tokens) per CTA tile of the grouped GEMM (`BM` in the kernel), for every variant: the
/// routing counts tiles in these units.
pub const TILE_ROWS: usize = 128;
/// Matrix widths must be multiples of this (the widest output tile the host picks by default).
pub const TILE_COLS: usize = 128;
/// K per pipeline stage (`BK`): crossbar rows per block must be multiples of it.
pub const TILE_K: usize = 32;
/// Shared-memory row stride in halves (`LDS`: 32 + 8 padding keeps ldmatrix conflict-free).
const SMEM_ROW_HALVES: usize = 40;
/// Dynamic shared memory one CTA may use on sm_80 / sm_90 (227 KiB).
const MAX_SHARED_BYTES: usize = 227 * 1024;

/// The `N` comma-separated integers of a tile override `var=text` (format `want`), or an error
/// naming the variable and the format.
fn tile_fields<const N: usize>(var: &str, text: &str, want: &str) -> CudaResult<[usize; N]> {
    text.split(',')
        .map(|x| x.trim().parse::<usize>().ok())
        .collect::<Option<Vec<_>>>()
        .and_then(|f| <[usize; N]>::try_from(f).ok())
        .ok_or_else(|| CudaError::Unsupported(format!("{var}={text:?}: want {want}")))
}

/// CTA tile of one `moe_gemm` instantiation besides its [`TILE_ROWS`] rows: output columns,
/// warp grid and cp.async pipeline depth (`MOE_TILE_N`, `MOE_WARPS_M`, `MOE_WARPS_N`,
/// `MOE_STAGES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTile {
    /// Output columns per CTA.
    pub cols: usize,
    /// Warps along the rows.
    pub warps_m: usize,
    /// Warps along the columns.
    pub warps_n: usize,
    /// cp.async stages in flight.
    pub stages: usize,
}

impl GemmTile {
    /// The default tile of `v`, from sweeps on an H100 (`tools/gpu_sweep.sh`,
    /// reports/bench/2026-11-23-gpu.md). Each f32 accumulator set costs
    /// `TILE_ROWS·cols/threads` registers per thread.
    /// - Digital: one set; 128 columns on 2×4 warps (64 registers a set, 128 in all, 2 CTAs per
    ///   SM) halves the shared-memory traffic per MMA of a 64-column tile (7.9 vs 10.8 ms on
    ///   the OLMoE layer).
    /// - Analog: the block result and the running total are two sets. 64 columns on 4×2 warps
    ///   keep 2 CTAs per SM, so one CTA's periphery epilogue (CUDA cores) overlaps the other's
    ///   MMAs (22.5 vs 28.9 ms with 128 columns, 1 CTA per SM).
    /// - PCM_READ and IR drop add one and two sets: 64 columns stay under 255 registers
    ///   without spills (1 CTA per SM).
    pub fn for_variant(v: &GemmVariant) -> Self {
        if !v.analog {
            return Self {
                cols: 128,
                warps_m: 2,
                warps_n: 4,
                stages: 4,
            };
        }
        // The side-accumulator variants keep the 3 stages they were measured with.
        Self {
            cols: 64,
            warps_m: 4,
            warps_n: 2,
            stages: if v.pcm_read || v.ir_drop { 3 } else { 4 },
        }
    }

    /// `AIMC_GEMM_TILE=cols,warps_m,warps_n,stages` overrides the default (a tuning knob for
    /// `aimc bench`; a malformed or unfit value is an error, not ignored).
    fn choose(v: &GemmVariant, n_cols: usize) -> CudaResult<Self> {
        let tile = match std::env::var("AIMC_GEMM_TILE") {
            Ok(text) => Self::parse(&text)?,
            Err(_) => Self::for_variant(v),
        };
        tile.check(n_cols, v.weight_operands())?;
        Ok(tile)
    }

    /// `cols,warps_m,warps_n,stages` (the `AIMC_GEMM_TILE` format).
    fn parse(text: &str) -> CudaResult<Self> {
        let [cols, warps_m, warps_n, stages] =
            tile_fields("AIMC_GEMM_TILE", text, "cols,warps_m,warps_n,stages")?;
        Ok(Self {
            cols,
            warps_m,
            warps_n,
            stages,
        })
    }

    fn threads(self) -> usize {
        32 * self.warps_m * self.warps_n
    }

    fn shared_bytes(self, nb_mat: usize) -> usize {
        self.stages
            * (TILE_ROWS + nb_mat * self.cols)
            * SMEM_ROW_HALVES
            * std::mem::size_of::<u16>()
    }

    /// The kernel's `#error` conditions, as a clear error before compiling.
    fn check(self, n_cols: usize, nb_mat: usize) -> CudaResult<()> {
        let threads = self.threads();
        let ok = self.warps_m > 0
            && self.warps_n > 0
            && threads <= 1024
            && self.cols > 0
            && n_cols.is_multiple_of(self.cols)
            && (TILE_ROWS * 4).is_multiple_of(threads)
            && (self.cols * 4).is_multiple_of(threads)
            && TILE_ROWS.is_multiple_of(16 * self.warps_m)
            && self.cols.is_multiple_of(16 * self.warps_n)
            && self.stages >= 2
            && self.shared_bytes(nb_mat) <= MAX_SHARED_BYTES;
        if ok {
            Ok(())
        } else {
            Err(CudaError::Unsupported(format!(
                "grouped GEMM tile {self:?} does not fit {TILE_ROWS} rows × N = {n_cols} ({} B of shared memory, at most {MAX_SHARED_BYTES})",
                self.shared_bytes(nb_mat)
            )))
        }
    }
}

/// Operand precision of a grouped GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Analog: integer DAC codes in fp16 × weights as fp16 hi + lo (two MMAs), f32 accumulate.
    AnalogSplitF16,
    /// Analog, fast: DAC codes in fp16 × weights in fp16 (one MMA), f32 accumulate.
    AnalogF16,
    /// Digital baseline: bf16 × bf16, f32 accumulate.
    DigitalBf16,
}

impl Precision {
    /// One-line description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AnalogSplitF16 => {
                "A = DAC codes (exact in fp16), W = fp16 hi + fp16 lo (2 MMAs), f32 accumulate"
            }
            Self::AnalogF16 => "A = DAC codes (exact in fp16), W = fp16, f32 accumulate",
            Self::DigitalBf16 => "A = bf16, W = bf16, f32 accumulate",
        }
    }
    fn analog(self) -> bool {
        self != Self::DigitalBf16
    }

    /// 16-bit weight matrices per expert matrix: 2 for fp16 hi + lo, else 1.
    pub fn weight_operands(self) -> usize {
        if self == Self::AnalogSplitF16 {
            2
        } else {
            1
        }
    }
}

/// The crossbar periphery as the kernels apply it (docs/model.md §3 steps 1–9).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPeriphery {
    /// 0 ABS_MAX, 1 constant, 2 none.
    pub(crate) nm_kind: u32,
    /// Constant α_nm (kind 1).
    pub(crate) nm_value: f32,
    /// DAC (step, largest code).
    pub(crate) dac: Option<(f32, f32)>,
    /// ADC (step, bound).
    pub(crate) adc: Option<(f32, f32)>,
    /// Output noise std.
    pub(crate) out_noise: f32,
    /// PCM_READ weight-noise std.
    pub(crate) pcm_read_std: Option<f32>,
    /// ADDITIVE weight-noise std (σ² = std²·‖x̃‖² per row and crossbar block).
    pub(crate) additive_std: Option<f32>,
    /// IR drop (scale, g_ratio).
    pub(crate) ir_drop: Option<(f32, f32)>,
    /// Iterative bound management: the largest β that may still be doubled
    /// ([`PeripherySpec::bm_beta_limit`]).
    pub(crate) bm_limit: Option<f32>,
}

impl GemmPeriphery {
    /// Kernel form of `spec`. DACs above 11 bits are refused: their codes are not exact fp16
    /// operands.
    pub fn from_spec(spec: &PeripherySpec) -> CudaResult<Self> {
        let (pcm_read_std, additive_std) = match spec.w_noise {
            WeightNoise::None => (None, None),
            WeightNoise::PcmRead { std } => ((std > 0.0).then_some(std), None),
            WeightNoise::Additive { std } => (None, (std > 0.0).then_some(std)),
        };
        let (nm_kind, nm_value) = match spec.noise_management {
            NoiseManagement::AbsMax => (0, 0.0),
            NoiseManagement::Constant { value } => (1, value),
            NoiseManagement::None => (2, 1.0),
        };
        if let Some(d) = spec.dac {
            if d.bits > 11 {
                return Err(CudaError::Unsupported(format!(
                    "periphery.dac.bits = {}: DAC codes above 11 bits are not exact in fp16 operands",
                    d.bits
                )));
            }
        }
        Ok(Self {
            nm_kind,
            nm_value,
            // Largest code: bound/step = (2^bits − 2)/2 exactly.
            dac: spec
                .dac
                .map(|d| (d.step(), ((1u64 << d.bits) - 2) as f32 / 2.0)),
            adc: spec.adc.map(|a| (a.step(), a.bound)),
            out_noise: spec.out_noise,
            pcm_read_std,
            additive_std,
            ir_drop: spec.ir_drop.map(|ir| (ir.scale, ir.g_ratio)),
            bm_limit: spec.bm_beta_limit(),
        })
    }

    /// Whether the analog wgmma kernel runs this periphery: no side accumulators (PCM_READ
    /// weight noise, IR drop). See [`GemmVariant::wgmma_ready`].
    pub fn wgmma_ready(&self) -> bool {
        self.pcm_read_std.is_none() && self.ir_drop.is_none()
    }

    /// Whether iterative bound management runs (saturated rows are redone by attempt passes).
    pub(crate) fn bound_managed(&self) -> bool {
        self.bm_limit.is_some()
    }

    /// Whether per-output noise is drawn (output noise and/or short-term weight noise).
    pub(crate) fn noisy(&self) -> bool {
        self.out_noise > 0.0 || self.pcm_read_std.is_some() || self.additive_std.is_some()
    }
}

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
fn swiglu_source(f: usize) -> (bool, usize) {
    let g8 = f / 8;
    (g8 % 2 == 1, (g8 / 2) * 8 + f % 8)
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
/// GDC readout runs through ([`GpuGroupedMatrix::crossbar_blocks`]).
pub struct GpuGroupedMatrix {
    n_experts: usize,
    n_cols: usize,
    k: usize,
    k_block: usize,
    precision: Precision,
    w_hi: Arc<CudaSlice<u16>>,
    w_lo: Option<Arc<CudaSlice<u16>>>,
    col_tensor_id: Arc<CudaSlice<u32>>,
    col_scale: Arc<CudaSlice<f32>>,
    col_local: Arc<CudaSlice<u32>>,
    col_block_cols: Arc<CudaSlice<u32>>,
    col_xbar: Arc<CudaSlice<u32>>,
    n_xbar: usize,
    noise_quads: bool,
    wgmma: Option<WgmmaTile>,
    /// `Some((K, KB))`: this matrix is [`GpuGroupedMatrix::crossbar_blocks`]'s view, its expert
    /// g crossbar block g % KB of expert g / KB of operands `[E, N, K]`.
    block_view: Option<(usize, usize)>,
}

impl GpuGroupedMatrix {
    /// Device bytes of `m` uploaded in `precision`: (resident, transient). Resident are the
    /// operand weights (fp16 hi + lo or one 16-bit array) and the column tables; transient is
    /// the f32 copy of the weights that [`Self::upload`] converts from and then frees.
    pub fn device_bytes(m: &GroupedMatrix, precision: Precision) -> (usize, usize) {
        let elems = m.n_experts * m.n_cols * m.k;
        let operand = 2 * precision.weight_operands();
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
        let mut w_hi = dev.scratch::<u16>(len)?;
        let n = len as u64;
        let w_lo = if precision == Precision::DigitalBf16 {
            to_bf16_into(dev, w, &mut w_hi)?;
            None
        } else {
            let mut lo = dev.scratch::<u16>(len)?;
            let f = dev.function(&ANALOG_MOE_CU, &[], "split_f16")?;
            dev.launch(&f, "split_f16", linear_launch(n), |b| {
                b.arg(w).arg(&n).arg(&mut w_hi).arg(&mut lo);
            })?;
            (precision == Precision::AnalogSplitF16).then_some(lo)
        };
        Ok(Self {
            n_experts: m.n_experts,
            n_cols: m.n_cols,
            k: m.k,
            k_block: m.k_block,
            precision,
            w_hi: Arc::new(w_hi),
            w_lo: w_lo.map(Arc::new),
            col_tensor_id: Arc::clone(&tables.col_tensor_id),
            col_scale,
            col_local: Arc::clone(&tables.col_local),
            col_block_cols: Arc::clone(&tables.col_block_cols),
            col_xbar: Arc::clone(&tables.col_xbar),
            block_view: None,
            n_xbar: m.n_xbar,
            noise_quads: m.noise_quads(),
            // On Hopper the digital wgmma kernel runs where its tile fits: 1.6× the mma.sync
            // kernel on the OLMoE layer, bit-identical outputs
            // (reports/bench/2026-11-23-wgmma.md); `AIMC_WGMMA_TILE` picks the tile. The analog
            // wgmma kernel (variants without side accumulators, [`GemmVariant::wgmma_ready`])
            // is bit-identical to mma.sync but slower so far (OLMoE layer, Lightning set:
            // 23.8 against 20.7 ms, reports/bench/2026-11-24-analog-wgmma.md): it runs only
            // with `AIMC_ANALOG_WGMMA=1`.
            wgmma: if dev.compute_capability() != (9, 0) || !m.k.is_multiple_of(WGMMA_TILE_K) {
                None
            } else if precision == Precision::DigitalBf16 {
                WgmmaTile::choose(m.n_cols, m.k)?
            } else if !std::env::var("AIMC_ANALOG_WGMMA").is_ok_and(|v| v.trim() == "1") {
                None
            } else {
                analog_wgmma_tile(m.k_block, precision.weight_operands())
            },
        })
    }

    /// Run this matrix's GEMMs with the sm_90a wgmma kernels on `tile` (Hopper only; `None`:
    /// the mma.sync kernel). See [`WgmmaTile::choose`] for the default digital tile and
    /// [`analog_wgmma_tile`] for the analog one (which has a single schedule).
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
    fn crossbar_blocks(&self, ones: &Arc<CudaSlice<f32>>) -> Self {
        let blocks = self.k / self.k_block;
        let groups = self.n_experts * blocks;
        Self {
            n_experts: groups,
            n_cols: self.n_cols,
            k: self.k_block,
            k_block: self.k_block,
            precision: self.precision,
            w_hi: Arc::clone(&self.w_hi),
            w_lo: self.w_lo.as_ref().map(Arc::clone),
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

    /// The (high) 16-bit operand words of the weights `[E, N, K]`, copied back.
    pub fn weight_bits(&self, dev: &CudaDevice) -> CudaResult<Vec<u16>> {
        dev.download(&self.w_hi)
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
fn to_bf16_into(dev: &CudaDevice, x: &CudaSlice<f32>, out: &mut CudaSlice<u16>) -> CudaResult<()> {
    if out.len() < x.len() {
        return Err(CudaError::Unsupported(format!(
            "to_bf16: {} values into {}",
            x.len(),
            out.len()
        )));
    }
    let f = dev.function(&ANALOG_MOE_CU, &[], "to_bf16")?;
    let n = x.len() as u64;
    // 8 values per thread (kernels/analog_moe.cu).
    dev.launch(&f, "to_bf16", linear_launch(n.div_ceil(8)), |b| {
        b.arg(x).arg(&n).arg(out);
    })
}

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
        let f = dev.function(&ANALOG_MOE_CU, &[], "moe_noise_keys")?;
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
    let f = dev.function(&ANALOG_MOE_CU, &[], "moe_count")?;
    allow_dynamic_shared(&f, "moe_count", 256, count_shared)?;
    dev.launch(&f, "moe_count", per_slice(256, count_shared), |b| {
        b.arg(expert_of_pair)
            .arg(&p32)
            .arg(&e32)
            .arg(&slice32)
            .arg(&mut counts);
    })?;
    let f = dev.function(&ANALOG_MOE_CU, &[], "moe_scan")?;
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
    let f = dev.function(&ANALOG_MOE_CU, &[], "moe_scatter")?;
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

/// Operand rows of one grouped GEMM: fp16 DAC codes (analog) or bf16 values (digital), with
/// α_nm per (row, crossbar block) for analog.
pub struct GemmInput<'x> {
    /// `[rows, K]` operand bits.
    pub a: CudaSlice<u16>,
    /// `[rows, K/k_block]` α_nm (empty for digital).
    pub alpha: CudaSlice<f32>,
    /// `[rows, K/k_block]` ‖x̃‖² (ADDITIVE weight noise only).
    pub sumsq: Option<CudaSlice<f32>>,
    /// The unquantised rows (analog: bound management re-encodes them at 2β).
    pub x: Option<&'x CudaSlice<f32>>,
    /// Rows.
    pub rows: usize,
}

/// Prologue: noise management + DAC of `x` (`[rows, k]` f32) per crossbar block of `k_block`
/// rows (analog), or bf16 conversion (digital, `periphery = None`).
pub fn quantize<'x>(
    dev: &CudaDevice,
    x: &'x CudaSlice<f32>,
    rows: usize,
    k: usize,
    k_block: usize,
    periphery: Option<&GemmPeriphery>,
) -> CudaResult<GemmInput<'x>> {
    quantize_scaled(dev, x, rows, k, k_block, periphery, 1.0)
}

/// [`quantize`] with the noise-management scale of every block multiplied by `beta` (a power
/// of two): the operand rows of bound-management attempt log2 β, x / (α_nm·β), whose α is
/// α_nm·β (docs/model.md §3 step 8).
pub fn quantize_scaled<'x>(
    dev: &CudaDevice,
    x: &'x CudaSlice<f32>,
    rows: usize,
    k: usize,
    k_block: usize,
    periphery: Option<&GemmPeriphery>,
    beta: f32,
) -> CudaResult<GemmInput<'x>> {
    if x.len() != rows * k || k_block == 0 || !k.is_multiple_of(k_block) {
        return Err(CudaError::Unsupported(format!(
            "quantize: {} values for {rows}×{k} in blocks of {k_block}",
            x.len()
        )));
    }
    let mut a = dev.scratch::<u16>(rows * k)?;
    let Some(p) = periphery else {
        to_bf16_into(dev, x, &mut a)?;
        return Ok(GemmInput {
            a,
            alpha: dev.zeros::<f32>(1)?,
            sumsq: None,
            x: None,
            rows,
        });
    };
    let n_kb = k / k_block;
    let mut alpha = dev.scratch::<f32>(rows * n_kb)?;
    let sumsq = match p.additive_std {
        Some(_) => Some(dev.scratch::<f32>(rows * n_kb)?),
        None => None,
    };
    let f = dev.function(&ANALOG_MOE_CU, &[], "moe_quantize")?;
    let (r32, k32, kb32) = (rows as u32, k as u32, k_block as u32);
    let use_dac = u32::from(p.dac.is_some());
    let (dac_step, dac_max) = p.dac.unwrap_or((1.0, 0.0));
    let s = dev.stream();
    // Raw pointer (0 = no ‖x̃‖² output): one stream, event tracking off (see grouped_gemm).
    let sumsq_ptr: u64 = sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0);
    dev.launch(
        &f,
        "moe_quantize",
        linear_launch((rows * n_kb * 32) as u64),
        |b| {
            b.arg(x)
                .arg(&r32)
                .arg(&k32)
                .arg(&kb32)
                .arg(&p.nm_kind)
                .arg(&p.nm_value)
                .arg(&beta)
                .arg(&use_dac)
                .arg(&dac_step)
                .arg(&dac_max)
                .arg(&mut a)
                .arg(&mut alpha)
                .arg(&sumsq_ptr);
        },
    )?;
    Ok(GemmInput {
        a,
        alpha,
        sumsq,
        x: Some(x),
        rows,
    })
}

/// What the grouped GEMM does with its result rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOutput {
    /// `out[sorted row, col]` (`[P, N]`).
    Store,
    /// SwiGLU of the interleaved gate/up columns: `out[sorted row, j]` (`[P, N/2]`).
    SwiGlu,
    /// `out[token, col] += router weight · result` (`[T, N]`, zero it first).
    ScatterAdd,
    /// Digital only: [`GemmOutput::SwiGlu`] rounded to bf16 (`[P, N/2]` `u16` bits), the down
    /// GEMM's operand as [`quantize`] would make it, without the f32 round trip.
    SwiGluBf16,
    /// One attempt of iterative bound management (the kernel's mode 4): the outputs of the
    /// crossbars still pending, per crossbar block, into the bound-management scratch. Run by
    /// [`grouped_gemm`] after a [`GemmOutput::Store`] pass flags rows; not an output of its own.
    BmAttempt,
    /// Digital only: [`GemmOutput::Store`] rounded to bf16 (`[P, N]` `u16` bits), the expert
    /// outputs [`combine_bf16_rows`] sums per token.
    StoreBf16,
}

impl GemmOutput {
    /// The kernels' `MOE_MODE`.
    pub fn mode(self) -> i64 {
        match self {
            Self::Store => 0,
            Self::SwiGlu => 1,
            Self::ScatterAdd => 2,
            Self::SwiGluBf16 => 3,
            Self::BmAttempt => 4,
            Self::StoreBf16 => 5,
        }
    }

    /// Whether the output holds bf16 bits (`u16` elements).
    pub fn bf16(self) -> bool {
        matches!(self, Self::SwiGluBf16 | Self::StoreBf16)
    }
}

/// Element type of a grouped GEMM's output buffer: `f32`, or `u16` bf16 bits for
/// [`GemmOutput::SwiGluBf16`] and [`GemmOutput::StoreBf16`].
pub trait GemmOutElem: cudarc::driver::DeviceRepr {
    /// Whether the buffer holds bf16 bits.
    const BF16: bool;
}
impl GemmOutElem for f32 {
    const BF16: bool = false;
}
impl GemmOutElem for u16 {
    const BF16: bool = true;
}

/// Compile-time configuration of one `moe_gemm` instantiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmVariant {
    /// Analog pre/epilogue (false: the digital bf16 baseline).
    pub analog: bool,
    /// Weights as fp16 hi + lo (two MMAs).
    pub split_w: bool,
    /// PCM_READ weight noise (second GEMM of the weight magnitudes).
    pub pcm_read: bool,
    /// IR-drop correction.
    pub ir_drop: bool,
    /// ADDITIVE weight noise (‖x̃‖² per row from the prologue).
    pub additive: bool,
    /// Iterative bound management (saturated rows flagged in store mode, redone by
    /// [`GemmOutput::BmAttempt`] passes).
    pub bound_management: bool,
    /// Output noise.
    pub out_noise: bool,
    /// ADC quantisation and clamp.
    pub adc: bool,
    /// What the epilogue does with the rows.
    pub output: GemmOutput,
    /// Every 4 output columns lie in one crossbar at a multiple of 4 ([`GroupedMatrix::noise_quads`]):
    /// a lane pair shares one Philox block per 4 columns.
    pub noise_quads: bool,
    /// The GDC readout ([`crossbar_readout`]): identity rows through each crossbar block of a
    /// matrix's own operands, each row tile over its own K range (`MOE_DIAG`).
    pub block_readout: bool,
}

impl GemmVariant {
    /// Whether the sm_90a wgmma kernel runs this variant: digital, or analog without side
    /// accumulators (PCM_READ, IR drop: each would add 64 registers per thread to its three
    /// accumulator sets) and with an f32 output.
    pub fn wgmma_ready(&self) -> bool {
        !self.analog
            || !(self.pcm_read
                || self.block_readout
                || self.ir_drop
                || self.output.bf16()
                || self.output == GemmOutput::BmAttempt)
    }

    /// Weight matrices staged per K step (`NB_MAT` in the kernel): fp16 hi and lo when split.
    pub fn weight_operands(&self) -> usize {
        if self.analog && self.split_w {
            2
        } else {
            1
        }
    }
}

/// The `#define`s NVRTC compiles `moe_gemm` with for `v` on `tile`.
pub fn gemm_defines(v: &GemmVariant, tile: GemmTile) -> [(&'static str, i64); 16] {
    let flag = |b: bool| i64::from(b);
    let mode = v.output.mode();
    [
        ("MOE_ANALOG", flag(v.analog)),
        ("MOE_SPLIT_W", flag(v.analog && v.split_w)),
        ("MOE_PCM_READ", flag(v.analog && v.pcm_read)),
        ("MOE_IR_DROP", flag(v.analog && v.ir_drop)),
        ("MOE_ADDITIVE", flag(v.analog && v.additive && !v.pcm_read)),
        ("MOE_BM", flag(v.analog && v.bound_management && v.adc)),
        ("MOE_OUT_NOISE", flag(v.analog && v.out_noise)),
        ("MOE_ADC", flag(v.analog && v.adc)),
        ("MOE_MODE", mode),
        ("MOE_NOISE_QUADS", flag(v.analog && v.noise_quads)),
        ("MOE_TILE_M", TILE_ROWS as i64),
        ("MOE_TILE_N", tile.cols as i64),
        ("MOE_WARPS_M", tile.warps_m as i64),
        ("MOE_WARPS_N", tile.warps_n as i64),
        ("MOE_STAGES", tile.stages as i64),
        ("MOE_DIAG", flag(v.analog && v.block_readout)),
    ]
}

/// CTA tile of the sm_90a digital GEMM `moe_gemm_wgmma` besides its [`TILE_ROWS`] rows
/// (`WG_BN`, `WG_STAGES`, `WG_PIPE` of kernels/analog_moe.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaTile {
    /// Output columns per CTA: 128 or 256 (wgmma m64n128k16 or m64n256k16 per warpgroup).
    pub cols: usize,
    /// Shared-memory stages of [`WGMMA_TILE_K`] columns of K.
    pub stages: usize,
    /// Pipelining: 0 and 1 run one CTA per tile whose 256 threads all load and multiply
    /// (0: each step waits for its wgmma; 1: one wgmma group stays in flight across the
    /// barrier); 2 runs the warp-specialised persistent kernel (one loading warpgroup, two
    /// multiplying ones, mbarriers between them, weights by TMA; at least 3 stages); 3 runs it
    /// in clusters of two CTAs that multicast each weight tile to both.
    pub pipe: usize,
    /// The pipelining of the weighted scatter-add GEMMs (output mode 2), as `pipe`.
    pub scatter_pipe: usize,
    /// CTAs of the persistent kernels (`pipe` 2 and 3): 0 launches as many as can be resident
    /// at once (one per multiprocessor; for `pipe` 3, two per co-resident cluster). Fewer make
    /// each CTA walk more tiles (the GPU tests use 3 and 4 to cross tiles and barrier phases).
    pub ctas: usize,
}

/// K per stage of the wgmma GEMM (one 128-byte swizzle atom of bf16).
pub const WGMMA_TILE_K: usize = 64;

impl WgmmaTile {
    /// The tile for `n_cols` output columns and `k` inputs: `AIMC_WGMMA_TILE=cols,stages,pipe`
    /// if set (a tuning knob for `aimc bench`, for every output mode; malformed or unfit is an
    /// error), else 256 columns where they divide `n_cols`, else 128, with 4 stages. The
    /// schedule, from the per-GEMM times of reports/bench/2026-11-24-wgmma-ws.md: 256-wide
    /// tiles run the clustered warp-specialised kernel (`pipe` 3; OLMoE gate/up 2.24 → 1.98 ms,
    /// fine-grained 0.68 → 0.62), except the scatter-add below K = 4096, which runs one CTA
    /// per tile (`pipe` 1; OLMoE's down GEMM 1.47 ms against 1.52, fine-grained's 0.90 against
    /// 1.09: bound by its DRAM read-modify-writes, it gains from more CTAs in flight, not from
    /// the persistent schedule). 128-wide tiles run `pipe` 1. A 128 × 256 tile reads 48 KiB of
    /// L2 per 4.2 MFLOP where 128 × 128 reads 32 KiB per 2.1. `None` when no tile divides N.
    pub fn choose(n_cols: usize, k: usize) -> CudaResult<Option<Self>> {
        let tile = match std::env::var("AIMC_WGMMA_TILE") {
            Ok(text) => Self::parse(&text)?,
            Err(_) => {
                let wide = n_cols.is_multiple_of(256);
                Self {
                    cols: if wide { 256 } else { 128 },
                    stages: 4,
                    pipe: if wide { 3 } else { 1 },
                    scatter_pipe: if wide && k >= 4096 { 3 } else { 1 },
                    ctas: 0,
                }
            }
        };
        if std::env::var_os("AIMC_WGMMA_TILE").is_none() && !n_cols.is_multiple_of(tile.cols) {
            return Ok(None);
        }
        tile.check(n_cols)?;
        Ok(Some(tile))
    }

    /// This tile as it runs output `mode` (2: the scatter-add's schedule).
    pub fn for_output(self, mode: i64) -> Self {
        if mode == 2 {
            Self {
                pipe: self.scatter_pipe,
                ..self
            }
        } else {
            self
        }
    }

    /// A tile running schedule `pipe` for every output mode; a persistent kernel gets as many
    /// CTAs as can be resident.
    pub fn new(cols: usize, stages: usize, pipe: usize) -> Self {
        Self {
            cols,
            stages,
            pipe,
            scatter_pipe: pipe,
            ctas: 0,
        }
    }

    /// `cols,stages,pipe` (the `AIMC_WGMMA_TILE` format), as [`WgmmaTile::new`].
    pub fn parse(text: &str) -> CudaResult<Self> {
        let [cols, stages, pipe] = tile_fields("AIMC_WGMMA_TILE", text, "cols,stages,pipe")?;
        Ok(Self::new(cols, stages, pipe))
    }

    /// Threads per CTA: 256, or 384 for the warp-specialised kernels.
    pub fn threads(self) -> u32 {
        if self.pipe >= 2 {
            384
        } else {
            256
        }
    }

    /// CTAs per cluster: 2 for the multicasting kernel (`pipe` 3), else 1.
    pub fn cluster(self) -> usize {
        if self.pipe == 3 {
            2
        } else {
            1
        }
    }

    /// Dynamic shared memory for `n_experts` and `weight_tiles` weight matrices (2: split
    /// analog fp16 hi + lo): the stages of A (128 rows) and B (`cols` rows each) of 128 bytes,
    /// plus 1 KiB to align the base to the 1024-byte swizzle atom, plus the warp-specialised
    /// kernels' two 8-byte mbarriers per stage and the clustered kernel's `n_experts + 1`
    /// row-tile-pair offsets.
    pub fn shared_bytes(self, n_experts: usize, weight_tiles: usize) -> usize {
        let stages = self.stages * (TILE_ROWS + weight_tiles * self.cols) * WGMMA_TILE_K * 2 + 1024;
        match self.pipe {
            2 => stages + 16 * self.stages,
            3 => stages + 16 * self.stages + 4 * (n_experts + 1),
            _ => stages,
        }
    }

    /// The kernel's `#error` conditions and the shared-memory limit (with one expert; the
    /// launch checks the clustered kernel's per-expert table too), as a clear error.
    pub fn check(self, n_cols: usize) -> CudaResult<()> {
        let pipe_ok =
            |pipe: usize| pipe <= 3 && self.stages >= if pipe >= 2 { 3 } else { 2 + pipe };
        let ok = (self.cols == 128 || self.cols == 256)
            && pipe_ok(self.pipe)
            && pipe_ok(self.scatter_pipe)
            && n_cols.is_multiple_of(self.cols)
            && self
                .shared_bytes(1, 1)
                .max(self.for_output(2).shared_bytes(1, 1))
                <= MAX_SHARED_BYTES;
        if ok {
            Ok(())
        } else {
            Err(CudaError::Unsupported(format!(
                "wgmma GEMM tile {self:?} does not fit N = {n_cols} (cols 128 or 256 dividing N, \
                 pipe 0 to 3, stages ≥ 2 + pipe (≥ 3 for pipes 2 and 3), {} B of shared memory, \
                 at most {MAX_SHARED_BYTES})",
                self.shared_bytes(1, 1)
            )))
        }
    }

    /// The `#define`s of `moe_gemm_wgmma` for output `mode` (0 store, 1 SwiGLU, 2 scatter-add,
    /// 3 SwiGLU to bf16), the scatter-add in column slabs of `slab_cols` (0: none; see
    /// [`scatter_slab_cols`]).
    pub fn defines(self, mode: i64, slab_cols: usize) -> [(&'static str, i64); 7] {
        [
            ("MOE_ANALOG", 0),
            ("MOE_MODE", mode),
            ("MOE_WGMMA", 1),
            ("WG_BN", self.cols as i64),
            ("WG_STAGES", self.stages as i64),
            ("WG_PIPE", self.pipe as i64),
            (
                "MOE_SLAB_COLS",
                if mode == 2 { slab_cols as i64 } else { 0 },
            ),
        ]
    }
}

/// The analog wgmma GEMM's tile for crossbars of `k_block` rows and `weight_tiles` weight
/// matrices (2: split fp16 hi + lo), or `None` where it does not apply (`k_block` not a
/// multiple of [`WGMMA_TILE_K`]). The kernel has one tile, 128 × 128 (two 64-register
/// accumulator sets per thread, the block's sums and the running total, and the previous
/// block's sums in [`ANALOG_PREV_BYTES`] of shared memory), and as many stages as fit in
/// 227 KiB beside those: 3 of 48 KiB split (`pipe` 0: two stages load ahead and each step
/// waits for its wgmma after the periphery work they hide), 4 of 32 KiB otherwise (`pipe` 1).
pub fn analog_wgmma_tile(k_block: usize, weight_tiles: usize) -> Option<WgmmaTile> {
    if k_block == 0 || !k_block.is_multiple_of(WGMMA_TILE_K) {
        return None;
    }
    Some(if weight_tiles == 2 {
        WgmmaTile::new(128, 3, 0)
    } else {
        WgmmaTile::new(128, 4, 1)
    })
}

/// Shared memory of the analog wgmma GEMM's previous-block sums (128 × 128 f32).
pub const ANALOG_PREV_BYTES: usize = TILE_ROWS * 128 * 4;

/// The `#define`s of the analog wgmma GEMM for `v` on `tile` with crossbars of `k_block` rows:
/// `v`'s periphery switches as [`gemm_defines`] gives them, the tile, and `MOE_KB_STEPS`
/// (wgmma K steps per crossbar block, which the kernel unrolls).
pub fn analog_wgmma_defines(
    v: &GemmVariant,
    tile: WgmmaTile,
    k_block: usize,
    slab_cols: usize,
) -> Vec<(&'static str, i64)> {
    let mut d: Vec<_> = gemm_defines(v, GemmTile::for_variant(v)).to_vec();
    d.extend([
        ("MOE_WGMMA", 1),
        ("WG_BN", tile.cols as i64),
        ("WG_STAGES", tile.stages as i64),
        ("WG_PIPE", tile.pipe as i64),
        ("MOE_KB_STEPS", (k_block / WGMMA_TILE_K) as i64),
        (
            "MOE_SLAB_COLS",
            if v.output == GemmOutput::ScatterAdd {
                slab_cols as i64
            } else {
                0
            },
        ),
    ]);
    d
}

/// Output columns per slab of the wgmma scatter-add GEMM with `k` inputs per row and `top_k`
/// experts per token (`slab_tile` in kernels/analog_moe.cu; 0: no slabs):
/// `AIMC_SCATTER_SLAB_COLS` if set to a number, else 256 where that moves fewer DRAM bytes.
///
/// In expert order each of a token's `top_k` f32 additions into its output row misses the L2
/// (the output is larger), ~8·top_k·T·N bytes of read-modify-write. Slabs of S columns keep
/// one slab's output in L2 (8·T·N) but read the operand rows once per slab
/// (N/S · top_k·T·k · 2). With S = 256 slabs win when k·top_k < 1024·(top_k − 1): the
/// fine-grained layer (k = 256, top-8) 2.30 → 1.99 ms on an H100, the OLMoE one (k = 1024)
/// unchanged, as the byte counts say (reports/bench/2026-11-24-wgmma-ws.md).
pub fn scatter_slab_cols(k: usize, top_k: usize) -> usize {
    if let Some(cols) = std::env::var("AIMC_SCATTER_SLAB_COLS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return cols;
    }
    if k * top_k < 1024 * top_k.saturating_sub(1) {
        256
    } else {
        0
    }
}

/// The `#define`s of the sm_90a wgmma GEMM checked at build time: each output mode on the
/// 256-column pipelined and clustered tiles, and the other pipelines on one mode.
pub fn moe_gemm_wgmma_variants() -> Vec<Vec<(&'static str, i64)>> {
    let tile = WgmmaTile::new;
    let modes = [0, 1, 2, 3, GemmOutput::StoreBf16.mode()];
    let mut v: Vec<_> = modes
        .iter()
        .map(|&mode| tile(256, 4, 1).defines(mode, 0).to_vec())
        .collect();
    v.extend(
        modes
            .iter()
            .map(|&mode| tile(256, 4, 3).defines(mode, 0).to_vec()),
    );
    v.push(tile(256, 4, 1).defines(2, 256).to_vec());
    v.extend(
        [
            tile(128, 5, 1),
            tile(128, 4, 0),
            tile(128, 6, 2),
            tile(256, 4, 2),
        ]
        .iter()
        .map(|t| t.defines(2, 0).to_vec()),
    );
    // The analog kernel: split and single fp16 weights in every output mode with output
    // noise and ADC (Philox quads or not), bound management and ADDITIVE noise in store mode,
    // 256- and 1024-row crossbars.
    let analog = GemmVariant {
        analog: true,
        split_w: true,
        pcm_read: false,
        ir_drop: false,
        additive: false,
        bound_management: false,
        out_noise: true,
        adc: true,
        output: GemmOutput::SwiGlu,
        noise_quads: true,
        block_readout: false,
    };
    let mut a = vec![(analog, 512, 0)];
    for output in [GemmOutput::Store, GemmOutput::ScatterAdd] {
        a.push((GemmVariant { output, ..analog }, 512, 0));
    }
    a.push((
        GemmVariant {
            output: GemmOutput::ScatterAdd,
            ..analog
        },
        512,
        256,
    ));
    a.push((
        GemmVariant {
            split_w: false,
            ..analog
        },
        512,
        0,
    ));
    a.push((
        GemmVariant {
            noise_quads: false,
            ..analog
        },
        256,
        0,
    ));
    a.push((
        GemmVariant {
            output: GemmOutput::Store,
            bound_management: true,
            additive: true,
            ..analog
        },
        1024,
        0,
    ));
    a.push((
        GemmVariant {
            out_noise: false,
            adc: false,
            ..analog
        },
        512,
        0,
    ));
    v.extend(a.into_iter().map(|(var, k_block, slab)| {
        let tile = analog_wgmma_tile(k_block, var.weight_operands()).expect("analog wgmma tile");
        analog_wgmma_defines(&var, tile, k_block, slab)
    }));
    v
}

/// Representative instantiations for compile checks: every output mode digital, analog with
/// everything on and everything off, and each analog feature alone.
/// Each on its default [`GemmTile`].
pub fn moe_gemm_variants() -> Vec<[(&'static str, i64); 16]> {
    let modes = [
        GemmOutput::Store,
        GemmOutput::SwiGlu,
        GemmOutput::ScatterAdd,
    ];
    let all = |analog: bool, on: bool, output| GemmVariant {
        analog,
        split_w: on,
        pcm_read: on,
        ir_drop: on,
        additive: false,
        bound_management: false,
        out_noise: on,
        adc: on,
        output,
        noise_quads: true,
        block_readout: false,
    };
    let mut v = Vec::new();
    for output in modes {
        v.push(all(false, false, output));
        v.push(all(true, true, output));
        v.push(all(true, false, output));
    }
    v.push(all(false, false, GemmOutput::SwiGluBf16));
    v.push(all(false, false, GemmOutput::StoreBf16));
    let base = all(true, false, GemmOutput::SwiGlu);
    v.push(GemmVariant {
        split_w: true,
        ..base
    });
    v.push(GemmVariant {
        pcm_read: true,
        ..base
    });
    v.push(GemmVariant {
        ir_drop: true,
        ..base
    });
    v.push(GemmVariant {
        out_noise: true,
        ..base
    });
    v.push(GemmVariant { adc: true, ..base });
    v.push(GemmVariant {
        out_noise: true,
        noise_quads: false,
        ..base
    });
    v.push(GemmVariant {
        additive: true,
        out_noise: true,
        ..base
    });
    // Bound management runs in store mode: with everything else, and as the AIHWKIT default
    // (ABS_MAX, ADC, output noise) and pcm-3d-8tier (plus PCM_READ) configure it.
    let store = all(true, true, GemmOutput::Store);
    v.push(GemmVariant {
        bound_management: true,
        ..store
    });
    v.push(GemmVariant {
        bound_management: true,
        pcm_read: false,
        ir_drop: false,
        ..store
    });
    v.push(GemmVariant {
        bound_management: true,
        additive: true,
        pcm_read: false,
        ir_drop: false,
        ..store
    });
    // Split weights with output noise and ADC (standard-hwa without its PCM_READ and IR drop).
    v.push(GemmVariant {
        split_w: true,
        out_noise: true,
        adc: true,
        ..base
    });
    // GDC readouts through each crossbar block: pcm-3d-8tier's periphery (bound-managed), and
    // everything on (IR drop's row factors start at the tile's K range).
    v.push(GemmVariant {
        bound_management: true,
        ir_drop: false,
        block_readout: true,
        ..store
    });
    v.push(GemmVariant {
        block_readout: true,
        ..store
    });
    // The attempt passes of each bound-managed variant.
    let attempts: Vec<GemmVariant> = v
        .iter()
        .filter(|v| v.bound_management)
        .map(|v| GemmVariant {
            output: GemmOutput::BmAttempt,
            ..*v
        })
        .collect();
    v.extend(attempts);
    v.iter()
        .map(|v| gemm_defines(v, GemmTile::for_variant(v)))
        .collect()
}

/// Kernel parameters (layout of `GemmParams` in `kernels/analog_moe.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GemmParams {
    a: u64,
    a_alpha: u64,
    a_row_of: u64,
    w_hi: u64,
    w_lo: u64,
    offsets: u64,
    tile_offsets: u64,
    col_tensor_id: u64,
    col_scale: u64,
    col_local: u64,
    col_block_cols: u64,
    sorted_token: u64,
    sorted_weight: u64,
    out: u64,
    a_sumsq: u64,
    bm_slot: u64,
    bm_flag: u64,
    bm_scratch: u64,
    col_xbar: u64,
    noise_key: u64,
    bm_pending: u64,
    bm_sat: u64,
    seed: u64,
    k: u32,
    n: u32,
    n_kb: u32,
    k_block: u32,
    n_experts: u32,
    mvm_id: u32,
    n_xbar: u32,
    use_dac: u32,
    dac_step: f32,
    adc_step: f32,
    adc_bound: f32,
    out_noise: f32,
    w_noise_std: f32,
    ir_scale: f32,
    ir_k: f32,
    dac_max_code: f32,
    attempt: u32,
    diag_k: u32,
    diag_kb: u32,
}

// SAFETY: plain `repr(C)` data matching the CUDA struct field for field.
unsafe impl DeviceRepr for GemmParams {}

/// Size of the kernel parameter block of `moe_gemm` (checked against the
/// `.param` size in NVRTC's PTX by `tests/kernels_compile.rs`).
pub const GEMM_PARAMS_BYTES: usize = std::mem::size_of::<GemmParams>();

/// Bytes of block outputs ([`GemmOutput::BmAttempt`] scratch, f32 per flagged row, crossbar
/// block and column) bound management holds at once: the flagged rows are redone in groups
/// that fit (256 MiB: 8,192 rows of OLMoE's gate/up, 4 blocks × 2,048 columns).
const BM_SCRATCH_BYTES: usize = 256 << 20;

/// One grouped GEMM over the sorted pairs of `routing`.
///
/// `gather_tokens`: operand row of sorted pair p is its token (first layer); otherwise row p
/// itself (hidden rows in sorted order). `periphery = None` runs the digital variant. With
/// iterative bound management the output must be [`GemmOutput::Store`]: saturated rows are
/// flagged by `moe_gemm` and redone by [`GemmOutput::BmAttempt`] passes ([`GpuMoeLayer::forward`] composes
/// SwiGLU and the scatter-add after it).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<T: GemmOutElem>(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    input: &GemmInput<'_>,
    routing: &GpuRouting,
    gather_tokens: bool,
    periphery: Option<&GemmPeriphery>,
    seed: u64,
    mvm_id: u32,
    output: GemmOutput,
    out: &mut CudaSlice<T>,
) -> CudaResult<()> {
    let pairs = routing.n_tokens * routing.top_k;
    let out_len = match output {
        GemmOutput::Store | GemmOutput::BmAttempt | GemmOutput::StoreBf16 => pairs * m.n_cols,
        GemmOutput::SwiGlu | GemmOutput::SwiGluBf16 => pairs * m.n_cols / 2,
        GemmOutput::ScatterAdd => routing.n_tokens * m.n_cols,
    };
    if T::BF16 != output.bf16() || (output.bf16() && m.precision != Precision::DigitalBf16) {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM: output {output:?} into {} elements of {:?} weights (bf16 rows are for \
             digital layers, into u16)",
            if T::BF16 { "bf16" } else { "f32" },
            m.precision
        )));
    }
    let in_rows = if gather_tokens {
        routing.n_tokens
    } else {
        pairs
    };
    if out.len() != out_len
        || input.rows != in_rows
        || input.a.len() != in_rows * m.k
        || routing.n_experts != m.n_experts
        || periphery.is_some() != m.precision.analog()
    {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM: output {} (want {out_len}), input {}×? (want {in_rows}×{}), experts {} vs {}, \
             periphery {} for {:?}",
            out.len(),
            input.rows,
            m.k,
            routing.n_experts,
            m.n_experts,
            periphery.is_some(),
            m.precision
        )));
    }
    let p = periphery.copied();
    let bm = p.is_some_and(|p| p.bound_managed());
    let additive = p.is_some_and(|p| p.additive_std.is_some());
    if bm && (output != GemmOutput::Store || input.x.is_none()) {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM with bound management: needs store mode ({output:?}) and the unquantised input"
        )));
    }
    if output == GemmOutput::BmAttempt {
        return Err(CudaError::Unsupported(
            "grouped GEMM: bound-management attempts run inside a store-mode GEMM".into(),
        ));
    }
    if additive && input.sumsq.is_none() {
        return Err(CudaError::Unsupported(
            "grouped GEMM with ADDITIVE weight noise: the input has no ‖x̃‖² (quantize with the same periphery)".into(),
        ));
    }
    let variant = GemmVariant {
        analog: p.is_some(),
        split_w: m.precision == Precision::AnalogSplitF16,
        pcm_read: p.is_some_and(|p| p.pcm_read_std.is_some()),
        ir_drop: p.is_some_and(|p| p.ir_drop.is_some()),
        additive,
        bound_management: bm,
        out_noise: p.is_some_and(|p| p.out_noise > 0.0),
        adc: p.is_some_and(|p| p.adc.is_some()),
        output,
        noise_quads: m.noise_quads,
        block_readout: m.block_view.is_some(),
    };
    // Bound management: a flag per sorted row, set where an output saturated.
    let bm = bm && variant.adc;
    let bm_flags = if bm {
        Some(dev.zeros::<u32>(pairs.max(1))?)
    } else {
        None
    };
    // Raw pointers: all work is on this one stream and event tracking is off, so the guards
    // `device_ptr` returns have nothing to synchronise.
    let s = dev.stream();
    let bm_flag = bm_flags.as_ref().map_or(0, |f| f.device_ptr(s).0);
    let (dac_step, dac_max_code) = p.and_then(|p| p.dac).unwrap_or((1.0, 0.0));
    let params = GemmParams {
        a: input.a.device_ptr(s).0,
        a_alpha: input.alpha.device_ptr(s).0,
        a_row_of: if gather_tokens {
            routing.sorted_token.device_ptr(s).0
        } else {
            0
        },
        w_hi: m.w_hi.device_ptr(s).0,
        w_lo: m.w_lo.as_ref().map_or(0, |w| w.device_ptr(s).0),
        offsets: routing.offsets.device_ptr(s).0,
        tile_offsets: routing.tile_offsets.device_ptr(s).0,
        col_tensor_id: m.col_tensor_id.device_ptr(s).0,
        col_scale: m.col_scale.device_ptr(s).0,
        col_local: m.col_local.device_ptr(s).0,
        col_block_cols: m.col_block_cols.device_ptr(s).0,
        sorted_token: routing.sorted_token.device_ptr(s).0,
        sorted_weight: routing.sorted_weight.device_ptr(s).0,
        out: out.device_ptr(s).0,
        a_sumsq: input.sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0),
        bm_slot: 0,
        bm_flag,
        bm_scratch: 0,
        col_xbar: m.col_xbar.device_ptr(s).0,
        noise_key: routing.noise_key.as_ref().map_or(0, |k| k.device_ptr(s).0),
        bm_pending: 0,
        bm_sat: 0,
        seed,
        k: m.k as u32,
        n: m.n_cols as u32,
        n_kb: (m.k / m.k_block) as u32,
        k_block: m.k_block as u32,
        n_experts: m.n_experts as u32,
        mvm_id,
        n_xbar: m.n_xbar as u32,
        use_dac: u32::from(p.is_some_and(|p| p.dac.is_some())),
        dac_step,
        adc_step: p.and_then(|p| p.adc).map_or(1.0, |a| a.0),
        adc_bound: p.and_then(|p| p.adc).map_or(f32::MAX, |a| a.1),
        out_noise: p.map_or(0.0, |p| p.out_noise),
        w_noise_std: p
            .and_then(|p| p.pcm_read_std.or(p.additive_std))
            .unwrap_or(0.0),
        ir_scale: p.and_then(|p| p.ir_drop).map_or(0.0, |ir| ir.0),
        ir_k: p
            .and_then(|p| p.ir_drop)
            .map_or(0.0, |ir| m.k_block as f32 / ir.1),
        dac_max_code,
        attempt: 0,
        diag_k: m.block_view.map_or(0, |v| v.0 as u32),
        diag_kb: m.block_view.map_or(0, |v| v.1 as u32),
    };
    let wgmma = m.wgmma.filter(|_| variant.wgmma_ready());
    // The mma.sync tile (`AIMC_GEMM_TILE` applies to it alone; bound management's attempts
    // run on it after either kernel).
    let tile = match wgmma {
        Some(_) => GemmTile::for_variant(&variant),
        None => GemmTile::choose(&variant, m.n_cols)?,
    };
    let defines = gemm_defines(&variant, tile);
    match wgmma {
        Some(wg) => wgmma_gemm(dev, m, wg, routing, &variant, &params)?,
        None => mma_sync_gemm(dev, m, pairs, &defines, tile, &params)?,
    }
    if let (Some(flags), Some(p)) = (&bm_flags, p) {
        let attempt = GemmVariant {
            output: GemmOutput::BmAttempt,
            ..variant
        };
        let job = BmJob {
            m,
            input,
            routing,
            gather_tokens,
            periphery: &p,
            defines: gemm_defines(&attempt, tile),
            tile,
            params,
        };
        bound_management(dev, &job, flags)?;
    }
    // Dropping the flags frees them in stream order (cuMemFreeAsync on this stream), after
    // the kernels that use them.
    drop(bm_flags);
    Ok(())
}

/// The fixed inputs of [`crossbar_readout`] for `groups` crossbar blocks of `k_block` rows and
/// `n_cols` columns: the identity rows, every row routed to every block (row r of each block
/// is identity row r, which the kernel's `MOE_DIAG` relies on), digital scale 1. Built once
/// per shape and reused at every drift point: uploading and sorting them per matrix cost
/// host round trips.
pub struct IdentityReadout {
    k_block: usize,
    groups: usize,
    n_cols: usize,
    eye: CudaSlice<f32>,
    routing: GpuRouting,
    ones: Arc<CudaSlice<f32>>,
}

impl IdentityReadout {
    /// The inputs for the crossbars of `m` (`E·KB` blocks of `k_block` rows, `N` columns).
    pub fn for_matrix(dev: &CudaDevice, m: &GpuGroupedMatrix) -> CudaResult<Self> {
        let (kb, groups, n) = (m.k_block, m.n_experts * (m.k / m.k_block), m.n_cols);
        let mut eye = vec![0.0f32; kb * kb];
        for j in 0..kb {
            eye[j * kb + j] = 1.0;
        }
        let experts: Vec<u32> = (0..kb * groups).map(|p| (p % groups) as u32).collect();
        let routing = route(
            dev,
            &dev.upload(&experts)?,
            &dev.upload(&vec![1.0f32; kb * groups])?,
            kb,
            groups,
            groups,
        )?;
        Ok(Self {
            k_block: kb,
            groups,
            n_cols: n,
            eye: dev.upload(&eye)?,
            routing,
            ones: Arc::new(dev.upload(&vec![1.0f32; groups * n])?),
        })
    }

    /// Whether these are the inputs for `m`'s crossbars.
    pub fn fits(&self, m: &GpuGroupedMatrix) -> bool {
        (self.k_block, self.groups, self.n_cols)
            == (m.k_block, m.n_experts * (m.k / m.k_block), m.n_cols)
    }
}

/// The GDC readout of every crossbar of `m` (docs/model.md §3, global drift compensation): the
/// noisy identity forward of call `mvm_id` through each crossbar block along K, as
/// `tile::Crossbar` reads its crossbar out. Returns `[E·KB·k_block, N]`: row j of block
/// g = e·KB + kb is row g·k_block + j, the output of identity row j. Runs on `m`'s own operands
/// ([`GpuGroupedMatrix::crossbar_blocks`]), each row tile over the K range of its own rows
/// (`MOE_DIAG`: a quarter of the MMAs of 512-row crossbars).
pub fn crossbar_readout(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    inputs: &IdentityReadout,
    periphery: Option<&GemmPeriphery>,
    seed: u64,
    mvm_id: u32,
) -> CudaResult<CudaSlice<f32>> {
    if !m.precision.analog() || m.block_view.is_some() || !inputs.fits(m) {
        return Err(CudaError::Unsupported(format!(
            "GDC readout of a {:?} matrix (analog operands only) with inputs for {} blocks of \
             {}×{}",
            m.precision, inputs.groups, inputs.k_block, inputs.n_cols
        )));
    }
    let view = m.crossbar_blocks(&inputs.ones);
    let kb = m.k_block;
    let xq = quantize(dev, &inputs.eye, kb, kb, kb, periphery)?;
    let mut y = dev.scratch::<f32>(kb * inputs.groups * m.n_cols)?;
    grouped_gemm(
        dev,
        &view,
        &xq,
        &inputs.routing,
        true,
        periphery,
        seed,
        mvm_id,
        GemmOutput::Store,
        &mut y,
    )?;
    Ok(y)
}

/// One `moe_gemm` launch of `defines` on `tile` over the sorted rows (`pairs` of them).
fn mma_sync_gemm(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    pairs: usize,
    defines: &[(&'static str, i64)],
    tile: GemmTile,
    params: &GemmParams,
) -> CudaResult<()> {
    let f = dev.function(&ANALOG_MOE_CU, defines, "moe_gemm")?;
    let shared = tile.shared_bytes(m.precision.weight_operands()) as u32;
    let threads = tile.threads() as u32;
    allow_dynamic_shared(&f, "moe_gemm", threads, shared)?;
    // One CTA per (row tile, column tile), column tile fastest; an upper bound on the row
    // tiles (CTAs past the last tile return at once).
    let cfg = LaunchConfig {
        grid_dim: (
            ((pairs.div_ceil(TILE_ROWS) + m.n_experts) * (m.n_cols / tile.cols)) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    };
    dev.launch(&f, "moe_gemm", cfg, |b| {
        b.arg(params);
    })
}

/// The crossbars of bound-management slots that go again after an attempt, in place:
/// `pending` and `sat` are `[slots, KB, n_xbar]` (1: the crossbar ran in this attempt / one of
/// its outputs saturated); a crossbar stays pending when it ran, saturated, `again` holds
/// (β ≤ the preset's limit) and its block's α_nm (`alpha(slot, kb)`) is positive, as
/// `tile::Crossbar::forward_chunk`. Returns whether any is still pending.
fn bm_next_pending(
    pending: &mut [u8],
    sat: &[u8],
    n_kb: usize,
    n_xbar: usize,
    again: bool,
    alpha: impl Fn(usize, usize) -> f32,
) -> bool {
    let mut any = false;
    for (i, (p, &s)) in pending.iter_mut().zip(sat).enumerate() {
        let (slot, kb) = (i / (n_kb * n_xbar), i / n_xbar % n_kb);
        let keep = *p != 0 && s != 0 && again && alpha(slot, kb) > 0.0;
        *p = u8::from(keep);
        any |= keep;
    }
    any
}

/// A store-mode analog GEMM whose flagged rows bound management redoes.
struct BmJob<'j, 'x> {
    m: &'j GpuGroupedMatrix,
    input: &'j GemmInput<'x>,
    routing: &'j GpuRouting,
    gather_tokens: bool,
    periphery: &'j GemmPeriphery,
    /// `moe_gemm` in [`GemmOutput::BmAttempt`] mode, on the tile of the store pass.
    defines: [(&'static str, i64); 16],
    tile: GemmTile,
    /// The store pass's parameters.
    params: GemmParams,
}

/// Step 8 of docs/model.md §3, iterative bound management, for the rows the store pass flagged
/// (`flags`, one per sorted row), as tensor-core passes: attempt a re-encodes the operand rows
/// at α_nm·2^a ([`quantize_scaled`]) and reruns the GEMM over the row tiles holding a row with a
/// pending crossbar ([`GemmOutput::BmAttempt`]), drawing the output noise of attempt a; each
/// pending crossbar's outputs overwrite its slot in the scratch, and its saturation comes back
/// to the host, which keeps it pending while β = 2^a ≤ the preset's limit and α_nm > 0, as
/// `tile::Crossbar::forward_chunk` does per crossbar. Then `bm_combine` sums each redone row's
/// blocks in K-block order into the store output. Flagged rows go in groups whose scratch fits
/// [`BM_SCRATCH_BYTES`].
fn bound_management(
    dev: &CudaDevice,
    job: &BmJob<'_, '_>,
    flags: &CudaSlice<u32>,
) -> CudaResult<()> {
    let m = job.m;
    let pairs = job.routing.n_tokens * job.routing.top_k;
    let flag_host = dev.download(flags)?;
    let flagged: Vec<u32> = (0..pairs as u32)
        .filter(|&p| flag_host[p as usize] != 0)
        .collect();
    if flagged.is_empty() {
        return Ok(());
    }
    let x = job.input.x.ok_or_else(|| {
        CudaError::Unsupported("bound management needs the unquantised input rows".into())
    })?;
    let limit = job.periphery.bm_limit.unwrap_or(0.0);
    let (n, n_kb, n_xbar) = (m.n_cols, m.k / m.k_block, m.n_xbar);
    // α_nm of every sorted row's blocks: a block at α_nm = 0 accepts its first outputs.
    let alpha = dev.download(&job.input.alpha)?;
    let row_of: Vec<u32> = if job.gather_tokens {
        dev.download(&job.routing.sorted_token)?
    } else {
        (0..pairs as u32).collect()
    };
    let group = (BM_SCRATCH_BYTES / (n_kb * n * std::mem::size_of::<f32>())).max(1);
    let s = dev.stream();
    let combine = dev.function(&ANALOG_MOE_CU, &[], "bm_combine")?;
    for rows in flagged.chunks(group) {
        let slots = rows.len();
        let mut slot_of = vec![-1i32; pairs];
        for (slot, &pos) in rows.iter().enumerate() {
            slot_of[pos as usize] = slot as i32;
        }
        let slot_dev = dev.upload(&slot_of)?;
        let pos_dev = dev.upload(rows)?;
        let per_slot = n_kb * n_xbar;
        let mut pending = vec![1u8; slots * per_slot];
        let y = dev.scratch::<f32>(slots * n_kb * n)?;
        let mut beta = 1.0f32;
        for attempt in 0..=u32::from(u8::MAX) {
            let mut live = vec![0u32; pairs];
            for (slot, &pos) in rows.iter().enumerate() {
                live[pos as usize] =
                    u32::from(pending[slot * per_slot..(slot + 1) * per_slot].contains(&1));
            }
            let live_dev = dev.upload(&live)?;
            let pending_dev = dev.upload(&pending)?;
            let sat = dev.zeros::<u8>(pending.len())?;
            // Attempt 0 (β = 1) runs on the store pass's operand rows.
            let scaled;
            let xq = if attempt == 0 {
                job.input
            } else {
                scaled = quantize_scaled(
                    dev,
                    x,
                    job.input.rows,
                    m.k,
                    m.k_block,
                    Some(job.periphery),
                    beta,
                )?;
                &scaled
            };
            let params = GemmParams {
                a: xq.a.device_ptr(s).0,
                a_alpha: xq.alpha.device_ptr(s).0,
                a_sumsq: xq.sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0),
                bm_slot: slot_dev.device_ptr(s).0,
                bm_flag: live_dev.device_ptr(s).0,
                bm_scratch: y.device_ptr(s).0,
                bm_pending: pending_dev.device_ptr(s).0,
                bm_sat: sat.device_ptr(s).0,
                attempt,
                ..job.params
            };
            mma_sync_gemm(dev, m, pairs, &job.defines, job.tile, &params)?;
            let sat = dev.download(&sat)?;
            let alpha_of =
                |slot: usize, kb: usize| alpha[row_of[rows[slot] as usize] as usize * n_kb + kb];
            if !bm_next_pending(&mut pending, &sat, n_kb, n_xbar, beta <= limit, alpha_of) {
                break;
            }
            beta *= 2.0;
        }
        let (slots32, kb32, n32) = (slots as u32, n_kb as u32, n as u32);
        let out = job.params.out;
        dev.launch(
            &combine,
            "bm_combine",
            linear_launch((slots * n) as u64),
            |b| {
                b.arg(&y)
                    .arg(&pos_dev)
                    .arg(&slots32)
                    .arg(&kb32)
                    .arg(&n32)
                    .arg(&out);
            },
        )?;
    }
    Ok(())
}

/// Lets `f` (kernel `name`, launched with `threads` threads) use `shared` bytes of dynamic
/// shared memory, beyond the 48 KiB default; a refusal names the kernel and the size.
pub(crate) fn allow_dynamic_shared(
    f: &CudaFunction,
    name: &str,
    threads: u32,
    shared: u32,
) -> CudaResult<()> {
    // SAFETY: raising the dynamic shared-memory limit of a loaded function.
    unsafe {
        cudarc::driver::result::function::set_function_attribute(
            f.cu_function(),
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
    }
    .map_err(|source| CudaError::Kernel {
        kernel: name.into(),
        grid: (0, 0, 0),
        block: (threads, 1, 1),
        shared_bytes: shared,
        source,
    })
}

/// The sm_90a GEMMs (`moe_gemm_wgmma`, kernels/analog_moe.cu): 128 × `tile.cols` CTA tiles,
/// two warpgroups issuing wgmma from 128B-swizzled shared memory; digital on any of the
/// [`WgmmaTile`] schedules, analog (`variant.analog`) on [`analog_wgmma_tile`]'s.
fn wgmma_gemm(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    tile: WgmmaTile,
    routing: &GpuRouting,
    variant: &GemmVariant,
    params: &GemmParams,
) -> CudaResult<()> {
    let output = variant.output;
    let analog_ok = analog_wgmma_tile(m.k_block, variant.weight_operands()) == Some(tile);
    if variant.analog != m.precision.analog()
        || (variant.analog && !(analog_ok && variant.wgmma_ready()))
        || dev.compute_capability() != (9, 0)
        || !m.k.is_multiple_of(WGMMA_TILE_K)
    {
        return Err(CudaError::Unsupported(format!(
            "the wgmma grouped GEMM runs digital bf16 weights on any tile, analog ones without \
             side accumulators on the analog tile (here {:?} weights, {variant:?}, tile \
             {tile:?}, crossbar rows {}), on an sm_90 device (sm_{}{}) with K a multiple of \
             {WGMMA_TILE_K} ({})",
            m.precision,
            m.k_block,
            dev.compute_capability().0,
            dev.compute_capability().1,
            m.k,
        )));
    }
    tile.check(m.n_cols)?;
    let tile = tile.for_output(output.mode());
    let slab_cols = scatter_slab_cols(m.k, routing.top_k);
    let defines = if variant.analog {
        analog_wgmma_defines(variant, tile, m.k_block, slab_cols)
    } else {
        tile.defines(output.mode(), slab_cols).to_vec()
    };
    let name = if variant.analog {
        "moe_analog_wgmma"
    } else {
        "moe_gemm_wgmma"
    };
    let f = dev.function(&ANALOG_MOE_CU, &defines, name)?;
    let shared = tile.shared_bytes(m.n_experts, variant.weight_operands())
        + if variant.analog { ANALOG_PREV_BYTES } else { 0 };
    if shared > MAX_SHARED_BYTES {
        return Err(CudaError::Unsupported(format!(
            "wgmma GEMM tile {tile:?} with {} experts needs {shared} B of shared memory, at most \
             {MAX_SHARED_BYTES}",
            m.n_experts
        )));
    }
    let shared = shared as u32;
    let threads = tile.threads();
    allow_dynamic_shared(&f, name, threads, shared)?;
    let pairs = routing.n_tokens * routing.top_k;
    // A bound on the row tiles (the routing's count lives on the device): the one-tile kernels
    // return past the last, the persistent ones walk them with as many CTAs as are resident.
    let tiles = (pairs.div_ceil(TILE_ROWS) + m.n_experts) * (m.n_cols / tile.cols);
    let block = (threads, 1, 1);
    let grid = match tile.pipe {
        0 | 1 => tiles,
        2 => tiles.min(match tile.ctas {
            0 => dev.sm_count() as usize,
            c => c,
        }),
        _ => {
            let clusters = match tile.ctas {
                0 => max_active_clusters(dev, &f, block, shared)?,
                c => c.div_ceil(2),
            };
            2 * clusters.min(tiles.div_ceil(2))
        }
    };
    let cfg = LaunchConfig {
        grid_dim: (grid.max(tile.cluster()) as u32, 1, 1),
        block_dim: block,
        shared_mem_bytes: shared,
    };
    if tile.pipe >= 2 {
        let map = weight_tensor_map(m, tile)?;
        dev.launch(&f, name, cfg, |b| {
            b.arg(params).arg(&map);
        })
    } else {
        dev.launch(&f, name, cfg, |b| {
            b.arg(params);
        })
    }
}

/// A `CUtensorMap` as the kernel parameter `TmaMap` (128 opaque bytes, 64-byte aligned).
#[repr(C, align(64))]
struct TmaMap([u64; 16]);
// SAFETY: plain bytes, passed by value as the kernel's `const __grid_constant__ TmaMap`.
unsafe impl DeviceRepr for TmaMap {}

/// The TMA descriptor of `m`'s bf16 weights as a `[E·N, K]` matrix, boxes of 64 K values ×
/// the rows one CTA loads per stage (`cols`, or half of them when a cluster of two shares the
/// tile), 128-byte swizzle (the layout `wg_swizzle` writes and the wgmma descriptors read).
fn weight_tensor_map(m: &GpuGroupedMatrix, tile: WgmmaTile) -> CudaResult<TmaMap> {
    use cudarc::driver::sys;
    let rows = (m.n_experts * m.n_cols) as u64;
    let dims = [m.k as u64, rows];
    let strides = [(m.k * 2) as u64];
    let boxes = [WGMMA_TILE_K as u32, (tile.cols / tile.cluster()) as u32];
    let elem_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let (ptr, _sync) = m.w_hi.device_ptr(m.w_hi.stream());
    // SAFETY: every array has the rank (2) entries the call reads; the weights outlive the
    // launch that uses the map (they belong to `m`).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(|source| CudaError::Driver {
        what: format!(
            "encoding the TMA descriptor of a [{rows}, {}] bf16 weight matrix (box {boxes:?})",
            m.k
        ),
        source,
    })?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    let mut out = TmaMap([0; 16]);
    out.0.copy_from_slice(&map.opaque);
    Ok(out)
}

/// Clusters of `f` (compiled with `__cluster_dims__`) that can be resident at once with
/// `block` threads and `shared` bytes each: the grid of a persistent clustered kernel (a
/// GPC's SMs pair up, so this can be below half the SMs).
fn max_active_clusters(
    dev: &CudaDevice,
    f: &CudaFunction,
    block: (u32, u32, u32),
    shared: u32,
) -> CudaResult<usize> {
    use cudarc::driver::sys;
    let config = sys::CUlaunchConfig {
        gridDimX: 2 * dev.sm_count(),
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: shared,
        hStream: dev.stream().cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `config` names no attributes; `f` is a loaded function of this context.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) };
    r.result().map_err(|source| CudaError::Driver {
        what: "querying how many 2-CTA clusters of moe_gemm_wgmma fit at once".into(),
        source,
    })?;
    if n < 1 {
        return Err(CudaError::Unsupported(format!(
            "no 2-CTA cluster of moe_gemm_wgmma ({} threads, {shared} B of shared memory) fits \
             on {}",
            block.0,
            dev.name()
        )));
    }
    Ok(n as usize)
}

/// `[P, N]` store-mode rows with interleaved gate/up columns → SwiGLU `[P, N/2]`.
fn swiglu_rows(
    dev: &CudaDevice,
    gu: &CudaSlice<f32>,
    rows: usize,
    n: usize,
) -> CudaResult<CudaSlice<f32>> {
    let mut h = dev.scratch::<f32>(rows * n / 2)?;
    let f = dev.function(&ANALOG_MOE_CU, &[], "swiglu_rows")?;
    let (r64, half) = (rows as u64, (n / 2) as u32);
    dev.launch(
        &f,
        "swiglu_rows",
        linear_launch(r64 * u64::from(half)),
        |b| {
            b.arg(gu).arg(&r64).arg(&half).arg(&mut h);
        },
    )?;
    Ok(h)
}

/// `y[token of p] += weight of p · rows[p]` for `[P, n]` store-mode rows.
fn scatter_rows(
    dev: &CudaDevice,
    rows_buf: &CudaSlice<f32>,
    routing: &GpuRouting,
    n: usize,
    y: &mut CudaSlice<f32>,
) -> CudaResult<()> {
    let f = dev.function(&ANALOG_MOE_CU, &[], "scatter_rows")?;
    let (r64, n32) = ((routing.n_tokens * routing.top_k) as u64, n as u32);
    dev.launch(
        &f,
        "scatter_rows",
        linear_launch(r64 * u64::from(n32)),
        |b| {
            b.arg(rows_buf)
                .arg(&r64)
                .arg(&n32)
                .arg(&routing.sorted_token)
                .arg(&routing.sorted_weight)
                .arg(y);
        },
    )
}

/// `y[t] = Σ_j w_j · rows[pos_j]` (`[T, n]` f32) over each token's k pairs in slot order, from
/// the bf16 expert rows of a [`GemmOutput::StoreBf16`] GEMM (`[P, n]` in sorted order; pair
/// (t, j) at sorted row pos_j, router weight w_j): the digital layer's deterministic combine.
pub fn combine_bf16_rows(
    dev: &CudaDevice,
    rows: &CudaSlice<u16>,
    routing: &GpuRouting,
    n: usize,
) -> CudaResult<CudaSlice<f32>> {
    let (t, k) = (routing.n_tokens, routing.top_k);
    let pairs = t * k;
    if !n.is_multiple_of(8) || rows.len() != pairs * n {
        return Err(CudaError::Unsupported(format!(
            "combining {} bf16 expert outputs into {t} rows of {n} (a multiple of 8) from {pairs} pairs",
            rows.len()
        )));
    }
    let pos = routing.pos_of_pair(dev)?;
    let mut y = dev.scratch::<f32>(t * n)?;
    let f = dev.function(&ANALOG_MOE_CU, &[], "combine_bf16_rows")?;
    let (t32, k32, n32) = (t as u32, k as u32, n as u32);
    dev.launch(
        &f,
        "combine_bf16_rows",
        linear_launch((t * n / 8) as u64),
        |b| {
            b.arg(rows)
                .arg(&pos)
                .arg(&routing.sorted_weight)
                .arg(&t32)
                .arg(&k32)
                .arg(&n32)
                .arg(&mut y);
        },
    )?;
    Ok(y)
}

/// How the digital layer sums each token's k expert outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigitalCombine {
    /// The down GEMM's epilogue adds w·y into the zeroed f32 output by atomics (in column slabs
    /// where [`scatter_slab_cols`] says so); the order of the adds varies run to run.
    ScatterAdd,
    /// The down GEMM stores each expert's output rounded to bf16 (`[P, d]`, as frameworks keep
    /// expert outputs) and [`combine_bf16_rows`] sums each token's rows in slot order, in f32:
    /// no read-modify-write of the f32 output per expert, and deterministic.
    Bf16Rows,
}

impl DigitalCombine {
    /// The faster for `top_k` experts per token, measured per GEMM on the H100
    /// (reports/bench/2026-11-24-epilogue.md): with the down GEMM's bf16 rows stored 16 bytes
    /// per lane, rows + combine beat the f32 scatter-add wherever a token has 4 or more expert
    /// outputs (OLMoE, top-8: 0.86 + 0.23 ms against 1.44; fine-grained, top-8: 0.40 + 0.26 ms
    /// against 0.90 in column slabs), whose read-modify-writes of the f32 output leave the
    /// L2 between a token's experts. At top-2 (Mixtral) the scatter-add stays.
    /// `AIMC_DIGITAL_COMBINE=scatter|rows` forces one (a tuning knob for `aimc bench`).
    pub fn for_layer(top_k: usize) -> Self {
        match std::env::var("AIMC_DIGITAL_COMBINE").as_deref() {
            Ok("scatter") => return Self::ScatterAdd,
            Ok("rows") => return Self::Bf16Rows,
            _ => {}
        }
        if top_k >= 4 {
            Self::Bf16Rows
        } else {
            Self::ScatterAdd
        }
    }
}

/// One MoE expert layer (SwiGLU experts) on the GPU, analog or digital.
pub struct GpuMoeLayer {
    /// Interleaved gate/up matrices `[E, 2n, d]`.
    pub gate_up: GpuGroupedMatrix,
    /// Down matrices `[E, d, n]`.
    pub down: GpuGroupedMatrix,
    /// Periphery (`None`: digital baseline).
    pub periphery: Option<GemmPeriphery>,
    /// Seed of the per-MVM noise streams.
    pub seed: u64,
}

impl GpuMoeLayer {
    /// y = Σ_k w_k · down_e(SwiGLU(gate_up_e(x))) for the routed pairs; x `[T, d]` → `[T, d]`.
    ///
    /// Without bound management SwiGLU and the scatter-add are fused into the GEMM epilogues;
    /// with it each GEMM stores its rows, bound management redoes the saturated ones, and SwiGLU
    /// and the scatter-add run after.
    pub fn forward(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<f32>,
        routing: &GpuRouting,
        mvm_id: u32,
    ) -> CudaResult<CudaSlice<f32>> {
        let combine = DigitalCombine::for_layer(routing.top_k);
        self.forward_with(dev, x, routing, mvm_id, combine)
    }

    /// [`GpuMoeLayer::forward`] with the digital layer's expert outputs summed per `combine`
    /// (analog layers always scatter-add).
    pub fn forward_with(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<f32>,
        routing: &GpuRouting,
        mvm_id: u32,
        combine: DigitalCombine,
    ) -> CudaResult<CudaSlice<f32>> {
        let (t, d, n) = (routing.n_tokens, self.gate_up.k, self.down.k);
        let pairs = t * routing.top_k;
        let p = self.periphery.as_ref();
        let bm = p.is_some_and(GemmPeriphery::bound_managed);
        let gemm = |m: &GpuGroupedMatrix,
                    input: &GemmInput<'_>,
                    gather: bool,
                    output: GemmOutput,
                    out: &mut CudaSlice<f32>| {
            grouped_gemm(
                dev, m, input, routing, gather, p, self.seed, mvm_id, output, out,
            )
        };
        let xq = quantize(dev, x, t, d, self.gate_up.k_block, p)?;
        // Digital: the SwiGLU epilogue writes the down GEMM's bf16 operand itself. Analog: f32
        // hidden rows, then noise management and DAC (bound management keeps them for 2β).
        let h = if p.is_none() {
            None
        } else if bm {
            let mut gu = dev.scratch::<f32>(pairs * 2 * n)?;
            gemm(&self.gate_up, &xq, true, GemmOutput::Store, &mut gu)?;
            Some(swiglu_rows(dev, &gu, pairs, 2 * n)?)
        } else {
            let mut h = dev.scratch::<f32>(pairs * n)?;
            gemm(&self.gate_up, &xq, true, GemmOutput::SwiGlu, &mut h)?;
            Some(h)
        };
        let hq = match &h {
            Some(h) => quantize(dev, h, pairs, n, self.down.k_block, p)?,
            None => {
                let mut a = dev.scratch::<u16>(pairs * n)?;
                grouped_gemm(
                    dev,
                    &self.gate_up,
                    &xq,
                    routing,
                    true,
                    None,
                    self.seed,
                    mvm_id,
                    GemmOutput::SwiGluBf16,
                    &mut a,
                )?;
                GemmInput {
                    a,
                    alpha: dev.zeros::<f32>(1)?,
                    sumsq: None,
                    x: None,
                    rows: pairs,
                }
            }
        };
        if p.is_none() && combine == DigitalCombine::Bf16Rows {
            let mut rows = dev.scratch::<u16>(pairs * d)?;
            grouped_gemm(
                dev,
                &self.down,
                &hq,
                routing,
                false,
                None,
                self.seed,
                mvm_id,
                GemmOutput::StoreBf16,
                &mut rows,
            )?;
            return combine_bf16_rows(dev, &rows, routing, d);
        }
        let mut y = dev.zeros::<f32>(t * d)?;
        if bm {
            let mut rows = dev.scratch::<f32>(pairs * d)?;
            gemm(&self.down, &hq, false, GemmOutput::Store, &mut rows)?;
            scatter_rows(dev, &rows, routing, d, &mut y)?;
        } else {
            gemm(&self.down, &hq, false, GemmOutput::ScatterAdd, &mut y)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(analog: bool, pcm_read: bool) -> GemmVariant {
        GemmVariant {
            analog,
            split_w: analog,
            pcm_read,
            ir_drop: false,
            additive: false,
            bound_management: false,
            out_noise: analog,
            adc: analog,
            output: GemmOutput::SwiGlu,
            noise_quads: true,
            block_readout: false,
        }
    }

    #[test]
    fn digital_combine_is_bf16_rows_at_top_4_or_more() {
        if std::env::var_os("AIMC_DIGITAL_COMBINE").is_some() {
            return; // forced
        }
        // OLMoE and fine-grained (top-8), Mixtral (top-2), top-4.
        assert_eq!(DigitalCombine::for_layer(8), DigitalCombine::Bf16Rows);
        assert_eq!(DigitalCombine::for_layer(2), DigitalCombine::ScatterAdd);
        assert_eq!(DigitalCombine::for_layer(4), DigitalCombine::Bf16Rows);
    }

    #[test]
    fn bound_management_keeps_only_saturated_crossbars_that_may_go_again() {
        // 2 slots × 2 K blocks × 2 crossbars; slot 1's block 0 has α_nm = 0.
        let alpha = |slot: usize, kb: usize| if (slot, kb) == (1, 0) { 0.0 } else { 0.5 };
        let mut pending = vec![1, 1, 1, 0, 1, 1, 1, 1];
        let sat = vec![1, 0, 1, 1, 1, 1, 0, 1];
        assert!(bm_next_pending(&mut pending, &sat, 2, 2, true, alpha));
        assert_eq!(pending, vec![1, 0, 1, 0, 0, 0, 0, 1]);
        // β past the limit: every crossbar accepts its outputs.
        assert!(!bm_next_pending(&mut pending, &[1; 8], 2, 2, false, alpha));
        assert_eq!(pending, vec![0; 8]);
    }

    #[test]
    fn analog_wgmma_tile_fits_the_crossbar_rows_and_shared_memory() {
        // Split weights: 3 stages of A (128 rows) + hi and lo (128 rows each) × 128 bytes;
        // single fp16 weights: 4 stages of 256 rows. Both under the 227 KiB limit with the
        // previous block's 64 KiB of sums.
        let split = analog_wgmma_tile(512, 2).unwrap();
        assert_eq!(split, WgmmaTile::new(128, 3, 0));
        assert_eq!(split.shared_bytes(64, 2), 3 * 384 * 128 + 1024);
        let single = analog_wgmma_tile(256, 1).unwrap();
        assert_eq!(single.shared_bytes(64, 1), 4 * 256 * 128 + 1024);
        for (t, nb) in [(split, 2), (single, 1)] {
            assert!(t.shared_bytes(1, nb) + ANALOG_PREV_BYTES <= MAX_SHARED_BYTES);
            t.check(1024).unwrap();
        }
        // Crossbar blocks must be whole 64-row wgmma steps.
        assert_eq!(analog_wgmma_tile(250, 2), None);
        assert_eq!(analog_wgmma_tile(0, 2), None);
        let v = |pcm_read, ir_drop, output| GemmVariant {
            analog: true,
            split_w: true,
            pcm_read,
            ir_drop,
            additive: false,
            bound_management: false,
            out_noise: true,
            adc: true,
            output,
            noise_quads: true,
            block_readout: false,
        };
        assert!(v(false, false, GemmOutput::ScatterAdd).wgmma_ready());
        assert!(!v(true, false, GemmOutput::Store).wgmma_ready());
        assert!(!v(false, true, GemmOutput::Store).wgmma_ready());
        let defines =
            analog_wgmma_defines(&v(false, false, GemmOutput::ScatterAdd), split, 512, 256);
        assert!(defines.contains(&("MOE_KB_STEPS", 8)));
        assert!(defines.contains(&("MOE_SLAB_COLS", 256)));
        assert!(defines.contains(&("MOE_ANALOG", 1)));
    }

    #[test]
    fn wgmma_tiles_parse_check_and_default() {
        let tile = WgmmaTile::new;
        let t = WgmmaTile::parse("256, 4,1").unwrap();
        assert_eq!(t, tile(256, 4, 1));
        for bad in ["256,4", "256,4,1,0", "a,4,1", ""] {
            assert!(WgmmaTile::parse(bad).is_err(), "{bad:?}");
        }
        // 4 stages of 128 + 256 rows × 128 bytes, plus the 1 KiB alignment slack.
        assert_eq!(t.shared_bytes(64, 1), 4 * 384 * 128 + 1024);
        assert_eq!((t.threads(), t.cluster()), (256, 1));
        t.check(2048).unwrap();
        assert!(t.check(128 * 3).is_err()); // 256 does not divide N
                                            // The warp-specialised kernels: 384 threads, two mbarriers per stage, and for the
                                            // clustered one 2 CTAs and a row-tile-pair offset per expert and one more.
        let ws = WgmmaTile::parse("256,4,2").unwrap();
        assert_eq!((ws.threads(), ws.cluster()), (384, 1));
        assert_eq!(ws.shared_bytes(64, 1), 4 * 384 * 128 + 1024 + 64);
        let cl = WgmmaTile::parse("256,4,3").unwrap();
        assert_eq!((cl.threads(), cl.cluster()), (384, 2));
        assert_eq!(cl.shared_bytes(64, 1), 4 * 384 * 128 + 1024 + 64 + 4 * 65);
        ws.check(2048).unwrap();
        cl.check(2048).unwrap();
        tile(128, 3, 2).check(2048).unwrap();
        let bad_tiles = [
            (192, 4, 1), // no such wgmma width
            (128, 2, 1), // pipelining needs a third stage
            (128, 2, 2), // so does the producer's lag
            (128, 2, 3), // and the clustered one's
            (128, 4, 4), // no such pipeline
            (256, 5, 1), // 241 KiB of shared memory
        ];
        for (cols, stages, pipe) in bad_tiles {
            let t = tile(cols, stages, pipe);
            assert!(t.check(2048).is_err(), "{t:?}");
        }
        let mode = |t: WgmmaTile, m: i64| {
            t.defines(m, 0)
                .iter()
                .find(|d| d.0 == "MOE_MODE")
                .unwrap()
                .1
        };
        assert_eq!(mode(t, 3), 3);
        // Slabs only for the scatter-add.
        let slab = |m: i64| {
            t.defines(m, 256)
                .iter()
                .find(|d| d.0 == "MOE_SLAB_COLS")
                .unwrap()
                .1
        };
        assert_eq!((slab(2), slab(3)), (256, 0));
        if std::env::var_os("AIMC_SCATTER_SLAB_COLS").is_none() {
            // The byte-count rule: the fine-grained layer (k 256, top-8) in slabs, OLMoE's
            // (k 1024) and Mixtral's (k 14336, top-2) not; top-1 never (no second addition).
            assert_eq!(scatter_slab_cols(256, 8), 256);
            assert_eq!(scatter_slab_cols(1024, 8), 0);
            assert_eq!(scatter_slab_cols(14336, 2), 0);
            assert_eq!(scatter_slab_cols(64, 1), 0);
        }
        if std::env::var_os("AIMC_WGMMA_TILE").is_none() {
            // (columns, pipe, scatter-add pipe) and, as the scatter-add runs, its pipe.
            let chosen = |n, k| {
                WgmmaTile::choose(n, k)
                    .unwrap()
                    .map(|t| (t.cols, t.pipe, t.scatter_pipe, t.for_output(2).pipe))
            };
            assert_eq!(chosen(2048, 2048), Some((256, 3, 1, 1)));
            assert_eq!(chosen(2048, 4096), Some((256, 3, 3, 3)));
            assert_eq!(chosen(384, 4096), Some((128, 1, 1, 1)));
            assert_eq!(chosen(96, 2048), None);
            // An unfit scatter-add schedule fails the check too.
            let mut t = tile(256, 3, 1);
            t.scatter_pipe = 4;
            assert!(t.check(2048).is_err());
        }
    }

    #[test]
    fn default_tiles_fit_every_width_the_uploads_accept() {
        // Uploads accept N = any multiple of TILE_COLS.
        for v in [
            variant(false, false),
            variant(true, false),
            variant(true, true),
        ] {
            let tile = GemmTile::for_variant(&v);
            for n in [TILE_COLS, 3 * TILE_COLS, 28672] {
                tile.check(n, v.weight_operands()).unwrap();
            }
            // The kernel's per-thread loader and warp-fragment conditions.
            assert_eq!((TILE_ROWS * 4) % tile.threads(), 0);
            assert_eq!((tile.cols / tile.warps_n / 8) % 2, 0, "{tile:?}");
        }
    }

    #[test]
    fn tile_override_parses_four_numbers_or_names_the_format() {
        assert_eq!(
            GemmTile::parse("64, 4,2,3").unwrap(),
            GemmTile {
                cols: 64,
                warps_m: 4,
                warps_n: 2,
                stages: 3
            }
        );
        for bad in ["", "64,4,2", "64,4,2,3,1", "64,4,x,3", "-64,4,2,3"] {
            let err = GemmTile::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("want cols,warps_m,warps_n,stages"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unfit_tiles_are_refused_before_compiling() {
        let t = |cols, warps_m, warps_n, stages| GemmTile {
            cols,
            warps_m,
            warps_n,
            stages,
        };
        // 256 columns do not divide N = 384.
        assert!(t(256, 2, 4, 3).check(384, 1).is_err());
        assert!(t(128, 2, 4, 3).check(384, 1).is_ok());
        // 8 stages of 128 + 2·256 rows × 80 B = 400 KiB > 227 KiB.
        let err = t(256, 2, 4, 8).check(1024, 2).unwrap_err().to_string();
        assert!(err.contains("409600 B of shared memory"), "{err}");
        // 3 warps along M do not tile 128 rows in m16 fragments; 1 stage is no pipeline.
        assert!(t(128, 3, 2, 3).check(1024, 1).is_err());
        assert!(t(128, 2, 4, 1).check(1024, 1).is_err());
        assert!(t(128, 0, 4, 3).check(1024, 1).is_err());
    }
}

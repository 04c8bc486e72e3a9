//! CTA tile shapes of the grouped GEMMs and their overrides: the mma.sync tile ([`GemmTile`],
//! `AIMC_GEMM_TILE`), the sm_90a wgmma tile ([`WgmmaTile`], `AIMC_WGMMA_TILE`), the analog
//! wgmma tile ([`analog_wgmma_tile`]) and the scatter-add slabs ([`scatter_slab_cols`]), with
//! the shared-memory and width checks that refuse a tile before anything is compiled.
//!
//! Mirrors the `MOE_TILE_*`, `MOE_WARPS_*`, `MOE_STAGES` macros of `kernels/gemm_common.cuh` and
//! the `WG_*` macros of `kernels/gemm_wgmma.cuh`.

use super::variant::{GemmVariant, IR_TABLE_ROWS};
use crate::backend::cuda::{CudaError, CudaResult};

/// Rows (tokens) per CTA tile of the grouped GEMM (`BM` in the kernel), for every variant: the
/// routing counts tiles in these units.
pub const TILE_ROWS: usize = 128;
/// Matrix widths must be multiples of this (the widest output tile the host picks by default).
pub const TILE_COLS: usize = 128;
/// The shortest K per pipeline stage (`BK`): crossbar rows per block must be multiples of it.
pub const TILE_K: usize = 32;
/// The longer K step the analog tiles take where the crossbar rows allow it
/// ([`GemmTile::for_k_block`]).
pub const TILE_K_LONG: usize = 64;
/// Shared-memory padding per row in halves (`LDS` = `BK` + 8): 16 bytes shift consecutive
/// rows by one bank quad, so the 8 rows of an ldmatrix land on distinct banks for either K
/// step (80- and 144-byte strides).
const SMEM_ROW_PAD_HALVES: usize = 8;
/// Dynamic shared memory one CTA may use on sm_80 / sm_90 (227 KiB).
pub(crate) const MAX_SHARED_BYTES: usize = 227 * 1024;

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
/// warp grid, cp.async pipeline depth and K per stage (`MOE_TILE_N`, `MOE_WARPS_M`,
/// `MOE_WARPS_N`, `MOE_STAGES`, `MOE_BK`).
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
    /// Columns of K per stage: [`TILE_K`] or [`TILE_K_LONG`].
    pub k_step: usize,
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
                k_step: TILE_K,
            };
        }
        // The side-accumulator variants keep the 3 stages they were measured with.
        Self {
            cols: 64,
            warps_m: 4,
            warps_n: 2,
            stages: if v.pcm_read || v.ir_drop { 3 } else { 4 },
            k_step: TILE_K,
        }
    }

    /// The default tile of `v` for crossbars of `k_block` rows: [`Self::for_variant`], with
    /// [`TILE_K_LONG`] columns of K per stage for the analog variants where `k_block` is a
    /// multiple of it. Each stage costs the K loop a barrier, the cp.async issue and the
    /// ldmatrix addressing, which the register bound makes ptxas recompute per stage; at 32
    /// columns they were half of the loop's instructions beside its 16 MMAs (the budget in
    /// `docs/gpu.md`). Three stages of 64 columns (81 KiB) keep more of K in flight than four
    /// of 32 and leave room for two CTAs per multiprocessor. The side-accumulator variants
    /// (PCM_READ, IR drop) keep their running total in shared memory to take it
    /// ([`GemmVariant::total_in_shared`]; standard-hwa on the OLMoE layer: 26.5 against
    /// 28.6 ms, `reports/bench/2026-12-07-analog-wgmma-default.md`). Not where normals are
    /// drawn per column pair (crossbar columns not in aligned fours, `noise_quads` off): ptxas
    /// 13.0 spills that epilogue at 64 columns.
    pub fn for_k_block(v: &GemmVariant, k_block: usize) -> Self {
        let tile = Self::for_variant(v);
        let pairwise_normals = !v.noise_quads && (v.out_noise || v.additive);
        if v.analog && !pairwise_normals && k_block.is_multiple_of(TILE_K_LONG) {
            Self {
                stages: 3,
                k_step: TILE_K_LONG,
                ..tile
            }
        } else {
            tile
        }
    }

    /// The tile for `v` with `n_cols` outputs and crossbars of `k_block` rows:
    /// `AIMC_GEMM_TILE=cols,warps_m,warps_n,stages[,k_step]` if set (a tuning knob for
    /// `aimc bench`; a malformed or unfit value is an error, not ignored), else
    /// [`Self::for_k_block`].
    pub(crate) fn choose(v: &GemmVariant, n_cols: usize, k_block: usize) -> CudaResult<Self> {
        let tile = match std::env::var("AIMC_GEMM_TILE") {
            Ok(text) => Self::parse(&text)?,
            Err(_) => Self::for_k_block(v, k_block),
        };
        tile.check(n_cols, v.total_in_shared())?;
        if !k_block.is_multiple_of(tile.k_step) {
            return Err(CudaError::Unsupported(format!(
                "AIMC_GEMM_TILE: K step {} does not divide the {k_block} rows of a crossbar",
                tile.k_step
            )));
        }
        Ok(tile)
    }

    /// `cols,warps_m,warps_n,stages[,k_step]` (the `AIMC_GEMM_TILE` format; K step
    /// [`TILE_K`] when left out).
    fn parse(text: &str) -> CudaResult<Self> {
        const WANT: &str = "cols,warps_m,warps_n,stages[,k_step]";
        let (cols, warps_m, warps_n, stages, k_step) = if text.split(',').count() == 5 {
            let [c, m, n, s, k] = tile_fields("AIMC_GEMM_TILE", text, WANT)?;
            (c, m, n, s, k)
        } else {
            let [c, m, n, s] = tile_fields("AIMC_GEMM_TILE", text, WANT)?;
            (c, m, n, s, TILE_K)
        };
        Ok(Self {
            cols,
            warps_m,
            warps_n,
            stages,
            k_step,
        })
    }

    /// The tile in the `AIMC_GEMM_TILE` format, with its K step.
    pub fn describe(self) -> String {
        format!(
            "{},{},{},{},{}",
            self.cols, self.warps_m, self.warps_n, self.stages, self.k_step
        )
    }

    pub(crate) fn threads(self) -> usize {
        32 * self.warps_m * self.warps_n
    }

    /// Dynamic shared memory of a `moe_gemm` launch on this tile: the stages, and after them
    /// the running total ([`TILE_ROWS`] × cols f32) where the variant keeps it there
    /// ([`GemmVariant::total_in_shared`], `MOE_TOTAL_SMEM`).
    pub(crate) fn shared_bytes(self, total_in_shared: bool) -> usize {
        let stages = self.stages
            * (TILE_ROWS + self.cols)
            * (self.k_step + SMEM_ROW_PAD_HALVES)
            * std::mem::size_of::<u16>();
        stages + usize::from(total_in_shared) * TILE_ROWS * self.cols * std::mem::size_of::<f32>()
    }

    /// The kernel's `#error` conditions and the launch's shared memory (with the running total
    /// where `total_in_shared`), as a clear error before compiling.
    fn check(self, n_cols: usize, total_in_shared: bool) -> CudaResult<()> {
        let threads = self.threads();
        let ok = self.warps_m > 0
            && self.warps_n > 0
            && threads <= 1024
            && self.cols > 0
            && n_cols.is_multiple_of(self.cols)
            && TILE_ROWS.is_multiple_of(16 * self.warps_m)
            && self.cols.is_multiple_of(16 * self.warps_n)
            && self.stages >= 2
            && (self.k_step == TILE_K || self.k_step == TILE_K_LONG)
            && (TILE_ROWS * self.k_step / 8).is_multiple_of(threads)
            && (self.cols * self.k_step / 8).is_multiple_of(threads)
            && self.shared_bytes(total_in_shared) <= MAX_SHARED_BYTES;
        if ok {
            Ok(())
        } else {
            Err(CudaError::Unsupported(format!(
                "grouped GEMM tile {} does not fit {TILE_ROWS} rows × N = {n_cols} ({} B of shared memory, at most {MAX_SHARED_BYTES}; K step {TILE_K} or {TILE_K_LONG})",
                self.describe(),
                self.shared_bytes(total_in_shared)
            )))
        }
    }
}

/// CTA tile of the sm_90a digital GEMM `moe_gemm_wgmma` besides its [`TILE_ROWS`] rows
/// (`WG_BN`, `WG_STAGES`, `WG_PIPE` of kernels/gemm_wgmma.cuh).
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
    /// in clusters of two CTAs that multicast each weight tile to both. The analog kernel
    /// takes 0, 1 and 2, where 2 is 0's schedule (256 threads, one CTA per tile, or with side
    /// products one per multiprocessor walking tiles) whose stages (A in sorted-pair order and
    /// the weights) come by TMA, one thread issuing the copies.
    pub pipe: usize,
    /// The pipelining of the weighted scatter-add GEMMs (output mode 2), as `pipe`.
    pub scatter_pipe: usize,
    /// The pipelining of a GEMM whose A rows are gathered per token (a layer's first), as
    /// `pipe`: the analog kernel's TMA stages (2) need the rows in sorted-pair order and copy
    /// them there first, which costs that GEMM more than its stages save where N is small.
    pub gather_pipe: usize,
    /// CTAs of the persistent kernels (`pipe` 2 and 3, and the analog kernel with side
    /// products): 0 launches as many as can be resident at once (one per multiprocessor; for
    /// `pipe` 3, two per co-resident cluster). Fewer make each CTA walk more tiles (the GPU
    /// tests use 3 to 5 to cross tiles and barrier phases).
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
                let pipe = if wide { 3 } else { 1 };
                Self {
                    cols: if wide { 256 } else { 128 },
                    stages: 4,
                    pipe,
                    scatter_pipe: if wide && k >= 4096 { 3 } else { 1 },
                    gather_pipe: pipe,
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

    /// This tile as it runs a GEMM whose A rows are gathered per token (`gathered`: the
    /// `gather_pipe` schedule) or not (`pipe`), that schedule alone left in it.
    pub fn for_gathered(self, gathered: bool) -> Self {
        if gathered {
            Self {
                pipe: self.gather_pipe,
                scatter_pipe: self.gather_pipe,
                ..self
            }
        } else {
            Self {
                gather_pipe: self.pipe,
                ..self
            }
        }
    }

    /// A tile running schedule `pipe` for every output mode and operand; a persistent kernel
    /// gets as many CTAs as can be resident.
    pub fn new(cols: usize, stages: usize, pipe: usize) -> Self {
        Self {
            cols,
            stages,
            pipe,
            scatter_pipe: pipe,
            gather_pipe: pipe,
            ctas: 0,
        }
    }

    /// `cols,stages,pipe` (the `AIMC_WGMMA_TILE` format), as [`WgmmaTile::new`].
    pub fn parse(text: &str) -> CudaResult<Self> {
        let [cols, stages, pipe] = tile_fields("AIMC_WGMMA_TILE", text, "cols,stages,pipe")?;
        Ok(Self::new(cols, stages, pipe))
    }

    /// The tile in the `AIMC_WGMMA_TILE` format (`cols,stages,pipe`), with the scatter-add's
    /// pipelining where it differs and the CTA count where it is fixed.
    pub fn describe(self) -> String {
        let mut s = format!("{},{},{}", self.cols, self.stages, self.pipe);
        if self.scatter_pipe != self.pipe {
            s += &format!(" (scatter-add pipe {})", self.scatter_pipe);
        }
        if self.gather_pipe != self.pipe {
            s += &format!(" (gathered rows pipe {})", self.gather_pipe);
        }
        if self.ctas != 0 {
            s += &format!(" ({} CTAs)", self.ctas);
        }
        s
    }

    /// Threads per CTA of the analog kernel: 256 on every `pipe`.
    pub const ANALOG_THREADS: u32 = 256;

    /// Threads per CTA of the digital kernel: 256, or 384 for the warp-specialised ones.
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

    /// Dynamic shared memory for `n_experts`: the stages of A (128 rows) and B (`cols` rows)
    /// of 128 bytes,
    /// plus 1 KiB to align the base to the 1024-byte swizzle atom, plus the warp-specialised
    /// kernels' two 8-byte mbarriers per stage and the clustered kernel's `n_experts + 1`
    /// row-tile-pair offsets.
    pub fn shared_bytes(self, n_experts: usize) -> usize {
        let stages = self.stages * (TILE_ROWS + self.cols) * WGMMA_TILE_K * 2 + 1024;
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
            && self.shared_bytes(1).max(self.for_output(2).shared_bytes(1)) <= MAX_SHARED_BYTES;
        if ok {
            Ok(())
        } else {
            Err(CudaError::Unsupported(format!(
                "wgmma GEMM tile {} does not fit N = {n_cols} (cols 128 or 256 dividing N, \
                 pipe 0 to 3, stages ≥ 2 + pipe (≥ 3 for pipes 2 and 3), {} B of shared memory, \
                 at most {MAX_SHARED_BYTES})",
                self.describe(),
                self.shared_bytes(1)
            )))
        }
    }

    /// Dynamic shared memory of the analog kernel running `v`: the stages of A (128 rows) and
    /// the weight tile (`cols` rows; with side products a second one, of |W̃|) of 128 bytes,
    /// the 1 KiB alignment slack, and the previous block's values ([`analog_prev_bytes`]).
    pub fn analog_shared_bytes(self, v: &GemmVariant) -> usize {
        let weight_tiles = 1 + usize::from(v.side_products());
        self.stages * (TILE_ROWS + weight_tiles * self.cols) * WGMMA_TILE_K * 2
            + 1024
            + analog_prev_bytes(self.cols, v)
    }

    /// The analog kernel's conditions for `v` as a clear error: 64 or 128 columns dividing
    /// `n_cols`, `pipe` 0 or 1 with at least 2 + `pipe` stages (with side products: 64
    /// columns, `pipe` 0, at least 3 stages, so that each step can make the next one's |W̃|
    /// tile), crossbars of `k_block` rows in whole [`WGMMA_TILE_K`] steps, and
    /// [`Self::analog_shared_bytes`] with the normal and IR-drop tables within the
    /// shared-memory limit.
    pub fn check_analog(self, v: &GemmVariant, n_cols: usize, k_block: usize) -> CudaResult<()> {
        // The normal transform's table and IR drop's row factors sit in static shared memory
        // beside them.
        let ir_table = if v.ir_drop && v.ir_table {
            IR_TABLE_ROWS / 2 * 4
        } else {
            0
        };
        let shared = self.analog_shared_bytes(v)
            + crate::rng::normal::TABLE_LEN * std::mem::size_of::<[f32; 2]>()
            + ir_table;
        let side_ok = !v.side_products()
            || (self.cols == 64 && (self.pipe == 0 || self.pipe == 2) && self.stages >= 3);
        // pipe 2 (TMA stages) keeps one full barrier per stage in static shared memory.
        let shared = shared + if self.pipe == 2 { 8 * self.stages } else { 0 };
        let min_stages = if self.pipe == 2 { 3 } else { 2 + self.pipe };
        let ok = ANALOG_WGMMA_COLS.contains(&self.cols)
            && n_cols.is_multiple_of(self.cols)
            && self.pipe <= 2
            && self.scatter_pipe == self.pipe
            && self.stages >= min_stages
            && side_ok
            && k_block > 0
            && k_block.is_multiple_of(WGMMA_TILE_K)
            && shared <= MAX_SHARED_BYTES;
        if ok {
            Ok(())
        } else {
            Err(CudaError::Unsupported(format!(
                "analog wgmma GEMM tile {} does not fit N = {n_cols} with {k_block}-row \
                 crossbars ({ANALOG_WGMMA_COLS:?} columns dividing N, pipe 0 or 1 with at least \
                 2 + pipe stages or pipe 2 with at least 3; with PCM_READ or IR drop 64 \
                 columns, pipe 0 or 2 and at least 3 stages; crossbar rows a multiple of \
                 {WGMMA_TILE_K}, {shared} B of shared memory, at most {MAX_SHARED_BYTES})",
                self.describe()
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

/// Output columns of the analog wgmma GEMM's tiles ([`analog_wgmma_tile_of`]).
pub const ANALOG_WGMMA_COLS: [usize; 2] = [64, 128];

/// The analog wgmma GEMM's tile of `cols` output columns for crossbars of `k_block` rows, or
/// `None` where it does not apply (`k_block` not a multiple of [`WGMMA_TILE_K`], `cols` not one
/// of [`ANALOG_WGMMA_COLS`]). Each thread keeps two accumulator sets of `cols / 2` registers
/// (the block's sums and the running total) and the previous block's sums sit in
/// [`analog_prev_bytes`] of shared memory:
/// - 128 × 128, 4 stages of 32 KiB (`pipe` 1): one CTA per multiprocessor (200 registers,
///   193 KiB of shared memory), 8 warps;
/// - 128 × 64, 3 stages of 24 KiB (`pipe` 0: each step's wgmma retired at its end, loads two
///   steps ahead by every thread's cp.async; 1–5 % faster than `pipe` 1 on an H100): two CTAs
///   per multiprocessor (128 registers, 105 KiB each), 16 warps to hide the periphery's
///   dependency chains, for twice the operand-row reads. Its TMA stages (`pipe` 2) took
///   Mixtral's Lightning-set layer from 29.4 to 27.8 ms on an H100 and the fine-grained one
///   from 3.69 to 3.95, whose first GEMM (N = 512) spent more on copying its rows into
///   sorted-pair order than its stages saved (reports/bench/2026-12-07-analog-tma.md): TMA
///   where the rows are in that order already and cp.async where they are gathered
///   (`AIMC_ANALOG_WGMMA_TILE=64,3,2,0`) is the candidate default, not yet timed.
pub fn analog_wgmma_tile_of(cols: usize, k_block: usize) -> Option<WgmmaTile> {
    if k_block == 0 || !k_block.is_multiple_of(WGMMA_TILE_K) {
        return None;
    }
    match cols {
        64 => Some(WgmmaTile::new(64, 3, 0)),
        128 => Some(WgmmaTile::new(128, 4, 1)),
        _ => None,
    }
}

/// The analog wgmma tile the host runs for crossbars of `k_block` rows:
/// `AIMC_ANALOG_WGMMA_TILE=cols,stages,pipe[,gathered_pipe]` if set (a tuning knob for `aimc
/// bench`, checked by [`WgmmaTile::check_analog`] at launch; the fourth field, the schedule of
/// gathered rows, defaults to `pipe`; malformed is an error), else
/// [`analog_wgmma_tile_of`]`(64, k_block)`: on an H100 the 64-column tile's 16 warps per
/// multiprocessor issue 0.61 instructions per scheduler and cycle against the 128-column
/// tile's 0.40, and the layers run 10 to 13 % faster (reports/bench/2026-12-07-analog-wgmma-64.md).
pub fn analog_wgmma_tile(k_block: usize) -> CudaResult<Option<WgmmaTile>> {
    let default = analog_wgmma_tile_of(64, k_block);
    match std::env::var(ANALOG_TILE_VAR) {
        Ok(text) => Ok(default.map(|_| parse_analog_tile(&text)).transpose()?),
        Err(_) => Ok(default),
    }
}

const ANALOG_TILE_VAR: &str = "AIMC_ANALOG_WGMMA_TILE";

/// `cols,stages,pipe[,gathered_pipe]`, as [`analog_wgmma_tile`] reads it.
fn parse_analog_tile(text: &str) -> CudaResult<WgmmaTile> {
    const WANT: &str = "cols,stages,pipe[,gathered_pipe]";
    if text.split(',').count() == 4 {
        let [cols, stages, pipe, gather_pipe] = tile_fields(ANALOG_TILE_VAR, text, WANT)?;
        Ok(WgmmaTile {
            gather_pipe,
            ..WgmmaTile::new(cols, stages, pipe)
        })
    } else {
        let [cols, stages, pipe] = tile_fields(ANALOG_TILE_VAR, text, WANT)?;
        Ok(WgmmaTile::new(cols, stages, pipe))
    }
}

/// Whether `AIMC_ANALOG_WGMMA=0` turns the analog wgmma kernel off on Hopper (the mma.sync
/// kernel runs every analog GEMM, as on other GPUs): a switch on where unset
/// ([`crate::backend::cuda::env`]; anything but 0 or 1 is an error naming the variable).
pub fn analog_wgmma_off() -> CudaResult<bool> {
    Ok(!crate::backend::cuda::env::switch_or(
        "AIMC_ANALOG_WGMMA",
        true,
    )?)
}

/// Shared memory of the analog wgmma GEMM's per-output planes of 128 × `cols` f32 running
/// `v`: the previous block's values; with PCM_READ the sums that set their weight-noise
/// variance; with side products the running total (in registers without).
pub fn analog_prev_bytes(cols: usize, v: &GemmVariant) -> usize {
    let planes = 1 + usize::from(v.analog && v.pcm_read) + usize::from(v.side_products());
    TILE_ROWS * cols * 4 * planes
}

/// Output columns per slab of the wgmma scatter-add GEMM with `k` inputs per row and `top_k`
/// experts per token (`slab_tile` in kernels/raster.cuh; 0: no slabs):
/// `AIMC_SCATTER_SLAB_COLS` if set to a number, else 256 where that moves fewer DRAM bytes.
///
/// In expert order each of a token's `top_k` f32 additions into its output row misses the L2
/// (the output is larger), ~8·top_k·T·N bytes of read-modify-write. Slabs of S columns keep
/// one slab's output in L2 (8·T·N) but read the operand rows once per slab
/// (N/S · top_k·T·k · 2). With S = 256 slabs win when k·top_k < 1024·(top_k − 1): the
/// fine-grained layer (k = 256, top-8) 2.30 → 1.99 ms on an H100, the OLMoE one (k = 1024)
/// unchanged, as the byte counts say (reports/bench/2026-11-24-wgmma-ws.md).
pub fn scatter_slab_cols(k: usize, top_k: usize) -> CudaResult<usize> {
    scatter_slab_cols_with(std::env::var(SLAB_COLS_VAR).ok().as_deref(), k, top_k)
}

const SLAB_COLS_VAR: &str = "AIMC_SCATTER_SLAB_COLS";

/// [`scatter_slab_cols`] with `AIMC_SCATTER_SLAB_COLS` at `forced` (`None`: unset): a number of
/// columns below 2³¹ (0: no slabs), else an error naming the variable.
fn scatter_slab_cols_with(forced: Option<&str>, k: usize, top_k: usize) -> CudaResult<usize> {
    if let Some(text) = forced {
        return text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&c| c <= i32::MAX as usize)
            .ok_or_else(|| {
                CudaError::Unsupported(format!(
                    "{SLAB_COLS_VAR}={text:?}: want a number of output columns per slab (0: none)"
                ))
            });
    }
    Ok(if k * top_k < 1024 * top_k.saturating_sub(1) {
        256
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::gemm::variant::{analog_wgmma_defines, GemmOutput};

    fn variant(analog: bool, pcm_read: bool) -> GemmVariant {
        GemmVariant {
            analog,
            pcm_read,
            ir_drop: false,
            ir_table: true,
            additive: false,
            bound_management: false,
            out_noise: analog,
            adc: analog,
            adc_bound_level: analog,
            output: GemmOutput::SwiGlu,
            noise_quads: true,
            block_readout: false,
        }
    }

    #[test]
    fn analog_tile_knob_takes_an_optional_gathered_pipe() {
        assert_eq!(
            parse_analog_tile("64,3,0").unwrap(),
            WgmmaTile::new(64, 3, 0)
        );
        let mixed = parse_analog_tile(" 64, 3, 2, 0").unwrap();
        assert_eq!(
            (mixed.pipe, mixed.scatter_pipe, mixed.gather_pipe),
            (2, 2, 0)
        );
        for bad in ["64,3", "64,3,2,0,1", "64,x,2", ""] {
            let err = parse_analog_tile(bad).unwrap_err().to_string();
            assert!(
                err.contains("AIMC_ANALOG_WGMMA_TILE") && err.contains("gathered_pipe"),
                "{err}"
            );
        }
    }

    #[test]
    fn analog_wgmma_tile_fits_the_crossbar_rows_and_shared_memory() {
        let lightning = GemmVariant::lightning(GemmOutput::SwiGlu);
        // 4 stages of A (128 rows) + fp16 weights (128 rows) × 128 bytes, under the 227 KiB
        // limit with the previous block's 64 KiB of sums.
        let tile = analog_wgmma_tile_of(128, 512).unwrap();
        assert_eq!(tile, WgmmaTile::new(128, 4, 1));
        assert_eq!(tile.shared_bytes(64), 4 * 256 * 128 + 1024);
        assert_eq!(
            tile.analog_shared_bytes(&lightning),
            4 * 256 * 128 + 1024 + 128 * 128 * 4
        );
        tile.check_analog(&lightning, 1024, 512).unwrap();
        // The 64-column tile: two CTAs per multiprocessor (228 KiB) with 4 KiB of normal table
        // and 1 KiB the driver reserves per CTA beside each.
        let narrow = analog_wgmma_tile_of(64, 512).unwrap();
        assert_eq!(narrow, WgmmaTile::new(64, 3, 0));
        // TMA stages except where the rows are gathered: each GEMM runs one schedule.
        let mixed = WgmmaTile {
            gather_pipe: 0,
            ..WgmmaTile::new(64, 3, 2)
        };
        assert_eq!(
            (mixed.for_gathered(true), mixed.for_gathered(false)),
            (WgmmaTile::new(64, 3, 0), WgmmaTile::new(64, 3, 2))
        );
        assert_eq!(mixed.describe(), "64,3,2 (gathered rows pipe 0)");
        let per_cta = narrow.analog_shared_bytes(&lightning);
        assert_eq!(per_cta, 3 * 192 * 128 + 1024 + 128 * 64 * 4);
        assert!(2 * (per_cta + 5 * 1024) <= 228 * 1024);
        let check = |t: WgmmaTile, v: &GemmVariant, n, k_block| t.check_analog(v, n, k_block);
        check(narrow, &lightning, 1024, 512).unwrap();
        assert!(check(narrow, &lightning, 96, 512).is_err());
        check(WgmmaTile::new(64, 3, 1), &lightning, 1024, 512).unwrap();
        assert!(check(WgmmaTile::new(64, 2, 1), &lightning, 1024, 512).is_err());
        // TMA stages (pipe 2): at least 3 stages, no side products; no pipe 3.
        check(WgmmaTile::new(64, 3, 2), &lightning, 1024, 512).unwrap();
        assert!(check(WgmmaTile::new(64, 2, 2), &lightning, 1024, 512).is_err());
        assert!(check(WgmmaTile::new(64, 3, 3), &lightning, 1024, 512).is_err());
        assert!(check(WgmmaTile::new(128, 5, 1), &lightning, 1024, 512).is_err());
        assert!(check(narrow, &lightning, 1024, 250).is_err());
        assert!(check(WgmmaTile::new(256, 4, 1), &lightning, 1024, 512).is_err());
        let err = check(WgmmaTile::new(64, 2, 1), &lightning, 1024, 512)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("analog wgmma GEMM tile 64,2,1 does not fit"),
            "{err}"
        );
        // Side products (standard-hwa: PCM_READ and IR drop): a |W̃| tile per stage, a second
        // plane of previous-block values and the running total, one CTA per multiprocessor,
        // on the 64-column tile with pipe 0 and at least 3 stages alone.
        let hwa = GemmVariant {
            pcm_read: true,
            ir_drop: true,
            ..lightning
        };
        assert!(hwa.side_products() && !lightning.side_products());
        assert_eq!(
            narrow.analog_shared_bytes(&hwa),
            3 * (128 + 2 * 64) * 128 + 1024 + 3 * 128 * 64 * 4
        );
        assert_eq!(
            narrow.analog_shared_bytes(&GemmVariant {
                pcm_read: false,
                ..hwa
            }),
            3 * (128 + 2 * 64) * 128 + 1024 + 2 * 128 * 64 * 4
        );
        check(narrow, &hwa, 1024, 512).unwrap();
        // A fourth stage passes the limit with the normal and IR-drop tables (230,400 +
        // 3,968 + 8,192 B).
        let err = check(WgmmaTile::new(64, 4, 0), &hwa, 1024, 512).unwrap_err();
        assert!(
            err.to_string().contains("242560 B of shared memory"),
            "{err}"
        );
        check(WgmmaTile::new(64, 3, 2), &hwa, 1024, 512).unwrap();
        for unfit in [
            WgmmaTile::new(64, 3, 1),
            WgmmaTile::new(128, 4, 1),
            WgmmaTile::new(64, 2, 0),
        ] {
            assert!(check(unfit, &lightning, 1024, 512).is_ok() || unfit.stages == 2);
            let err = check(unfit, &hwa, 1024, 512).unwrap_err().to_string();
            assert!(err.contains("with PCM_READ or IR drop 64 columns"), "{err}");
        }
        // Crossbar blocks must be whole 64-row wgmma steps.
        for cols in ANALOG_WGMMA_COLS {
            assert_eq!(analog_wgmma_tile_of(cols, 250), None);
            assert_eq!(analog_wgmma_tile_of(cols, 0), None);
        }
        assert_eq!(analog_wgmma_tile_of(256, 512), None);
        let v = |pcm_read, ir_drop, output| GemmVariant {
            pcm_read,
            ir_drop,
            ..GemmVariant::lightning(output)
        };
        assert!(v(false, false, GemmOutput::ScatterAdd).wgmma_ready());
        assert!(v(true, false, GemmOutput::Store).wgmma_ready());
        assert!(v(false, true, GemmOutput::Store).wgmma_ready());
        assert!(!v(true, true, GemmOutput::BmAttempt).wgmma_ready());
        assert!(!GemmVariant {
            block_readout: true,
            ..v(false, false, GemmOutput::Store)
        }
        .wgmma_ready());
        let defines =
            analog_wgmma_defines(&v(false, false, GemmOutput::ScatterAdd), tile, 512, 256);
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
        assert_eq!(t.shared_bytes(64), 4 * 384 * 128 + 1024);
        assert_eq!((t.threads(), t.cluster()), (256, 1));
        t.check(2048).unwrap();
        assert!(t.check(128 * 3).is_err()); // 256 does not divide N
                                            // The warp-specialised kernels: 384 threads, two mbarriers per stage, and for the
                                            // clustered one 2 CTAs and a row-tile-pair offset per expert and one more.
        let ws = WgmmaTile::parse("256,4,2").unwrap();
        assert_eq!((ws.threads(), ws.cluster()), (384, 1));
        assert_eq!(ws.shared_bytes(64), 4 * 384 * 128 + 1024 + 64);
        let cl = WgmmaTile::parse("256,4,3").unwrap();
        assert_eq!((cl.threads(), cl.cluster()), (384, 2));
        assert_eq!(cl.shared_bytes(64), 4 * 384 * 128 + 1024 + 64 + 4 * 65);
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
        // The byte-count rule: the fine-grained layer (k 256, top-8) in slabs, OLMoE's
        // (k 1024) and Mixtral's (k 14336, top-2) not; top-1 never (no second addition).
        let slabs = |k, top_k| scatter_slab_cols_with(None, k, top_k).unwrap();
        assert_eq!(slabs(256, 8), 256);
        assert_eq!(slabs(1024, 8), 0);
        assert_eq!(slabs(14336, 2), 0);
        assert_eq!(slabs(64, 1), 0);
        // Forced: any column count, 0 for none; text or an overflowing count is an error.
        assert_eq!(scatter_slab_cols_with(Some(" 512"), 1024, 8).unwrap(), 512);
        assert_eq!(scatter_slab_cols_with(Some("0"), 256, 8).unwrap(), 0);
        for bad in ["wide", "-256", "4294967296"] {
            let err = scatter_slab_cols_with(Some(bad), 256, 8)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("AIMC_SCATTER_SLAB_COLS") && err.contains(bad),
                "{err}"
            );
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
            for tile in [GemmTile::for_variant(&v), GemmTile::for_k_block(&v, 512)] {
                for n in [TILE_COLS, 3 * TILE_COLS, 28672] {
                    tile.check(n, v.total_in_shared()).unwrap();
                }
                // The kernel's per-thread loader and warp-fragment conditions.
                assert_eq!((TILE_ROWS * tile.k_step / 8) % tile.threads(), 0);
                assert_eq!((tile.cols / tile.warps_n / 8) % 2, 0, "{tile:?}");
            }
        }
    }
    #[test]
    fn the_long_k_step_goes_to_analog_tiles_on_whole_64_row_blocks() {
        let plain = variant(true, false);
        let long = GemmTile::for_k_block(&plain, 512);
        assert_eq!((long.k_step, long.stages), (TILE_K_LONG, 3));
        // Two CTAs per multiprocessor: 2 × (81 KiB + the 3,968-byte normal table + 1 KiB
        // reserved) within the 228 KiB of an H100's multiprocessor.
        assert_eq!(long.shared_bytes(false), 3 * 192 * 72 * 2);
        assert!(2 * (long.shared_bytes(false) + 3968 + 1024) <= 228 * 1024);
        // The side accumulators take it with the running total in shared memory: 3 stages of
        // 64 columns (81 KiB) and the 128 × 64 total (32 KiB), one CTA per multiprocessor.
        let side = variant(true, true);
        assert!(side.total_in_shared() && !plain.total_in_shared());
        // A bound-management attempt keeps no total.
        assert!(!GemmVariant {
            output: GemmOutput::BmAttempt,
            ..side
        }
        .total_in_shared());
        let side_long = GemmTile::for_k_block(&side, 512);
        assert_eq!(
            (side_long.k_step, side_long.stages, side_long.cols),
            (TILE_K_LONG, 3, 64)
        );
        assert_eq!(
            side_long.shared_bytes(true),
            3 * 192 * 72 * 2 + 128 * 64 * 4
        );
        assert!(side_long.shared_bytes(true) <= MAX_SHARED_BYTES);
        side_long.check(TILE_COLS, true).unwrap();
        // 96-row crossbars are whole 32-column stages only; the digital variant and the
        // per-column-pair normals keep their measured tiles.
        assert_eq!(
            GemmTile::for_k_block(&plain, 96),
            GemmTile::for_variant(&plain)
        );
        let pairwise = GemmVariant {
            noise_quads: false,
            ..plain
        };
        for v in [variant(false, false), pairwise] {
            assert_eq!(GemmTile::for_k_block(&v, 512), GemmTile::for_variant(&v));
        }
    }
    #[test]
    fn tile_override_parses_four_numbers_or_names_the_format() {
        let tile = |stages, k_step| GemmTile {
            cols: 64,
            warps_m: 4,
            warps_n: 2,
            stages,
            k_step,
        };
        assert_eq!(GemmTile::parse("64, 4,2,3").unwrap(), tile(3, 32));
        assert_eq!(GemmTile::parse("64,4,2,3, 64").unwrap(), tile(3, 64));
        assert_eq!(tile(3, 64).describe(), "64,4,2,3,64");
        for bad in [
            "",
            "64,4,2",
            "64,4,2,3,1,2",
            "64,4,x,3",
            "-64,4,2,3",
            "64,4,2,3,",
        ] {
            let err = GemmTile::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("want cols,warps_m,warps_n,stages[,k_step]"),
                "{bad}: {err}"
            );
        }
        // A K step the kernel has no loader for is refused before compiling.
        assert!(GemmTile::parse("64,4,2,3,48")
            .unwrap()
            .check(1024, false)
            .is_err());
    }
    #[test]
    fn unfit_tiles_are_refused_before_compiling() {
        let t = |cols, warps_m, warps_n, stages| GemmTile {
            cols,
            warps_m,
            warps_n,
            stages,
            k_step: TILE_K,
        };
        // 256 columns do not divide N = 384.
        assert!(t(256, 2, 4, 3).check(384, false).is_err());
        assert!(t(128, 2, 4, 3).check(384, false).is_ok());
        // 8 stages of 128 + 256 rows × 80 B = 240 KiB > 227 KiB.
        let err = t(256, 2, 4, 8).check(1024, false).unwrap_err().to_string();
        assert!(err.contains("245760 B of shared memory"), "{err}");
        // 3 warps along M do not tile 128 rows in m16 fragments; 1 stage is no pipeline.
        assert!(t(128, 3, 2, 3).check(1024, false).is_err());
        assert!(t(128, 2, 4, 1).check(1024, false).is_err());
        assert!(t(128, 0, 4, 3).check(1024, false).is_err());
        // 4 stages of 64 columns on 128 + 128 rows × 144 B = 144 KiB fit one CTA; 7 do not.
        let long = |stages| GemmTile {
            k_step: TILE_K_LONG,
            ..t(128, 2, 4, stages)
        };
        assert!(long(4).check(1024, false).is_ok());
        let err = long(7).check(1024, false).unwrap_err().to_string();
        assert!(err.contains("258048 B of shared memory"), "{err}");
        // 5 such stages (180 KiB) fit alone, not with a running total of 128 × 128 f32 beside
        // them (64 KiB more).
        assert!(long(5).check(1024, false).is_ok());
        let err = long(5).check(1024, true).unwrap_err().to_string();
        assert!(err.contains("249856 B of shared memory"), "{err}");
    }
}

//! One MoE expert layer on the GPU ([`GpuMoeLayer`]): routing → DAC prologue → grouped gate/up
//! GEMM with the periphery and SwiGLU fused → DAC of the hidden rows → grouped down GEMM with
//! the weighted scatter-add fused; and the digital layer's combine ([`DigitalCombine`],
//! [`combine_bf16_rows`]). Mirrors `model::moe::MoeLayer::forward` with every routed expert
//! through `tile::AnalogMatrix::mvm` (analog) or in bf16 (digital). Kernels `swiglu_rows`,
//! `scatter_rows` and `combine_bf16_rows` of `kernels/layer.cu`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::gemm::grouped_gemm;
use super::gemm::variant::GemmOutput;
use super::grouped::GpuGroupedMatrix;
use super::periphery::{quantize, GemmInput, GemmPeriphery};
use super::routing::GpuRouting;
use crate::backend::cuda::compile::MOE_CU;
use crate::backend::cuda::{linear_launch, CudaDevice, CudaError, CudaResult};

/// `[P, N]` store-mode rows with interleaved gate/up columns → SwiGLU `[P, N/2]`.
pub(crate) fn swiglu_rows(
    dev: &CudaDevice,
    gu: &CudaSlice<f32>,
    rows: usize,
    n: usize,
) -> CudaResult<CudaSlice<f32>> {
    let mut h = dev.scratch::<f32>(rows * n / 2)?;
    let f = dev.function(&MOE_CU, &[], "swiglu_rows")?;
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
    let f = dev.function(&MOE_CU, &[], "scatter_rows")?;
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
    let f = dev.function(&MOE_CU, &[], "combine_bf16_rows")?;
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
    /// where [`scatter_slab_cols`](super::gemm::scatter_slab_cols) says so); the order of the adds varies run to run.
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
    /// `AIMC_DIGITAL_COMBINE=scatter|rows` forces one (a tuning knob for `aimc bench`); any
    /// other value is an error naming the variable.
    pub fn for_layer(top_k: usize) -> CudaResult<Self> {
        Self::for_layer_with(std::env::var(COMBINE_VAR).ok().as_deref(), top_k)
    }

    /// [`DigitalCombine::for_layer`] for the variable's value (`None`: unset).
    fn for_layer_with(forced: Option<&str>, top_k: usize) -> CudaResult<Self> {
        match forced.map(str::trim) {
            Some("scatter") => Ok(Self::ScatterAdd),
            Some("rows") => Ok(Self::Bf16Rows),
            None if top_k >= 4 => Ok(Self::Bf16Rows),
            None => Ok(Self::ScatterAdd),
            Some(other) => Err(CudaError::Unsupported(format!(
                "{COMBINE_VAR}={other:?}: want scatter (the f32 scatter-add epilogue) or rows \
                 (bf16 expert rows and a combine pass)"
            ))),
        }
    }
}

const COMBINE_VAR: &str = "AIMC_DIGITAL_COMBINE";

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
        let combine = DigitalCombine::for_layer(routing.top_k)?;
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

    #[test]
    fn digital_combine_is_bf16_rows_at_top_4_or_more() {
        let unset = |k| DigitalCombine::for_layer_with(None, k).unwrap();
        // OLMoE and fine-grained (top-8), Mixtral (top-2), top-4.
        assert_eq!(unset(8), DigitalCombine::Bf16Rows);
        assert_eq!(unset(2), DigitalCombine::ScatterAdd);
        assert_eq!(unset(4), DigitalCombine::Bf16Rows);
        // Forced either way, whatever top_k.
        let forced = |v, k| DigitalCombine::for_layer_with(Some(v), k).unwrap();
        assert_eq!(forced("scatter", 8), DigitalCombine::ScatterAdd);
        assert_eq!(forced(" rows", 2), DigitalCombine::Bf16Rows);
        let err = DigitalCombine::for_layer_with(Some("atomic"), 8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AIMC_DIGITAL_COMBINE") && err.contains("\"atomic\""),
            "{err}"
        );
    }
}

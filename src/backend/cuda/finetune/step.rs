//! One fine-tuning step's products on the GPU: the layer's analog forward through the grouped
//! kernels with what the backward needs kept ([`forward`]), the loss ([`loss`]), and the
//! hand-written backward of `finetune::noisy` ([`backward`]): straight-through noise, ∂L/∂W =
//! gᵀ·x̂ and ∂L/∂h = g·Ŵ per expert through cuBLAS, SwiGLU's exact backward.
//!
//! The forward is the eval's layer (`layer::GpuMoeLayer::forward`) in store mode: the gate/up
//! GEMM keeps its rows (the backward needs a and u, not only SwiGLU's product), the down GEMM
//! its per-pair rows, which [`forward`] sums per token in expert order (as the CPU objective
//! sums its experts), not by atomics, so a step is deterministic.
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::super::blas::{Blas, RowLayout};
use super::super::compile::FINETUNE_CU;
use super::super::gemm::{grouped_gemm, GemmOutput};
use super::super::grouped::GpuGroupedMatrix;
use super::super::layer::swiglu_rows;
use super::super::periphery::{quantize, GemmInput, GemmPeriphery};
use super::super::routing::GpuRouting;
use super::super::{linear_launch, CudaDevice, CudaResult};

/// Most experts per token the combine kernel sorts (`FT_MAX_K` in kernels/finetune.cu).
pub(crate) const MAX_TOP_K: usize = 32;

/// The forward of one batch, kept for the backward.
pub(crate) struct Forward<'x> {
    /// DAC codes and α_nm of the batch rows `[T, d]` (gate/up input).
    pub(crate) xq: GemmInput<'x>,
    /// Gate/up outputs per sorted pair `[P, 2n]` (interleaved in groups of 8).
    pub(crate) gu: CudaSlice<f32>,
    /// SwiGLU of `gu` `[P, n]`.
    pub(crate) h: CudaSlice<f32>,
    /// DAC codes and α_nm of `h` (down input).
    pub(crate) hq_codes: CudaSlice<u16>,
    pub(crate) hq_alpha: CudaSlice<f32>,
    /// ŷ `[T, d]`.
    pub(crate) y_hat: CudaSlice<f32>,
    /// Where the ADC clips (no bound management): per sorted pair, the number of crossbar
    /// blocks whose output clipped, gate/up `[P, 2n]` and down `[P, d]`; the backward blocks
    /// the gradient there. `None`: nothing clips, or the forward is for the loss alone.
    pub(crate) clipped: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// The layer's routed-expert output ŷ of `x` (`[T, d]`) through `gate_up` and `down` with the
/// periphery `p`, per-MVM noise of call 0 under `seed` keyed by the row inside each expert (as
/// `CpuObjective` runs each expert's rows as one batch of call 0); with `for_backward`, also
/// the clip counts the backward masks with where the ADC clips.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<'x>(
    dev: &CudaDevice,
    gate_up: &GpuGroupedMatrix,
    down: &GpuGroupedMatrix,
    p: &GemmPeriphery,
    seed: u64,
    x: &'x CudaSlice<f32>,
    routing: &GpuRouting,
    for_backward: bool,
) -> CudaResult<Forward<'x>> {
    let (t, k) = (routing.n_tokens, routing.top_k);
    let pairs = t * k;
    let (d, n2) = (gate_up.k, gate_up.n_cols);
    let n = n2 / 2;
    // One product of the layer under this call's draws: `gather` reads the operand rows
    // through the routing (gate/up), else in sorted order (down).
    let product = |m: &GpuGroupedMatrix, input: &GemmInput, gather: bool, mode, len: usize| {
        let mut out = dev.scratch::<f32>(len)?;
        grouped_gemm(
            dev,
            m,
            input,
            routing,
            gather,
            Some(p),
            seed,
            0,
            mode,
            &mut out,
        )?;
        Ok::<_, super::super::CudaError>(out)
    };
    let xq = quantize(dev, x, t, d, gate_up.k_block, Some(p))?;
    let gu = product(gate_up, &xq, true, GemmOutput::Store, pairs * n2)?;
    let h = swiglu_rows(dev, &gu, pairs, n2)?;
    let hq = quantize(dev, &h, pairs, n, down.k_block, Some(p))?;
    let rows = product(down, &hq, false, GemmOutput::Store, pairs * d)?;
    // The same products again with the same draws, counting clipped blocks per output.
    let clipped = if for_backward && p.adc.is_some() && !p.bound_managed() {
        Some((
            product(gate_up, &xq, true, GemmOutput::ClipCount, pairs * n2)?,
            product(down, &hq, false, GemmOutput::ClipCount, pairs * d)?,
        ))
    } else {
        None
    };
    let pos = routing.pos_of_pair(dev)?;
    let mut y_hat = dev.scratch::<f32>(t * d)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_combine")?;
    let (t32, k32, d32) = (t as u32, k as u32, d as u32);
    dev.launch(&f, "ft_combine", linear_launch((t * d) as u64), |b| {
        b.arg(&rows)
            .arg(&pos)
            .arg(&routing.sorted_weight)
            .arg(&t32)
            .arg(&k32)
            .arg(&d32)
            .arg(&mut y_hat);
    })?;
    let GemmInput {
        a: hq_codes,
        alpha: hq_alpha,
        ..
    } = hq;
    Ok(Forward {
        xq,
        gu,
        h,
        hq_codes,
        hq_alpha,
        y_hat,
        clipped,
    })
}

/// Zeroes `g` where `clipped` (clip counts of the same shape) is not 0.
fn mask_clipped(
    dev: &CudaDevice,
    g: &mut CudaSlice<f32>,
    clipped: &CudaSlice<f32>,
) -> CudaResult<()> {
    let f = dev.function(&FINETUNE_CU, &[], "ft_mask_clipped")?;
    let len = g.len() as u64;
    dev.launch(&f, "ft_mask_clipped", linear_launch(len), |b| {
        b.arg(&mut *g).arg(clipped).arg(&len);
    })
}

/// (Σ‖ŷ − y‖², Σ‖y‖²) over the `[T, d]` rows, in f64, per row on the device and over rows in
/// order on the host.
pub(crate) fn loss(
    dev: &CudaDevice,
    y_hat: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    (t, d): (usize, usize),
) -> CudaResult<(f64, f64)> {
    let mut err = dev.scratch::<f64>(t)?;
    let mut energy = dev.scratch::<f64>(t)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_row_sums")?;
    let (t64, d32) = (t as u64, d as u32);
    dev.launch(&f, "ft_row_sums", linear_launch(32 * t64), |b| {
        b.arg(y_hat)
            .arg(y)
            .arg(&t64)
            .arg(&d32)
            .arg(&mut err)
            .arg(&mut energy);
    })?;
    let sum = |v: Vec<f64>| v.into_iter().sum::<f64>();
    Ok((sum(dev.download(&err)?), sum(dev.download(&energy)?)))
}

/// The DAC's view in input units of `[rows, k]` rows (x̂ = α_nm·code·Δ, or the rows themselves
/// without a DAC), row p taken from row `row_of[p]` when given.
#[allow(clippy::too_many_arguments)]
fn dequantize(
    dev: &CudaDevice,
    codes: &CudaSlice<u16>,
    alpha: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    row_of: Option<&CudaSlice<u32>>,
    (rows, k, k_block): (usize, usize, usize),
    p: &GemmPeriphery,
) -> CudaResult<CudaSlice<f32>> {
    let mut out = dev.scratch::<f32>(rows * k)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_dequantize")?;
    let (r64, k32, kb32) = (rows as u64, k as u32, k_block as u32);
    let use_dac = u32::from(p.dac.is_some());
    let step = p.dac.map_or(1.0, |d| d.0);
    let null = 0u64;
    dev.launch(&f, "ft_dequantize", linear_launch(r64 * k as u64), |b| {
        b.arg(codes).arg(alpha).arg(x);
        match row_of {
            Some(r) => b.arg(r),
            None => b.arg(&null),
        };
        b.arg(&r64)
            .arg(&k32)
            .arg(&kb32)
            .arg(&use_dac)
            .arg(&step)
            .arg(&mut out);
    })?;
    Ok(out)
}

/// Ŵ = W̃·s_map·α `[E, N, K]` f32 of the operands `m`.
fn effective_weights(dev: &CudaDevice, m: &GpuGroupedMatrix) -> CudaResult<CudaSlice<f32>> {
    let len = m.n_experts * m.n_cols * m.k;
    let mut out = dev.scratch::<f32>(len)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_effective_weights")?;
    let (len64, n32, k32, kb32) = (len as u64, m.n_cols as u32, m.k as u32, m.k_block as u32);
    dev.launch(&f, "ft_effective_weights", linear_launch(len64), |b| {
        b.arg(&*m.w)
            .arg(&*m.col_scale)
            .arg(&len64)
            .arg(&n32)
            .arg(&k32)
            .arg(&kb32)
            .arg(&mut out);
    })?;
    Ok(out)
}

/// What [`backward`] writes into: the gradients of the interleaved gate/up weights `[E, 2n, d]`
/// and of the down weights `[E, d, n]`.
pub(crate) struct Grads<'g> {
    pub(crate) gate_up: &'g mut CudaSlice<f32>,
    pub(crate) down: &'g mut CudaSlice<f32>,
}

/// ∂L/∂W of both grouped matrices for the loss Σ‖ŷ − y‖²/`norm` of `fwd` (the rows of batch
/// `x`, targets `y`), through the operands `gate_up` and `down` the forward ran on. Experts
/// without tokens get zero gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dev: &CudaDevice,
    blas: &Blas,
    (gate_up, down): (&GpuGroupedMatrix, &GpuGroupedMatrix),
    p: &GemmPeriphery,
    fwd: &Forward<'_>,
    (x, y): (&CudaSlice<f32>, &CudaSlice<f32>),
    routing: &GpuRouting,
    norm: f64,
    grads: Grads<'_>,
) -> CudaResult<()> {
    let (t, k) = (routing.n_tokens, routing.top_k);
    let pairs = t * k;
    let (d, n2) = (gate_up.k, gate_up.n_cols);
    let n = n2 / 2;
    // ∂L/∂ŷ = 2(ŷ − y)/Σ‖y‖², then per sorted pair times its routing weight.
    let mut g_yhat = dev.scratch::<f32>(t * d)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_output_grad")?;
    let len = (t * d) as u64;
    dev.launch(&f, "ft_output_grad", linear_launch(len), |b| {
        b.arg(&fwd.y_hat)
            .arg(y)
            .arg(&len)
            .arg(&norm)
            .arg(&mut g_yhat);
    })?;
    let mut g_out = dev.scratch::<f32>(pairs * d)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_pair_grad")?;
    let (p64, d32) = (pairs as u64, d as u32);
    dev.launch(&f, "ft_pair_grad", linear_launch(p64 * d as u64), |b| {
        b.arg(&g_yhat)
            .arg(&routing.sorted_token)
            .arg(&routing.sorted_weight)
            .arg(&p64)
            .arg(&d32)
            .arg(&mut g_out);
    })?;
    drop(g_yhat);
    if let Some((_, down_clip)) = &fwd.clipped {
        mask_clipped(dev, &mut g_out, down_clip)?;
    }
    let experts = routing.expert_rows(dev)?;
    let stream = dev.stream();
    let zero = |g: &mut CudaSlice<f32>| {
        stream
            .memset_zeros(g)
            .map_err(|source| super::super::CudaError::Driver {
                what: "zeroing the fine-tuning gradients".into(),
                source,
            })
    };
    zero(&mut *grads.gate_up)?;
    zero(&mut *grads.down)?;
    // Down: ∂L/∂W_e = g_eᵀ·ĥ_e, ∂L/∂h_e = g_e·Ŵ_e.
    let h_hat = dequantize(
        dev,
        &fwd.hq_codes,
        &fwd.hq_alpha,
        &fwd.h,
        None,
        (pairs, n, down.k_block),
        p,
    )?;
    let w_down = effective_weights(dev, down)?;
    let mut g_h = dev.scratch::<f32>(pairs * n)?;
    for &(e, r0, rows) in &experts {
        blas.sgemm_layout(
            dev,
            RowLayout::Tn,
            (&g_out, r0 * d),
            (&h_hat, r0 * n),
            (&mut *grads.down, e * d * n),
            (d, n, rows),
            0.0,
        )?;
        blas.sgemm_layout(
            dev,
            RowLayout::Nn,
            (&g_out, r0 * d),
            (&w_down, e * d * n),
            (&mut g_h, r0 * n),
            (rows, n, d),
            0.0,
        )?;
    }
    drop((h_hat, w_down, g_out));
    // SwiGLU, then gate/up: ∂L/∂W_e = g_eᵀ·x̂_e (x̂ of each pair's token).
    let mut g_gu = dev.scratch::<f32>(pairs * n2)?;
    let f = dev.function(&FINETUNE_CU, &[], "ft_swiglu_backward")?;
    let (half, rows64) = (n as u32, pairs as u64);
    dev.launch(
        &f,
        "ft_swiglu_backward",
        linear_launch(rows64 * n as u64),
        |b| {
            b.arg(&fwd.gu)
                .arg(&g_h)
                .arg(&rows64)
                .arg(&half)
                .arg(&mut g_gu);
        },
    )?;
    drop(g_h);
    if let Some((gu_clip, _)) = &fwd.clipped {
        mask_clipped(dev, &mut g_gu, gu_clip)?;
    }
    let x_hat = dequantize(
        dev,
        &fwd.xq.a,
        &fwd.xq.alpha,
        x,
        Some(&routing.sorted_token),
        (pairs, d, gate_up.k_block),
        p,
    )?;
    for &(e, r0, rows) in &experts {
        blas.sgemm_layout(
            dev,
            RowLayout::Tn,
            (&g_gu, r0 * n2),
            (&x_hat, r0 * d),
            (&mut *grads.gate_up, e * n2 * d),
            (n2, d, rows),
            0.0,
        )?;
    }
    Ok(())
}

//! CPU model of the grouped MoE kernels (`kernels/moe_config.cuh` and the files it lists): the
//! same host tables, the same per-crossbar-block prologue and epilogue, in f32 with exact
//! operands (no fp16/bf16 rounding).
//!
//! It is the oracle of the GPU kernels (their only differences from it are operand rounding and
//! summation order) and lets the host-side layout ([`GroupedMatrix`], SwiGLU interleaving,
//! routing semantics) be tested against [`crate::tile::AnalogMatrix`] on machines without a GPU.
use ndarray::{Array2, ArrayView2};

use half::{bf16, f16};

use super::periphery::GemmPeriphery;

use super::grouped::GroupedMatrix;

use super::gemm::Precision;
use crate::rng::{Purpose, Stream};
use crate::tile::noise_sd;

/// Operand rounding of the tensor-core kernels, emulated on exact products with f32 sums.
///
/// `f16r`/`bf16r` round to nearest even as the kernels' `cvt.rn` does. What is not emulated:
/// the tensor cores' internal accumulation order and rounding of f32 partial sums.
#[derive(Clone, Copy)]
struct Operands {
    /// Weight of the main product.
    w: fn(f32) -> f32,
    /// Weight of the |W| and IR-drop products.
    w_side: fn(f32) -> f32,
    /// fp16 rounding of derived A operands (x̃², x̃·f(j)); identity when exact.
    a_side: fn(f32) -> f32,
    /// Digital input rounding.
    x: fn(f32) -> f32,
}

fn f16r(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}
fn bf16r(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}
fn exact(v: f32) -> f32 {
    v
}

impl Operands {
    fn of(precision: Option<Precision>) -> Self {
        match precision {
            None => Self {
                w: exact,
                w_side: exact,
                a_side: exact,
                x: exact,
            },
            Some(Precision::AnalogF16) => Self {
                w: f16r,
                w_side: f16r,
                a_side: f16r,
                x: exact,
            },
            Some(Precision::DigitalBf16) => Self {
                w: bf16r,
                w_side: bf16r,
                a_side: exact,
                x: bf16r,
            },
        }
    }
}

/// Rows `x` (`[rows, K]`, row r = r-th token of `expert` in sorted order) through expert
/// `expert` of `m` → `[rows, N]`, as `moe_gemm` in store mode computes them.
/// `periphery = None`: the digital product. `precision = None`: exact f32 operands; otherwise
/// the kernel's operand rounding is emulated (to predict GPU–CPU differences).
pub fn grouped_rows(
    m: &GroupedMatrix,
    expert: usize,
    x: ArrayView2<f32>,
    periphery: Option<&GemmPeriphery>,
    precision: Option<Precision>,
    seed: u64,
    mvm_id: u32,
) -> Array2<f32> {
    let (n, k, kb_len) = (m.n_cols, m.k, m.k_block);
    let n_kb = k / kb_len;
    let ops = Operands::of(precision);
    let w = |c: usize| &m.weights[(expert * n + c) * k..][..k];
    let mut out = Array2::<f32>::zeros((x.nrows(), n));
    let Some(p) = periphery else {
        for (r, xr) in x.rows().into_iter().enumerate() {
            for c in 0..n {
                out[[r, c]] = w(c)
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| (ops.w)(*a) * (ops.x)(*b))
                    .sum();
            }
        }
        return out;
    };
    let step = p.dac.map_or(1.0, |d| d.0);
    let mut y = vec![0.0f32; n];
    let mut pending = vec![false; m.n_xbar];
    let mut saturated = vec![false; m.n_xbar];
    for (r, xr) in x.rows().into_iter().enumerate() {
        for kb in 0..n_kb {
            let seg = &xr.as_slice().expect("standard layout")[kb * kb_len..][..kb_len];
            // Prologue (moe_quantize): noise management.
            let alpha_nm = match p.nm_kind {
                0 => seg.iter().fold(0.0f32, |a, v| a.max(v.abs())),
                1 => p.nm_value,
                _ => 1.0,
            };
            // Step 8 (moe::bound_management's attempt passes): every crossbar of the row starts
            // at β = 1; those with a saturated output re-run at 2β with the next `attempt` of the
            // noise streams, all still-pending crossbars together, while β ≤ the limit.
            pending.fill(true);
            let mut beta = 1.0f32;
            for attempt in 0u8..=u8::MAX {
                let scale = alpha_nm * beta;
                // DAC code per input (moe_quantize at α_nm·β).
                let q: Vec<f32> = seg
                    .iter()
                    .map(|&v| {
                        if scale == 0.0 {
                            return 0.0;
                        }
                        let v = v / scale;
                        match p.dac {
                            Some((step, max_code)) => {
                                (v / step).round_ties_even().clamp(-max_code, max_code)
                            }
                            None => v,
                        }
                    })
                    .collect();
                let sum_x2: f32 = q.iter().map(|&c| (c * step) * (c * step)).sum();
                saturated.fill(false);
                for c in (0..n).filter(|&c| pending[m.col_xbar[c] as usize]) {
                    let wc = &w(c)[kb * kb_len..][..kb_len];
                    let (mut acc, mut abs, mut s2, mut ir) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
                    for (j, (&wj, &qj)) in wc.iter().zip(&q).enumerate() {
                        let ws = (ops.w_side)(wj);
                        acc += (ops.w)(wj) * qj;
                        abs += ws.abs() * qj.abs();
                        s2 += ws.abs() * (ops.a_side)(qj * qj);
                        let u = 1.0 - j as f32 / kb_len as f32;
                        ir += ws * (ops.a_side)(qj * (ops.a_side)(1.0 - u * u));
                    }
                    // Epilogue (moe_gemm, one crossbar block).
                    let mut v = acc * step;
                    if let Some((ir_scale, g_ratio)) = p.ir_drop {
                        let a = kb_len as f32 / g_ratio * (abs * step);
                        let cc = a * (a * (0.05 * a - 0.2) + 0.5);
                        v -= ir_scale * cc * (ir * step);
                    }
                    let tab = (expert * n_kb + kb) * n + c;
                    let tid = m.col_tensor_id[tab];
                    let idx = (r * m.col_block_cols[c] as usize + m.col_local[c] as usize) as u64;
                    // Short-term weight noise and output noise: one normal of the summed
                    // variance under `OutputNoise`, as tile::Crossbar::analog draws it.
                    if p.noisy() {
                        let z = Stream::new(seed, Purpose::OutputNoise, tid)
                            .normal_attempt(idx, mvm_id, attempt);
                        let out_var = p.out_noise * p.out_noise;
                        let sd = match (p.pcm_read_std, p.additive_std) {
                            (Some(std), _) => noise_sd(out_var + std * std * (s2 * (step * step))),
                            (None, Some(std)) => noise_sd(out_var + std * std * sum_x2),
                            (None, None) => p.out_noise,
                        };
                        v += sd * z;
                    }
                    if let Some((adc_step, bound)) = p.adc {
                        v = ((v / adc_step).round_ties_even() * adc_step).clamp(-bound, bound);
                        if v.abs() >= bound {
                            saturated[m.col_xbar[c] as usize] = true;
                        }
                    }
                    y[c] = v;
                }
                let again_ok = p.bm_limit.is_some_and(|l| beta <= l) && alpha_nm > 0.0;
                for c in 0..n {
                    let xb = m.col_xbar[c] as usize;
                    if pending[xb] && !(saturated[xb] && again_ok) {
                        let tab = (expert * n_kb + kb) * n + c;
                        out[[r, c]] += y[c] * (scale * m.col_scale[tab]);
                    }
                }
                for (pnd, &sat) in pending.iter_mut().zip(&saturated) {
                    *pnd = *pnd && sat && again_ok;
                }
                if !pending.contains(&true) {
                    break;
                }
                beta *= 2.0;
            }
        }
    }
    out
}

/// SwiGLU of interleaved gate/up outputs (`[rows, 2n]` → `[rows, n]`), as the kernel's epilogue.
pub fn swiglu_interleaved(gu: &Array2<f32>) -> Array2<f32> {
    let n = gu.ncols() / 2;
    Array2::from_shape_fn((gu.nrows(), n), |(r, j)| {
        let f = (j / 8) * 16 + j % 8;
        let (g, u) = (gu[[r, f]], gu[[r, f + 8]]);
        g / (1.0 + (-g).exp()) * u
    })
}

/// One MoE layer as [`super::layer::GpuMoeLayer::forward`] computes it: `x` `[T, d]`, pairs
/// `(expert_of_pair, weight_of_pair)` of `top_k` per token → `[T, d]`.
#[allow(clippy::too_many_arguments)]
pub fn moe_layer(
    gate_up: &GroupedMatrix,
    down: &GroupedMatrix,
    periphery: Option<&GemmPeriphery>,
    precision: Option<Precision>,
    seed: u64,
    mvm_id: u32,
    x: ArrayView2<f32>,
    expert_of_pair: &[u32],
    weight_of_pair: &[f32],
    top_k: usize,
) -> Array2<f32> {
    let mut y = Array2::<f32>::zeros((x.nrows(), down.n_cols));
    for e in 0..gate_up.n_experts {
        // Stable order: pairs of expert e by pair index (= token order).
        let pairs: Vec<usize> = (0..expert_of_pair.len())
            .filter(|&i| expert_of_pair[i] as usize == e)
            .collect();
        let xe = Array2::from_shape_fn((pairs.len(), x.ncols()), |(i, j)| x[[pairs[i] / top_k, j]]);
        let h = swiglu_interleaved(&grouped_rows(
            gate_up,
            e,
            xe.view(),
            periphery,
            precision,
            seed,
            mvm_id,
        ));
        let ye = grouped_rows(down, e, h.view(), periphery, precision, seed, mvm_id);
        for (i, &pair) in pairs.iter().enumerate() {
            let mut dst = y.row_mut(pair / top_k);
            dst.scaled_add(weight_of_pair[pair], &ye.row(i));
        }
    }
    y
}

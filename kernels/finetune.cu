// Hardware-aware fine-tuning on the GPU (backend::cuda::finetune, docs/finetune.md §2): the
// element-wise kernels around the analog grouped GEMMs and the cuBLAS products of one training
// step. Prepended: philox.cuh (for u32/u64). Compiled with --fmad=false so that the formulas
// round as the Rust ones of finetune::noisy and finetune::adam do (Adam is bit-identical to the
// CPU's for equal gradients).
//
// Layouts: grouped matrices are [E, N, K] with crossbar blocks of k_block rows along K and
// per-(expert, K block, column) tables [E, K/k_block, N] (backend::cuda::grouped).

typedef unsigned short u16;

__device__ __forceinline__ float ft_f16_to_f32(u16 h) {
#ifdef FT_HOST
    return ft_host_f16_to_f32(h);  // tests/finetune_kernels_host.rs compiles this file as C++
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
#endif
}

// max |w| over each row segment (e, c, kb) of k_block weights, one warp per segment; written
// at table index (e·n_kb + kb)·n + c. Segment s = (e·n + c)·n_kb + kb starts at s·k_block.
extern "C" __global__ void ft_segment_abs_max(const float* w, u32 n, u32 n_kb, u32 k_block, u64 segments,
                                              float* out) {
    const u64 s = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u32 lane = threadIdx.x & 31;
    if (s >= segments) return;
    const float* seg = w + s * k_block;
    float m = 0.0f;
    for (u32 j = lane; j < k_block; j += 32) m = fmaxf(m, fabsf(seg[j]));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) {
        const u64 ec = s / n_kb;
        const u32 kb = (u32)(s % n_kb);
        const u64 e = ec / n;
        const u32 c = (u32)(ec % n);
        out[(e * n_kb + kb) * n + c] = m;
    }
}

// The mapping scale s_map of every (e, kb, c), as tile::crossbar's map_weights: max |W| / ω
// over the column's row segment (seg_max, per-column mapping) or over the column's whole
// crossbar (xbar_bits, IEEE bits per (e·n_kb + kb)·n_xbar + col_xbar[c]), 1 where that is 0.
extern "C" __global__ void ft_map_scales(const float* seg_max, const u32* xbar_bits, const u32* col_xbar, u32 n,
                                         u32 n_xbar, u64 len, float omega, float* s_map) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float m;
    if (seg_max) {
        m = seg_max[i];
    } else {
        const u64 group = i / n;
        m = __uint_as_float(xbar_bits[group * n_xbar + col_xbar[i % n]]);
    }
    const float s = m / omega;
    s_map[i] = s > 0.0f ? s : 1.0f;
}

// Index into a per-(e, kb, c) table [E, K/k_block, N] of element i of weights [E, N, K]: its
// expert e, crossbar block kb along K and column c.
__device__ __forceinline__ u64 ft_block_column(u64 i, u32 n, u32 k, u32 k_block) {
    const u64 row = i / k;
    const u32 kk = (u32)(i % k), n_kb = k / k_block;
    const u64 e = row / n;
    const u32 c = (u32)(row % n);
    return (e * n_kb + kk / k_block) * n + c;
}

// out = w / s_map per (e, kb, c) over [E, N, K]: the target weights W/s_map whose mean |·| is
// the `global_exact` GDC reference.
extern "C" __global__ void ft_divide_by_scale(const float* w, const float* s_map, u64 len, u32 n, u32 k,
                                              u32 k_block, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    out[i] = w[i] / s_map[ft_block_column(i, n, k, k_block)];
}

// Ŵ = W̃·(s_map·α) per (e, kb, c) from the fp16 operand words (W̃ is binary16, exact): the
// effective noisy weights the backward multiplies with (finetune::noisy's w_eff).
extern "C" __global__ void ft_effective_weights(const u16* w16, const float* col_scale, u64 len, u32 n, u32 k,
                                                u32 k_block, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    out[i] = ft_f16_to_f32(w16[i]) * col_scale[ft_block_column(i, n, k, k_block)];
}

// The DAC's view of the inputs in input units, x̂ = α_nm·code·Δ (finetune::noisy's
// quantised_inputs), from moe_quantize's codes and α_nm ([rows, n_kb]); without a DAC the
// inputs themselves. Row p of the output is row row_of[p] of the inputs (or p when row_of is
// null): the token rows of the sorted pairs.
extern "C" __global__ void ft_dequantize(const u16* codes, const float* alpha, const float* x, const u32* row_of,
                                         u64 rows, u32 k, u32 k_block, u32 use_dac, float dac_step, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * k) return;
    const u64 p = i / k;
    const u32 j = (u32)(i % k);
    const u64 r = row_of ? (u64)row_of[p] : p;
    const u64 src = r * k + j;
    out[i] = use_dac ? alpha[r * (k / k_block) + j / k_block] * (ft_f16_to_f32(codes[src]) * dac_step) : x[src];
}

// Rows src[idx[r]] → out[r] ([rows, n]): one step's batch of the calibration rows.
extern "C" __global__ void ft_gather_rows(const float* src, const u32* idx, u64 rows, u32 n, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    out[i] = src[(u64)idx[i / n] * n + i % n];
}

// ŷ[t] = Σ weight·row over token t's k expert rows in ascending expert order (the sorted rows of
// a token's pairs ascend with the expert), each added to the running sum as finetune::noisy
// adds them (y + w·row, from 0): the same order as the CPU objective, deterministic.
#define FT_MAX_K 32
extern "C" __global__ void ft_combine(const float* rows, const u32* pos_of_pair, const float* sorted_weight,
                                      u32 tokens, u32 k, u32 n, float* y) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)tokens * n) return;
    const u64 t = i / n;
    const u32 c = (u32)(i % n);
    u32 pos[FT_MAX_K];
    for (u32 j = 0; j < k; ++j) {
        const u32 p = pos_of_pair[t * k + j];
        u32 q = j;
        while (q > 0 && pos[q - 1] > p) {
            pos[q] = pos[q - 1];
            --q;
        }
        pos[q] = p;
    }
    float acc = 0.0f;
    for (u32 j = 0; j < k; ++j) acc = acc + sorted_weight[pos[j]] * rows[(u64)pos[j] * n + c];
    y[i] = acc;
}

// Per row r of [rows, n]: Σ (ŷ − y)² and Σ y² in f64, one warp per row with a fixed reduction
// order (deterministic); the host sums the rows in order.
extern "C" __global__ void ft_row_sums(const float* y_hat, const float* y, u64 rows, u32 n, double* err,
                                       double* energy) {
    const u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u32 lane = threadIdx.x & 31;
    if (r >= rows) return;
    double se = 0.0, sy = 0.0;
    for (u32 j = lane; j < n; j += 32) {
        const float d = y_hat[r * n + j] - y[r * n + j];
        const double dv = (double)d, yv = (double)y[r * n + j];
        se += dv * dv;
        sy += yv * yv;
    }
    for (int o = 16; o > 0; o >>= 1) {
        se += __shfl_xor_sync(0xffffffffu, se, o);
        sy += __shfl_xor_sync(0xffffffffu, sy, o);
    }
    if (lane == 0) {
        err[r] = se;
        energy[r] = sy;
    }
}

// ∂L/∂ŷ = 2(ŷ − y)/Σ‖y‖², rounded to f32 as finetune::noisy does.
extern "C" __global__ void ft_output_grad(const float* y_hat, const float* y, u64 len, double norm, float* g) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float d = y_hat[i] - y[i];
    g[i] = (float)(2.0 * (double)d / norm);
}

// The straight-through mask of a clipping ADC (finetune::noisy's Product::backward): g = 0 where
// a crossbar block's output clipped (the clip count of the forward's draws is not 0).
extern "C" __global__ void ft_mask_clipped(float* g, const float* clipped, u64 len) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len && clipped[i] != 0.0f) g[i] = 0.0f;
}

// ∂L/∂(expert output) of every sorted pair: its token's ∂L/∂ŷ times its routing weight.
extern "C" __global__ void ft_pair_grad(const float* g_yhat, const u32* sorted_token, const float* sorted_weight,
                                        u64 pairs, u32 n, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs * n) return;
    const u64 p = i / n;
    out[i] = g_yhat[(u64)sorted_token[p] * n + i % n] * sorted_weight[p];
}

// SwiGLU's backward on rows whose columns interleave gate and up in groups of 8 (the grouped
// layout): for a = gate, u = up output and ∂L/∂h = gh, ∂L/∂a = gh·(u·σ(a)(1 + a(1 − σ(a)))) and
// ∂L/∂u = gh·silu(a), written in the same interleaved layout (finetune::noisy's silu_grad).
extern "C" __global__ void ft_swiglu_backward(const float* gu, const float* gh, u64 rows, u32 n_half, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n_half) return;
    const u64 r = i / n_half;
    const u32 j = (u32)(i % n_half), f = (j / 8) * 16 + j % 8;
    const u64 base = r * 2 * n_half;
    const float a = gu[base + f], u = gu[base + f + 8], g = gh[i];
    const float e = expf(-a);
    const float sg = 1.0f / (1.0f + e);
    const float silu = a / (1.0f + e);
    const float silu_grad = sg * (1.0f + a * (1.0f - sg));
    out[base + f] = g * (u * silu_grad);
    out[base + f + 8] = g * silu;
}

// One Adam step over n weights, as finetune::adam::Adam::step (bias corrections c1, c2 and the
// constants 1 − β computed on the host in f32 as there).
extern "C" __global__ void ft_adam(float* w, const float* g, float* m, float* v, u64 n, float lr, float c1, float c2,
                                   float beta1, float beta2, float one_minus_beta1, float one_minus_beta2,
                                   float eps) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i];
    const float mi = beta1 * m[i] + one_minus_beta1 * gi;
    const float vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
}

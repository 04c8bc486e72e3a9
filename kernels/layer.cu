// The element-wise kernels of a MoE layer around its GEMMs: to_f16 (analog weights as fp16
// operands, backend::cuda::grouped::GpuGroupedMatrix), bm_combine (bound management's per-block
// sums, backend::cuda::periphery::bound_management), swiglu_rows and scatter_rows (the
// store-mode SwiGLU and scatter-add, backend::cuda::layer), and combine_bf16_rows (the digital
// layer's deterministic combine, backend::cuda::layer::combine_bf16_rows). Mirrors
// model::moe::MoeLayer::forward's SwiGLU and weighted sum.
// Weights f32 → fp16 operand words, round to nearest even (analog operands; W̃ is binary16
// already after programming and drift, tile::operand::to_binary16, so this is exact).
extern "C" __global__ void to_f16(const float* w, u64 n, u16* out) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = f32_to_f16(w[i]);
}

// Step 8 of tile::Crossbar::forward_chunk, iterative bound management, after the attempts of MOE_MODE 4
// (backend::cuda::moe::bound_management): row pos_of_slot[s] of the store-mode output becomes
// the sum of its crossbar blocks' accepted outputs, in K-block order as moe_gemm's running total
// and tile::AnalogMatrix::mvm add them. y: [slots, KB, N].
extern "C" __global__ void bm_combine(const float* y, const u32* pos_of_slot, u32 slots, u32 n_kb, u32 n,
                                      float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)slots * n) return;
    const u64 s = i / n, c = i % n;
    const float* ys = y + s * n_kb * n + c;
    float v = 0.0f + ys[0];
    for (u32 kb = 1; kb < n_kb; ++kb) v += ys[(u64)kb * n];
    out[(u64)pos_of_slot[s] * n + c] = v;
}

// SwiGLU of store-mode rows whose columns interleave gate and up in groups of 8 (the host
// layout): out[p, g·8 + c] = silu(in[p, 16g + c])·in[p, 16g + 8 + c]; `n_half` = N/2.
extern "C" __global__ void swiglu_rows(const float* in, u64 rows, u32 n_half, float* out) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n_half) return;
    const u64 r = i / n_half;
    const u32 j = (u32)(i % n_half), f = (j / 8) * 16 + j % 8;
    out[i] = silu_mul(in[r * 2 * n_half + f], in[r * 2 * n_half + f + 8]);
}

// The digital layer's combine of its bf16 expert rows (MOE_MODE 5): y[t, c..c+8] = Σ_j w_j ·
// rows[pos_j, c..c+8] over token t's k pairs in slot order (pos_j = pos_of_pair[t·k + j], the
// pair's sorted row; w_j its router weight), in f32. 8 columns per thread (one 16-byte load per
// pair); `n` a multiple of 8. Deterministic, unlike the atomic scatter-add.
extern "C" __global__ void combine_bf16_rows(const u16* rows, const u32* pos_of_pair, const float* sorted_weight,
                                             u32 tokens, u32 k, u32 n, float* y) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 n8 = n / 8;
    if (i >= (u64)tokens * n8) return;
    const u64 t = i / n8;
    const u32 c = (u32)(i % n8) * 8;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 j = 0; j < k; ++j) {
        const u32 pos = pos_of_pair[t * k + j];
        const float w = sorted_weight[pos];
        const uint4 v = *(const uint4*)(rows + (u64)pos * n + c);
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (u32 q = 0; q < 4; ++q) {
            acc[2 * q] += w * __uint_as_float(words[q] << 16);
            acc[2 * q + 1] += w * __uint_as_float(words[q] & 0xffff0000u);
        }
    }
    float4* out = (float4*)(y + t * n + c);
    out[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    out[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

// Weighted scatter-add of store-mode rows: y[token of p] += weight of p · in[p] (as moe_gemm's
// MOE_MODE 2 epilogue).
extern "C" __global__ void scatter_rows(const float* in, u64 rows, u32 n, const u32* sorted_token,
                                        const float* sorted_weight, float* y) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    const u64 r = i / n;
    atomicAdd(y + (u64)sorted_token[r] * n + i % n, sorted_weight[r] * in[i]);
}

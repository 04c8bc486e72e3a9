// The DAC prologue of the analog GEMMs and the bf16 operands of the digital ones, once per
// input row (not per expert): moe_quantize mirrors tile::Crossbar::forward_chunk steps 1–2
// (noise management, Quantizer::quantize), launched by backend::cuda::periphery::quantize;
// to_bf16 by backend::cuda::grouped::to_bf16_device; gather_rows puts an operand in
// sorted-pair order. The f16/bf16 conversions here serve every later file.
// ---------------------------------------------------------------------------------------------
// Prologue: noise management + DAC per crossbar block along K, once per input row (not per
// expert). Mirrors tile::Crossbar::forward_chunk steps 1–2 (encode_row, Quantizer::quantize);
// stores the integer DAC code (exact in fp16) and α_nm. One warp per (row, block).

__device__ __forceinline__ u16 f32_to_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Two floats as the bf16 bits of one 32-bit word, a in the low half (round to nearest even).
__device__ __forceinline__ u32 bf16x2(float a, float b) {
    return (u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16);
}

// nm_kind: 0 ABS_MAX, 1 constant nm_value, 2 none. use_dac: 0 → x/α_nm in fp16 (inexact).
// sumsq (optional, ADDITIVE weight noise): ‖x̃‖² of each (row, block), x̃ = code·step.
extern "C" __global__ void moe_quantize(const float* x, u32 rows, u32 k, u32 k_block, u32 nm_kind, float nm_value,
                                        float beta, u32 use_dac, float dac_step, float dac_max_code, u16* xq,
                                        float* alpha, float* sumsq) {
    u32 n_kb = k / k_block;
    u64 task = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 lane = threadIdx.x & 31;
    if (task >= (u64)rows * n_kb) return;
    u32 row = (u32)(task / n_kb), kb = (u32)(task % n_kb);
    const float* seg = x + (u64)row * k + (u64)kb * k_block;
    u16* out = xq + (u64)row * k + (u64)kb * k_block;
    float scale = 1.0f;
    if (nm_kind == 0) {
        float m = 0.0f;
        for (u32 j = lane; j < k_block; j += 32) m = fmaxf(m, fabsf(seg[j]));
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        scale = m;
    } else if (nm_kind == 1) {
        scale = nm_value;
    }
    scale *= beta;  // bound-management attempt log2 β (1 otherwise)
    float ss = 0.0f;
    for (u32 j = lane; j < k_block; j += 32) {
        float q = 0.0f;
        if (scale != 0.0f) {
            float v = seg[j] / scale;
            q = use_dac ? fminf(fmaxf(rintf(v / dac_step), -dac_max_code), dac_max_code) : v;
        }
        out[j] = f32_to_f16(q);
        const float xv = use_dac ? q * dac_step : q;
        ss += xv * xv;
    }
    if (sumsq) {
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) sumsq[(u64)row * n_kb + kb] = ss;
    }
    if (lane == 0) alpha[(u64)row * n_kb + kb] = scale;
}

// The operand in sorted-pair order for the analog wgmma kernel's TMA stages (WG_PIPE 2), which
// cannot gather rows: dst row r = src row row_of[r], k halves each (k a multiple of 8), one
// 16-byte chunk per thread. Launched by backend::cuda::gemm::wgmma::sorted_operand.
extern "C" __global__ void gather_rows(const u16* src, const u32* row_of, u32 rows, u32 k, u16* dst) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 per_row = k / 8;
    if (i >= (u64)rows * per_row) return;
    const u64 r = i / per_row, c = i % per_row;
    *(uint4*)(dst + r * k + c * 8) = *(const uint4*)(src + (u64)row_of[r] * k + c * 8);
}

// Digital operand: x → bf16, 8 values (one 16-byte store) per thread, the tail one by one.
extern "C" __global__ void to_bf16(const float* x, u64 n, u16* out) {
    const u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 <= n && ((u64)(x + i) & 15) == 0 && ((u64)(out + i) & 15) == 0) {
        const float4 a = *(const float4*)(x + i), b = *(const float4*)(x + i + 4);
        *(uint4*)(out + i) = make_uint4(bf16x2(a.x, a.y), bf16x2(a.z, a.w), bf16x2(b.x, b.y), bf16x2(b.z, b.w));
    } else {
        for (u64 j = i; j < n && j < i + 8; ++j) out[j] = f32_to_bf16(x[j]);
    }
}

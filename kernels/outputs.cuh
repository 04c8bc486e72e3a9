// What a grouped GEMM does with its result rows (MOE_MODE, backend::cuda::gemm::GemmOutput):
// the weighted scatter-add's atomics, the SwiGLU of interleaved gate/up columns (silu_mul
// mirrors model::common::silu_mul for analog layers), and the f32 / bf16 row stores; plus the
// checks that refuse impossible MOE_MODE combinations at compile time.
// out[0..2] += (a, b): one 8-byte vector atomic on sm_90 (half the atomic operations of the
// weighted scatter-add), two scalar ones before. `out` is 8-byte aligned (even column).
__device__ __forceinline__ void atomic_add2(float* out, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd((float2*)out, make_float2(a, b));
#else
    atomicAdd(out, a);
    atomicAdd(out + 1, b);
#endif
}

// SwiGLU of one gate/up pair: silu(g)·u. Analog layers compute it as model::common::silu_mul
// does (expf, IEEE division), for parity with the CPU crossbars. Digital layers, whose operands
// and hidden rows are bf16, take the fast exponential and division: their error (a few f32 ulp,
// Programming Guide's intrinsic bounds) is far below the bf16 rounding that follows, and the
// exact pair cost the wgmma gate/up GEMM 28 % of its time in the epilogue on the OLMoE shape
// (2.01 ms against 1.44 with the epilogue skipped; reports/bench/2026-11-24-epilogue.md).
__device__ __forceinline__ float silu_mul(float g, float u) {
#if MOE_ANALOG
    return g / (1.0f + expf(-g)) * u;
#else
    return __fdividef(g * u, 1.0f + __expf(-g));
#endif
}

// Two adjacent SwiGLU outputs at element `i` (even) of the hidden rows: f32 (MOE_MODE 1) or the
// bf16 bits of the next GEMM's operand (MOE_MODE 3, digital: round to nearest even as to_bf16).
__device__ __forceinline__ void store_hidden(float* out, u64 i, float a, float b) {
#if MOE_MODE == 3
    *(u32*)((u16*)out + i) = bf16x2(a, b);
#else
    *(float2*)(out + i) = make_float2(a, b);
#endif
}

// Two adjacent store-mode outputs at element `i` (even) of the [P, N] rows: f32 (MOE_MODE 0) or
// bf16 bits (MOE_MODE 5, digital; round to nearest even as to_bf16).
__device__ __forceinline__ void store_row2(float* out, u64 i, float a, float b) {
#if MOE_MODE == 5
    *(u32*)((u16*)out + i) = bf16x2(a, b);
#else
    *(float2*)(out + i) = make_float2(a, b);
#endif
}

#if (MOE_MODE == 3 || MOE_MODE == 5) && MOE_ANALOG
#error "MOE_MODE 3 and 5 (bf16 rows) are digital only"
#endif
#if MOE_DIAG && !(MOE_ANALOG && (MOE_MODE == 0 || MOE_MODE == 4))
#error "MOE_DIAG (GDC readout) is analog, store mode or its bound-management attempts"
#endif
#if MOE_CLIP_COUNT && !(MOE_ANALOG && MOE_ADC && !MOE_BM && MOE_MODE == 0 && !MOE_DIAG)
#error "MOE_CLIP_COUNT (clipped blocks per output) is the analog store mode with an ADC, without bound management"
#endif
#if MOE_MODE == 4 && !(MOE_ANALOG && MOE_BM && MOE_ADC)
#error "MOE_MODE 4 (bound-management attempt) needs MOE_ANALOG, MOE_BM and MOE_ADC"
#endif

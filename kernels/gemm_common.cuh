// What both grouped-GEMM families share: the CTA tile macros of the mma.sync kernel (chosen
// by backend::cuda::gemm::tile::GemmTile), the kernel parameter block GemmParams (the
// #[repr(C)] backend::cuda::gemm::GemmParams, size checked by tests/kernels_compile.rs) and the
// PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16).
// ---------------------------------------------------------------------------------------------
// The grouped GEMM. CTA tile BM×BN over (rows of one expert) × (output columns), WARPS_M×WARPS_N
// warps of (BM/WARPS_M)×(BN/WARPS_N), BK = MOE_BK (32 or 64) per pipeline stage (cp.async, STAGES deep),
// ldmatrix + mma.sync m16n8k16. The host picks the tile per variant (moe::GemmTile): big tiles
// for the digital and plain analog variants, narrow ones where PCM_READ / IR drop add
// accumulators. Each expert's CTAs run in raster groups of MOE_RASTER_COLS columns, N tile
// fastest (tile_of_block), so the CTAs in flight share their A rows and weight tiles in L2.

#ifndef MOE_TILE_M
#define MOE_TILE_M 128
#endif
#ifndef MOE_TILE_N
#define MOE_TILE_N 128
#endif
#ifndef MOE_WARPS_M
#define MOE_WARPS_M 2
#endif
#ifndef MOE_WARPS_N
#define MOE_WARPS_N 4
#endif
#ifndef MOE_STAGES
#define MOE_STAGES 3
#endif
#ifndef MOE_BK
#define MOE_BK 32
#endif
#define BM MOE_TILE_M
#define BN MOE_TILE_N
#define BK MOE_BK
// Shared row stride in halves: BK + 8 (80 or 144 B) shifts each row by one 16-byte bank quad,
// so the 8 rows of an ldmatrix land on distinct banks.
#define LDS (BK + 8)
#define CHUNKS_PER_ROW (BK / 8)  // 16-byte cp.async chunks per row of a stage
#define NTHREADS (MOE_WARPS_M * MOE_WARPS_N * 32)
#define MI (BM / MOE_WARPS_M / 16)  // m16 fragments per warp
#define TN (BN / MOE_WARPS_N / 8)   // n8 fragments per warp
#define STAGE_HALVES (BM * LDS + BN * LDS)
#if (BK != 32 && BK != 64) || (BM * CHUNKS_PER_ROW) % NTHREADS != 0 || (BN * CHUNKS_PER_ROW) % NTHREADS != 0 || \
    TN % 2 != 0 || MI < 1 || MOE_STAGES < 2
#error "moe_gemm tile configuration"
#endif
// CTAs per SM the register allocation must allow: 2 (≤ 128 registers per thread on 256
// threads) where the f32 accumulator sets take at most 64 of them, so that one CTA's periphery
// epilogue overlaps the other's MMAs (the default tiles of backend::cuda::moe::GemmTile without
// PCM_READ or IR drop); else 1. Left to ptxas, the Lightning-set variant took 143 registers and
// ran 1 CTA per SM: 30.3 ms on the OLMoE layer against 20.9 at 2.
// (The running total counts as a set where it sits in shared memory too: the PCM_READ
// variants at 2 CTAs per SM spilled at 128 registers.)
#define MOE_ACC_SETS (MOE_ANALOG ? 2 + MOE_PCM_READ + 2 * MOE_IR_DROP : 1)
#if MOE_ACC_SETS * BM * BN / NTHREADS <= 64
#define MOE_MIN_CTAS 2
#else
#define MOE_MIN_CTAS 1
#endif

struct GemmParams {
    const u16* a;               // [a_rows, K] operand rows
    const float* a_alpha;       // [a_rows, KB] α_nm per row and K block (analog)
    const u32* a_row_of;        // sorted position → operand row (0: identity)
    const u16* w;               // [E, N, K] weights: fp16 W̃ (analog), bf16 (digital)
    const u32* offsets;         // [E + 1] rows of each expert in sorted order
    const u32* tile_offsets;    // [E + 1] BM-row tiles of each expert
    const u32* col_tensor_id;   // [E, KB, N] tensor id of the crossbar holding (column, K block)
    const float* col_scale;     // [E, KB, N] s_map · α_GDC
    const u32* col_local;       // [N] column inside its crossbar
    const u32* col_block_cols;  // [N] columns of its crossbar (noise index stride)
    const u32* sorted_token;    // [P] token of each sorted pair (scatter)
    const float* sorted_weight; // [P] router weight of each sorted pair (scatter)
    float* out;
    const float* a_sumsq;       // [a_rows, KB] ‖x̃‖² (ADDITIVE)
    const int* bm_slot;         // [P] (MOE_MODE 4) slot of the row in bm_scratch, −1: not redone
    u32* bm_flag;               // [P] MOE_MODE 0: 1 = the row has a saturated output (written);
                                //     MOE_MODE 4: 1 = the row has a pending crossbar (read)
    float* bm_scratch;          // [slots, KB, N] (MOE_MODE 4) scaled block outputs of the accepted attempts
    const u32* col_xbar;        // [N] crossbar column block of each column
    const u32* noise_key;       // [P, 2] (noise row, call) of each sorted pair (0: row inside the
                                // expert, mvm_id): a batch of sequences keys each as its own call
    const unsigned char* bm_pending;  // [slots, KB, n_xbar] (MOE_MODE 4) 1: redo this crossbar now
    unsigned char* bm_sat;            // [slots, KB, n_xbar] (MOE_MODE 4) set: an output saturated
    u64 seed;
    u32 k, n, n_kb, k_block, n_experts, mvm_id, n_xbar, use_dac;
    float dac_step, adc_step, adc_bound, out_noise, w_noise_std, ir_scale, ir_k, dac_max_code;
    u32 attempt;  // bound-management attempt of the output noise (0 outside MOE_MODE 4)
    u32 diag_k, diag_kb;  // MOE_DIAG: K of the viewed weights [E, N, diag_k], crossbar blocks per row
    float adc_step_inv;   // 1/adc_step, correctly rounded (adc_quotient)
    float adc_clip;       // adc_bound + 2·adc_step: |v| beyond saturates the ADC either way (adc_quotient)
    u32 round_keys[20];   // Philox round keys of `seed` (rng::philox_round_keys)
};

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
#if MOE_ANALOG
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#endif
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

#if MOE_ANALOG && (MOE_PCM_READ || MOE_IR_DROP)
// The side operands of one m16n8k16 A fragment `a` of DAC codes (binary16 pairs; registers 0
// and 1 hold crossbar rows j0, j0 + 1, registers 2 and 3 rows j0 + 8, j0 + 9), rounded to
// binary16 as the side products take them: x̃² (PCM_READ), |x̃| and f(j)·x̃ with the row-factor
// pairs f_lo of rows j0, j0 + 1 and f_hi of rows j0 + 8, j0 + 9 (IR drop). Both GEMM kernels
// form their side operands here; the fields a caller leaves unread cost nothing.
struct SideA {
#if MOE_PCM_READ
    u32 a2[4];
#endif
#if MOE_IR_DROP
    u32 aa[4], af[4];
#endif
};
__device__ __forceinline__ SideA side_operands(const u32* a, u32 f_lo, u32 f_hi) {
    SideA o;
#if MOE_PCM_READ
#pragma unroll
    for (u32 i = 0; i < 4; ++i) o.a2[i] = hmul2(a[i], a[i]);
#endif
#if MOE_IR_DROP
#pragma unroll
    for (u32 i = 0; i < 4; ++i) {
        o.aa[i] = a[i] & 0x7fff7fffu;
        o.af[i] = hmul2(a[i], i < 2 ? f_lo : f_hi);
    }
#else
    (void)f_lo;
    (void)f_hi;
#endif
    return o;
}
#endif

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// The sm_90a grouped GEMMs (MOE_WGMMA), their shared parts: the tile configuration (WG_*),
// the wgmma instructions and descriptors of 128B-swizzled shared tiles, the TMA and mbarrier
// helpers, the gathered-row loader and the cp.async stage ring, a CTA's tile (WgCta) and the
// output modes' epilogue. The kernels follow, each in its own file: gemm_wgmma_digital.cuh
// (moe_gemm_wgmma) and gemm_wgmma_analog.cuh (moe_analog_wgmma). Same contract and numbers as
// moe_gemm of the same variant; launched by backend::cuda::gemm::wgmma::wgmma_gemm (TMA
// descriptors: backend::cuda::gemm::tma).
#if MOE_WGMMA
// ---------------------------------------------------------------------------------------------
// wgmma.mma_async from 128B-swizzled shared memory, with moe_gemm's contract (GemmParams, the
// output modes, 128-row tiles of the routing). CTA 128 × WG_BN, two warpgroups of 64 rows each
// issuing m64n{WG_BN}k16, BK = 64 (one 128-byte swizzle atom per row), WG_STAGES shared-memory
// stages. A rows are gathered token rows, which sm_90 TMA cannot gather, so where no kernel
// copies them into sorted-pair order first every thread loads with cp.async and writes the
// swizzled layout itself. The schedules both kernels share:
//   WG_PIPE 0: wgmma.wait_group 0 after each step; loads run WG_STAGES − 1 steps ahead.
//   WG_PIPE 1: one wgmma group stays in flight across the barrier (wait_group 1), so the tensor
//              cores never wait on the loop's bookkeeping; loads run WG_STAGES − 2 steps ahead
//              (the slot refilled at step s was read by the MMAs of step s − 2, retired by every
//              warpgroup before the barrier of step s).
// WG_PIPE 2 and 3 are the kernels' own (see their files).
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "MOE_WGMMA needs --gpu-architecture=compute_90a"
#endif
#ifndef WG_BN
#define WG_BN 128
#endif
#ifndef WG_STAGES
#define WG_STAGES 4
#endif
#ifndef WG_PIPE
#define WG_PIPE 1
#endif
#if !(WG_BN == 128 || WG_BN == 256 || (MOE_ANALOG && WG_BN == 64))
#error "WG_BN must be 128 or 256 (or 64, analog)"
#endif
#if WG_PIPE > 3 || (WG_PIPE < 2 && WG_STAGES < 2 + WG_PIPE)
#error "WG_STAGES too small for WG_PIPE, or no such WG_PIPE"
#endif
#define WG_BM 128
#define WG_BK 64
#define WG_THREADS 256
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES (WG_BN * WG_BK * 2)
// The analog kernel's side products (PCM_READ: Σ|W̃|x̃²; IR drop: Σ|W̃||x̃| and Σ W̃ x̃ f(j)) read
// |W̃| as a second weight tile per stage, after the first.
#define WG_SIDE (MOE_ANALOG && (MOE_PCM_READ || MOE_IR_DROP))
#define WG_STAGE_BYTES (WG_A_BYTES + (1 + WG_SIDE) * WG_B_BYTES)
// Operand types: analog DAC codes × fp16 weights, digital bf16 × bf16.
#if MOE_ANALOG
#define WG_AB ".f16.f16"
#else
#define WG_AB ".bf16.bf16"
#endif
#define WG_AHEAD (WG_STAGES - 1 - WG_PIPE)

// Shared-memory matrix descriptor of a K-major bf16 tile with 128-byte rows in 128B-swizzle
// atoms of 8 rows: start address >> 4, leading byte offset 16 (unused by this layout), stride
// byte offset 1024 (between 8-row atoms), swizzle mode 1 (128B) in bits 62–63.
// Split for stepping along K: WG_DESC_HI (stride byte offset and swizzle mode) and
// wg_desc_lo (start address and leading byte offset) of an address below 2^18, whose mask is
// then a no-op and whose OR with the leading byte offset an add; 32 bytes on along K add 2.
#define WG_DESC_HI (((u64)(1024 >> 4) << 32) | (1ull << 62))
__device__ __forceinline__ u32 wg_desc_lo(u32 saddr) { return (saddr >> 4) + (16u >> 4 << 16); }
__device__ __forceinline__ u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)(16 >> 4) << 16) | WG_DESC_HI;
}

// Byte offset of 16-byte chunk c (0..7) of row r in a 128B-swizzled tile (1024-byte aligned).
__device__ __forceinline__ u32 wg_swizzle(u32 r, u32 c) { return r * 128u + ((c ^ (r & 7u)) << 4); }

// TMA and mbarriers: the warp-specialised digital kernel's weight tiles and the analog
// kernel's stages with WG_PIPE 2. TmaMap is the host's CUtensorMap (an opaque 128-byte
// object, 64-byte aligned as a kernel parameter).
struct __align__(64) TmaMap {
    u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// This thread's arrival on `bar` together with the bytes its TMA will complete there.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Returns once the phase of parity `parity` of the barrier has completed. The data a full
// barrier guards is made visible by the TMA's complete-tx and the producer's own release; an
// empty barrier guards no data (see mbar_arrive_cluster), so CTA scope suffices.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// Rows [y, y + box rows) × columns [x, x + box columns) of the 2-D tensor `map` into dst
// (this CTA's shared memory, laid out and swizzled as the map says), completing on `bar`.
__device__ __forceinline__ void tma_load_2d(const TmaMap* map, u32 dst, u32 bar, u32 x, u32 y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"((u64)map), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

// d[32] += A[64×16] · B[64×16]ᵀ for this warpgroup (scale-d 1; d is zeroed before the loop).
__device__ __forceinline__ void wgmma_m64n64k16(float* d, u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32" WG_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
          "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
          "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db));
}

#if WG_SIDE
// d[32] += A[64×16] · B[64×16]ᵀ with A from registers: this warp's 16 rows in the m16n8k16
// A-fragment layout (wg_a_frag). The registers stay untouched until a wgmma.wait_group retires
// the instruction.
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const u32 (&a)[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
          "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
          "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
#endif

// d[64] += A[64×16] · B[128×16]ᵀ for this warpgroup (scale-d 1; d is zeroed before the loop).
__device__ __forceinline__ void wgmma_m64n128k16(float* d, u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32" WG_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
          "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
          "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db));
}

// d[128] += A[64×16] · B[256×16]ᵀ for this warpgroup (scale-d 1; d is zeroed before the loop).
__device__ __forceinline__ void wgmma_m64n256k16(float* d, u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32" WG_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
          "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
          "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),
          "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),
          "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),
          "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]),
          "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]),
          "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]),
          "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),
          "+f"(d[127])
        : "l"(da), "l"(db));
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs.
__device__ __forceinline__ void wg_fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The 4 wgmma (one per k16) of one BK = 64 stage for the warpgroup whose 64 A rows start at
// s_a, weights at s_b (both 1024-byte aligned), with no fence or commit. The descriptors are wg_desc's, built once per
// stage and advanced by 32 bytes (2 in the address field) per k16: a shared address is below
// 2^18, so wg_desc's mask is a no-op and its OR with the leading-byte-offset field an add.
// (wg_desc per k16 cost ~10 instructions per wgmma, uniform and vector, in a loop bound by
// the instructions it issues.)
__device__ __forceinline__ void wg_mma_k16s(float* d, u32 s_a, u32 s_b) {
    const u32 a_lo = wg_desc_lo(s_a), b_lo = wg_desc_lo(s_b);
#pragma unroll
    for (u32 kk = 0; kk < WG_BK / 16; ++kk) {
        const u64 da = WG_DESC_HI | (a_lo + 2 * kk), db = WG_DESC_HI | (b_lo + 2 * kk);
#if WG_BN == 64
        wgmma_m64n64k16(d, da, db);
#elif WG_BN == 128
        wgmma_m64n128k16(d, da, db);
#else
        wgmma_m64n256k16(d, da, db);
#endif
    }
}
// wg_mma_k16s as one fenced and committed wgmma group.
__device__ __forceinline__ void wg_mma_stage(float* d, u32 s_a, u32 s_b) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    wg_mma_k16s(d, s_a, s_b);
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Loads of one stage (A: WG_BM gathered rows, B: WG_BN weight rows, 64 halves of K each) by
// THREADS threads into the 128B-swizzled layout: thread t takes 16-byte chunk t % 8 of rows
// t / 8 + (THREADS / 8)·i. A rows are kept as operand row indices (~0u: past the expert's
// rows, zero-filled), so a 128-thread producer holds 8 registers for them, not 16. The loads
// take the shared address of the thread's first chunk (chunk0): rows t / 8 + STEP·i share its
// swizzle phase (STEP is a multiple of 8), so chunk i sits STEP·i·128 bytes below it, and a
// caller that rotates that address with its slots computes no swizzle per stage.
template <u32 THREADS>
struct WgLoader {
    static constexpr u32 STEP = THREADS / 8, A_CH = WG_BM / STEP, B_CH = WG_BN / STEP;
    u32 a_row[A_CH];
    u64 w_off;  // element offset of this thread's first weight chunk
    __device__ __forceinline__ WgLoader(const GemmParams& p, u32 t, u32 e, u32 row_begin, u32 rows_e, u32 m0, u32 n0) {
#pragma unroll
        for (u32 i = 0; i < A_CH; ++i) {
            const u32 r = (t >> 3) + STEP * i, pos = row_begin + m0 + r;
            a_row[i] = m0 + r < rows_e ? (p.a_row_of ? p.a_row_of[pos] : pos) : ~0u;
        }
        w_off = ((u64)e * p.n + n0 + (t >> 3)) * p.k + (t & 7) * 8;
    }
    // Thread t's first chunk in the stage whose A starts at s_a.
    static __device__ __forceinline__ u32 chunk0(u32 t, u32 s_a) { return s_a + wg_swizzle(t >> 3, t & 7); }
    // cp.async of stage k0: A at dst (chunk0 of the stage), then (load) B WG_A_BYTES on; the
    // caller commits.
    __device__ __forceinline__ void load_a(const GemmParams& p, u32 t, u32 dst, u32 k0) const {
        const u32 ck = (t & 7) * 8 + k0;
#pragma unroll
        for (u32 i = 0; i < A_CH; ++i) {
            const bool ok = a_row[i] != ~0u;
            cp_async16(dst + STEP * i * 128, p.a + ((u64)(ok ? a_row[i] : 0u) * p.k + ck), ok ? 16u : 0u);
        }
    }
    __device__ __forceinline__ void load(const GemmParams& p, u32 t, u32 dst, u32 k0) const {
        load_a(p, t, dst, k0);
        const u16* w_src = p.w + w_off + k0;
#pragma unroll
        for (u32 i = 0; i < B_CH; ++i) cp_async16(dst + WG_A_BYTES + STEP * i * 128, w_src + (u64)(STEP * i) * p.k, 16u);
    }
};

// The tile a CTA of the one-CTA-per-tile kernels (WG_PIPE 0 and 1, digital and analog) takes
// (tile_of_block) and this thread's place in it.
struct WgCta {
    u32 base;             // shared address of the stages, aligned to the 1024-byte swizzle atom
    u32 e, row_begin, rows_e, m0, n0;  // expert, its sorted rows, the tile's first row and column
    u32 t, lane, wg, warp_in_wg;
};

// Tile b (blockIdx.x for the one-tile schedules); false past the last tile.
__device__ __forceinline__ bool wg_cta(const GemmParams& p, unsigned char* smem, u32 b, WgCta& c) {
    u32 m_tile, n_tile;
    if (!tile_at(p, b, p.n / WG_BN, MOE_RASTER_COLS / WG_BN, c.e, m_tile, n_tile)) return false;
    c.base = (smem_addr(smem) + 1023u) & ~1023u;  // the host adds 1024 bytes of slack
    c.row_begin = p.offsets[c.e];
    c.rows_e = p.offsets[c.e + 1] - c.row_begin;
    c.m0 = m_tile * WG_BM;
    c.n0 = n_tile * WG_BN;
    c.t = threadIdx.x;
    c.lane = c.t & 31;
    // Broadcast from lane 0: ptxas then knows the warpgroup index to be warp-uniform and keeps
    // the A descriptors that depend on it in uniform registers (no R2UR per wgmma).
    c.wg = __shfl_sync(~0u, c.t >> 7, 0);
    c.warp_in_wg = (c.t >> 5) & 3;
    return true;
}

// The cp.async stage ring of the one-CTA-per-tile kernels: all WG_THREADS threads load,
// WG_AHEAD K steps ahead of the step being multiplied. The slots rotate as counters and each
// thread's shared destination with them; a copy's source is one 64-bit multiply-add of its row
// and the step's K offset. (Recomputed from scratch per step, slot by step % WG_STAGES and
// destination by the swizzle, the loads were a third of the analog step loop's instructions
// outside its periphery. 64-bit source pointers kept per chunk would save a few more, but
// spill the analog kernel with per-column-pair normals at its 128-register bound.)
struct WgStages {
    WgLoader<WG_THREADS> loader;
    u32 load_dst;            // this thread's chunk0 in the slot the next load fills
    u32 base, n_steps;       // shared address of slot 0; K steps of WG_BK
    u32 load_slot, read_slot;  // byte offsets of the slots the next load fills and the next step reads
    __device__ __forceinline__ WgStages(const GemmParams& p, const WgCta& c)
        : loader(p, c.t, c.e, c.row_begin, c.rows_e, c.m0, c.n0), load_dst(WgLoader<WG_THREADS>::chunk0(c.t, c.base)),
          base(c.base), n_steps(p.k / WG_BK), load_slot(0), read_slot(0) {}
    // K step `step` into the next slot, as one commit group (empty past the last step, so that
    // the group count, which cp.async.wait_group counts in, stays uniform).
    __device__ __forceinline__ void load(const GemmParams& p, u32 step) {
        if (step < n_steps) loader.load(p, threadIdx.x, load_dst, step * WG_BK);
        asm volatile("cp.async.commit_group;\n" ::);
        const bool wrap = load_slot == (WG_STAGES - 1) * WG_STAGE_BYTES;
        load_slot = wrap ? 0 : load_slot + WG_STAGE_BYTES;
        load_dst = wrap ? load_dst - (WG_STAGES - 1) * WG_STAGE_BYTES : load_dst + WG_STAGE_BYTES;
    }
    // Prologue: the first WG_AHEAD steps in flight.
    __device__ __forceinline__ void start(const GemmParams& p) {
#pragma unroll
        for (u32 st = 0; st < WG_AHEAD; ++st) load(p, st);
    }
    // Waits until step `step` (with WG_SIDE, step + 1 too) has landed for every thread, refills
    // the slot WG_AHEAD steps on and returns step's slot (steps in order, from 0). After the
    // barrier every warpgroup is also done with the slot the refill overwrites: step +
    // WG_AHEAD − WG_STAGES = step − 1 − WG_PIPE, whose wgmma retired at the wait_group WG_PIPE
    // of an earlier step.
    __device__ __forceinline__ u32 next(const GemmParams& p, u32 step) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_AHEAD - 1 - WG_SIDE));
        // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        load(p, step + WG_AHEAD);
        const u32 s = base + read_slot;
        read_slot = read_slot == (WG_STAGES - 1) * WG_STAGE_BYTES ? 0 : read_slot + WG_STAGE_BYTES;
        return s;
    }
    // The side-product kernel's view of the slot after the one a step reads, whose |W̃| tile
    // that step makes (the interface of WgTmaStages): the first step's slot after start,
    // waited for by every thread; later, next has waited for it already.
    __device__ __forceinline__ void wait_first() const {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_AHEAD - 1));
        __syncthreads();
    }
    __device__ __forceinline__ void wait_next() const {}
    __device__ __forceinline__ u32 next_slot() const { return base + read_slot; }
};

// bf16 outputs of four consecutive 8-column groups as one 16-byte store per lane: lane q of a
// quad (the 4 lanes that share an accumulator row) holds v[g] = columns 2q, 2q + 1 of group g;
// a 4 × 4 transpose across the quad (two butterfly rounds of shuffles) leaves it columns 0–7
// of group q, which it writes at dst_q if `live` (a row's 64 contiguous bytes per quad, whole
// sectors, instead of four 4-byte stores per lane). Every lane of the warp takes part.
__device__ __forceinline__ void store_quad_bf16(u32 (&v)[4], u32 lane, u16* dst_q, bool live) {
    const bool odd = lane & 1, high = lane & 2;
#pragma unroll
    for (u32 i = 0; i < 4; i += 2) {  // 2 × 2 blocks: swap v[i + 1] of even lanes, v[i] of odd
        const u32 got = __shfl_xor_sync(~0u, odd ? v[i] : v[i + 1], 1);
        if (odd) v[i] = got; else v[i + 1] = got;
    }
#pragma unroll
    for (u32 i = 0; i < 2; ++i) {  // blocks of blocks: v[i + 2] of lanes 0–1, v[i] of lanes 2–3
        const u32 got = __shfl_xor_sync(~0u, high ? v[i] : v[i + 2], 2);
        if (high) v[i] = got; else v[i + 2] = got;
    }
    if (live) *(uint4*)dst_q = make_uint4(v[0], v[1], v[2], v[3]);
}

// Output of one warpgroup's 64 × WG_BN accumulators, rows row0 .. row0 + 63 of the expert's
// tile. Fragment of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 (+ 8), n8 block j
// holds columns 8j + 2·(lane % 4) (+ 1): d[4j + 2·half + c].
__device__ __forceinline__ void wg_epilogue(const GemmParams& p, const float* d, u32 row_begin, u32 rows_e, u32 row0,
                                            u32 n0, u32 warp_in_wg, u32 lane) {
#if MOE_MODE == 3 || MOE_MODE == 5
    // bf16 rows: the quad's lanes must all reach the shuffles, so rows past the expert's are
    // masked at the store, not skipped.
    const u32 q = lane & 3;
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        const u32 row_local = row0 + warp_in_wg * 16 + (lane >> 2) + half * 8;
        const bool live = row_local < rows_e;
        const u64 pos = row_begin + row_local;
#if MOE_MODE == 5
        u16* row = (u16*)p.out + pos * p.n + n0;
#pragma unroll
        for (u32 j = 0; j < WG_BN / 8; j += 4) {
            u32 v[4];
#pragma unroll
            for (u32 g = 0; g < 4; ++g) v[g] = bf16x2(d[4 * (j + g) + 2 * half], d[4 * (j + g) + 2 * half + 1]);
            store_quad_bf16(v, lane, row + (j + q) * 8, live);
        }
#else
        // Columns come interleaved in groups of 8: gate group g, up group g (host layout); each
        // pair of groups gives 8 hidden columns.
        u16* row = (u16*)p.out + pos * (p.n / 2) + n0 / 2;
#pragma unroll
        for (u32 j = 0; j < WG_BN / 8; j += 8) {
            u32 v[4];
#pragma unroll
            for (u32 g = 0; g < 4; ++g) {
                const u32 jg = j + 2 * g;
                v[g] = bf16x2(silu_mul(d[4 * jg + 2 * half], d[4 * (jg + 1) + 2 * half]),
                              silu_mul(d[4 * jg + 2 * half + 1], d[4 * (jg + 1) + 2 * half + 1]));
            }
            store_quad_bf16(v, lane, row + (j / 2 + q) * 8, live);
        }
#endif
    }
#else
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        const u32 row_local = row0 + warp_in_wg * 16 + (lane >> 2) + half * 8;
        if (row_local >= rows_e) continue;
        const u32 pos = row_begin + row_local;
#if MOE_MODE == 0
#pragma unroll
        for (u32 j = 0; j < WG_BN / 8; ++j) {
            const u32 col = n0 + j * 8 + (lane & 3) * 2;
            store_row2(p.out, (u64)pos * p.n + col, d[4 * j + 2 * half], d[4 * j + 2 * half + 1]);
        }
#elif MOE_MODE == 1
        // Columns come interleaved in groups of 8: gate group g, up group g (host layout).
#pragma unroll
        for (u32 j = 0; j < WG_BN / 8; j += 2) {
            const u32 col = n0 + j * 8;
            const u32 hcol = (col / 16) * 8 + (lane & 3) * 2;
            float h[2];
#pragma unroll
            for (u32 c = 0; c < 2; ++c) {
                h[c] = silu_mul(d[4 * j + 2 * half + c], d[4 * (j + 1) + 2 * half + c]);
            }
            store_hidden(p.out, (u64)pos * (p.n / 2) + hcol, h[0], h[1]);
        }
#else
        const u32 token = p.sorted_token[pos];
        const float w = p.sorted_weight[pos];
#pragma unroll
        for (u32 j = 0; j < WG_BN / 8; ++j) {
            float* dst = p.out + (u64)token * p.n + n0 + j * 8 + (lane & 3) * 2;
            atomic_add2(dst, w * d[4 * j + 2 * half], w * d[4 * j + 2 * half + 1]);
        }
#endif
    }
#endif
}

#endif

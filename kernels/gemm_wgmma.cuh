// The sm_90a grouped GEMMs (MOE_WGMMA): moe_gemm_wgmma (digital; pipelined, or warp-specialised
// with TMA weight tiles, optionally in clusters of two) and moe_analog_wgmma (analog, the same
// periphery epilogue as moe_gemm). Same contract and numbers as moe_gemm of the same variant;
// launched by backend::cuda::gemm::wgmma::wgmma_gemm (TMA descriptors:
// backend::cuda::gemm::tma::weight_tensor_map).
#if MOE_WGMMA
// ---------------------------------------------------------------------------------------------
// The digital grouped GEMM for sm_90a: wgmma.mma_async from 128B-swizzled shared memory. Same
// contract as moe_gemm with MOE_ANALOG 0 (GemmParams, MOE_MODE 0/1/2, 128-row tiles of the
// routing). CTA 128 × WG_BN, two warpgroups of 64 rows each issuing m64n{WG_BN}k16, BK = 64 (one
// 128-byte swizzle atom per row), WG_STAGES shared-memory stages. A rows are gathered token rows,
// which sm_90 TMA cannot gather, so every thread loads with cp.async and writes the swizzled
// layout itself.
//   WG_PIPE 0: wgmma.wait_group 0 after each step; loads run WG_STAGES − 1 steps ahead.
//   WG_PIPE 1: one wgmma group stays in flight across the barrier (wait_group 1), so the tensor
//              cores never wait on the loop's bookkeeping; loads run WG_STAGES − 2 steps ahead
//              (the slot refilled at step s was read by the MMAs of step s − 2, retired by every
//              warpgroup before the barrier of step s).
//   WG_PIPE 2: warp-specialised persistent kernel, one loading warpgroup and two MMA
//              warpgroups synchronised by mbarriers, weights by TMA (see there).
//   WG_PIPE 3: as 2, in clusters of two CTAs that multicast the weight tile.
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

#if MOE_ANALOG
// moe_analog_wgmma: the analog grouped GEMM for sm_90a (moe_gemm's contract with MOE_ANALOG 1,
// output modes 0–2): DAC codes × fp16 weights by wgmma, 128 × WG_BN CTA tiles (WG_BN 128, or
// 64 for two CTAs per multiprocessor), two warpgroups of 64 rows, cp.async loads by all 256
// threads and one wgmma group in flight across the barrier (WG_PIPE 1) or not (0), or TMA
// loads by one thread and none in flight (2: WgTmaStages; the host passes A in sorted-pair
// order). The
// crossbar periphery (block_outputs) of block kb runs while the wgmma of block kb + 1 do: at
// the end of a block each thread moves its accumulators to `prev` in shared memory and zeroes
// them, and each of the MOE_KB_STEPS steps of the next block issues its wgmma and then
// finishes its share of prev's fragment pairs on the CUDA cores before it waits for them
// (wg_block_part). (mma.sync moe_gemm overlaps the two only across its 2 CTAs per SM.)
// Registers: the block sums d and the running total, WG_BN / 2 each per thread; prev in
// registers too spilled 580 bytes (ptxas, 128 columns). Shared memory: the stages, then prev
// ([WG_BN / 2][256] f32, thread-minor: conflict-free).
// Side products (WG_SIDE: PCM_READ's Σ|W̃|x̃², IR drop's Σ|W̃||x̃| and Σ W̃ x̃ f(j)) run on the
// 64-column tile, one CTA per multiprocessor: their accumulator sets (32 registers each) are
// wgmma with A from registers (wg_side_a: one ldmatrix per k16 step, then x̃², |x̃|, f(j)·x̃ as
// moe_gemm forms them) and B from shared memory, W̃ or the |W̃| tile that each step makes for
// the next (wg_abs_tile). The IR drop is applied as a block ends (finish_block: block_value),
// so prev holds the values and, with PCM_READ, Σ|W̃|x̃² (two planes); the running total moves
// to shared memory after them.
// The periphery is bound by the issue latency of its dependency chains (Philox rounds, the
// table normal, the ADC's residual steps): the 128-column tile leaves 8 warps per SM (200
// registers, 208 KiB of shared memory) where moe_gemm has 16, hence the 64-column tile, and
// the two rows of a fragment pair run interleaved (wg_block_part). Speed records:
// reports/bench/ (2026-11-24-analog-wgmma.md, 2026-12-07-analog-wgmma-64.md).
// WG_PIPE 2 (WG_TMA): the stages come by TMA instead of every thread's cp.async (WgTmaStages),
// each step's wgmma retired at its end as with WG_PIPE 0.
#define WG_TMA (WG_PIPE == 2)
#if MOE_MODE == 3 || WG_BN > 128 || WG_PIPE > 2 || (WG_SIDE && (WG_BN != 64 || WG_PIPE == 1 || WG_STAGES < 3)) || \
    (WG_TMA && WG_STAGES < 3)
#error "the analog wgmma GEMM: output modes 0-2, WG_BN 64 or 128, WG_PIPE 0, 1 or 2 (2: WG_STAGES >= 3); with side products WG_BN 64, WG_PIPE 0 or 2, WG_STAGES >= 3"
#endif
// CTAs per multiprocessor: the 64-column tile fits two (128 registers per thread, 105 KiB of
// shared memory with 3 stages), the 128-column tile one, and so does the 64-column tile with
// side products (their accumulator sets take 32 registers each).
#define WG_ANALOG_CTAS (WG_BN == 64 && !WG_SIDE ? 2 : 1)
// prev's planes (block_values of the previous block): the values y, and with PCM_READ the sums
// Σ|W̃|x̃²; WG_PLANE floats each. With side products the running total follows them.
#define WG_PLANES (1 + MOE_PCM_READ)
#define WG_PLANE ((WG_BN / 2) * WG_THREADS)
#ifndef MOE_KB_STEPS
#error "MOE_KB_STEPS (crossbar rows per block / 64) must be defined"
#endif
#define WG_PAIRS (WG_BN / 16)  // n8 fragment pairs per warpgroup row

// The column constants of one fragment pair (16 columns of the tile) of a crossbar block: this
// thread's s_map·α_GDC of columns (col0, col0 + 1) and (col0 + 8, col0 + 9), and the keys of
// its output-noise stream. The kernel loads those of the next pair while the current one runs
// (wg_block_part), so that no Philox chain starts on a load just issued.
struct WgCols {
    float2 scale[2];
#if MOE_OUT_NOISE || MOE_ADDITIVE
    NoiseCols nc;
#endif
};
__device__ __forceinline__ WgCols wg_cols(const GemmParams& p, const u32* tid_of_col, const float* scale_of_col, u32 n0,
                                          u32 lane, u32 fp) {
    const u32 col0 = n0 + fp * 16 + (lane & 3) * 2;
    WgCols c;
    c.scale[0] = *(const float2*)(scale_of_col + col0);
    c.scale[1] = *(const float2*)(scale_of_col + col0 + 8);
#if MOE_OUT_NOISE || MOE_ADDITIVE
    c.nc = noise_cols(p, tid_of_col, col0, lane);
#else
    (void)p;
    (void)tid_of_col;
#endif
    return c;
}

// The periphery of the fragment pairs of `prev` (one block; this thread's value i at
// prev[i·256]) that step j of the next block takes, pairs [j·WG_PAIRS/KB_STEPS,
// (j + 1)·WG_PAIRS/KB_STEPS), both rows (halves) of this thread. Each output's contribution
// to the running total replaces its block sum in prev; the caller adds prev to the total once
// the block is done. `cols` holds the first pair's column constants and is left holding the
// next one's. One copy of this code, called in a loop: unrolled over the block's steps it made
// the kernel 226 KB of SASS, and a third of Nsight Compute's stall samples were
// instruction-cache misses (stall_no_inst).
// Both rows run as one straight-line block, rows past the expert's included (their BlockRow
// is all zero: finite outputs that no one stores, α_nm = 0 flags no saturation and counts no
// clip), so that ptxas interleaves their two Philox chains: with a branch per row each chain
// ran alone, a dependent IMAD/LOP3 sequence on the 8 warps the kernel has per SM.
__device__ __forceinline__ void wg_block_part(const GemmParams& p, u32 j, float* prev, const BlockRow* br,
                                              WgCols& cols, const u32* tid_of_col, const float* scale_of_col,
                                              u32 n0, u32 lane, u32& bm_rows) {
#pragma unroll 1
    for (u32 fp = j * WG_PAIRS / MOE_KB_STEPS; fp < (j + 1) * WG_PAIRS / MOE_KB_STEPS; ++fp) {
        const WgCols cur = cols;
        if (fp + 1 < WG_PAIRS) cols = wg_cols(p, tid_of_col, scale_of_col, n0, lane, fp + 1);
        float2 z[2][2] = {};
#if MOE_OUT_NOISE || MOE_ADDITIVE
        output_normals_rows2(p, br, cur.nc, lane, z);
#endif
#pragma unroll
        for (u32 half = 0; half < 2; ++half)
#pragma unroll
            for (u32 f = 0; f < 2; ++f) {
                float* v = prev + (4 * (2 * fp + f) + 2 * half) * WG_THREADS;
                // 0 + x is x for every x but −0 (→ +0), which adds to the total as −0 would:
                // the total is never −0 (it starts at +0, and a sum is −0 only of two −0s).
                float c[2] = {0.0f, 0.0f};
#if WG_SIDE
                BlockValues b;
                b.y[0] = v[0];
                b.y[1] = v[WG_THREADS];
#if MOE_PCM_READ
                b.s2[0] = v[WG_PLANE];
                b.s2[1] = v[WG_PLANE + WG_THREADS];
#endif
                block_outputs_of(p, br[half], cur.scale[f], b, z[half][f], c, bm_rows, 1u << half);
#else
                PairSums s;
                s.acc[0] = v[0];
                s.acc[1] = v[WG_THREADS];
                block_outputs(p, br[half], cur.scale[f], s, z[half][f], c, bm_rows, 1u << half);
#endif
                v[0] = c[0];
                v[WG_THREADS] = c[1];
            }
    }
}

#if WG_SIDE
// The side products' accumulator sets of one thread (the layout of d).
struct WgSideAcc {
#if MOE_PCM_READ
    float s2[WG_BN / 2];  // Σ|W̃|x̃²
#endif
#if MOE_IR_DROP
    float abs[WG_BN / 2], ir[WG_BN / 2];  // Σ|W̃||x̃|, Σ W̃ x̃ f(j)
#endif
};
__device__ __forceinline__ void wg_fence_side(WgSideAcc& a) {
#if MOE_PCM_READ
    wg_fence_acc(a.s2);
#endif
#if MOE_IR_DROP
    wg_fence_acc(a.abs);
    wg_fence_acc(a.ir);
#endif
}

// The register A operands (side_operands) of k16 step kk of K step j of a crossbar block for
// this warp's 16 rows of the warpgroup's A tile at s_a: the m16n8k16 A-fragment layout that
// wgmma takes from registers, by one ldmatrix from the 128B-swizzled tile.
__device__ __forceinline__ SideA wg_side_a(const GemmParams& p, u32 s_a, u32 warp_in_wg, u32 lane, u32 j, u32 kk) {
    u32 a[4];
    ldmatrix_x4(s_a + wg_swizzle(warp_in_wg * 16 + (lane & 15), kk * 2 + (lane >> 4)), a[0], a[1], a[2], a[3]);
#if MOE_IR_DROP
    const u32 j0 = j * WG_BK + kk * 16 + (lane & 3) * 2;
    return side_operands(a, ir_pair(j0, p.k_block), ir_pair(j0 + 8, p.k_block));
#else
    (void)p;
    (void)j;
    return side_operands(a, 0u, 0u);
#endif
}

// The side wgmma of k16 step kk: x̃² and |x̃| against |W̃| (abs_b), f(j)·x̃ against W̃ (s_b).
__device__ __forceinline__ void wg_side_mma(WgSideAcc& acc, const SideA& o, u32 s_b, u32 kk) {
    const u32 b_lo = wg_desc_lo(s_b) + 2 * kk;
    const u64 db = WG_DESC_HI | b_lo, dabs = WG_DESC_HI | (b_lo + (WG_B_BYTES >> 4));
#if MOE_PCM_READ
    wgmma_m64n64k16_rs(acc.s2, o.a2, dabs);
#endif
#if MOE_IR_DROP
    wgmma_m64n64k16_rs(acc.abs, o.aa, dabs);
    wgmma_m64n64k16_rs(acc.ir, o.af, db);
#else
    (void)db;
#endif
}

// |W̃| of the weight tile at s_b into the WG_B_BYTES after it (sign bits cleared, same layout),
// by all WG_THREADS threads, each 16 bytes at a time.
__device__ __forceinline__ void wg_abs_tile(u32 s_b, u32 t) {
#pragma unroll
    for (u32 i = 0; i < WG_B_BYTES / 16 / WG_THREADS; ++i) {
        const u32 at = s_b + (t + i * WG_THREADS) * 16;
        u32 v0, v1, v2, v3;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                     : "r"(at)
                     : "memory");
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(at + WG_B_BYTES), "r"(v0 & 0x7fff7fffu),
                     "r"(v1 & 0x7fff7fffu), "r"(v2 & 0x7fff7fffu), "r"(v3 & 0x7fff7fffu)
                     : "memory");
    }
}
#endif

#if WG_TMA
// The TMA stage ring of WG_PIPE 2: thread 0 requests each stage's A rows (a_map: the operand
// in sorted-pair order, rows row_begin + m0 .. + 127) and weight rows (w_map: [E·N, K], rows
// e·N + n0 .. + WG_BN − 1), 64 columns of K each, by TMA into the 128B-swizzled layout,
// WG_STAGES − 1 steps ahead, with one arrival and the copies' bytes on the slot's mbarrier;
// every thread waits on that barrier. Rows past the expert's come in too (the next expert's,
// or zeros past the operand's end): their BlockRow is all zero, so they add nothing
// (wg_block_part). No thread issues a copy or computes an address: WgStages spent ~45 of the
// 64-column tile's 122 step instructions on its six copies per thread and their addresses.
// The ring runs on across the tiles of a persistent CTA (begin): slot and phase continue, and
// every tile consumes what it loads.
struct WgTmaStages {
    const TmaMap* a_map;
    const TmaMap* w_map;
    u32 base, bars;             // shared addresses of slot 0 and of its mbarrier (8 bytes per slot)
    u32 n_steps, a_row, w_row;  // K steps of WG_BK; the TMA row coordinates of the tile
    u32 load_slot, read_slot;   // the slots the next load fills and the next step reads
    u32 phase;                  // parity of the phase read_slot completes next
    bool leader;                // thread 0, which issues the copies
    __device__ __forceinline__ WgTmaStages(const GemmParams& p, const WgCta& c, const TmaMap* a, const TmaMap* w,
                                           u32 bars_)
        : a_map(a), w_map(w), base(c.base), bars(bars_), n_steps(p.k / WG_BK), a_row(0), w_row(0), load_slot(0),
          read_slot(0), phase(0), leader(c.t == 0) {}
    // Step `step` of the tile into the next slot; none past the last step, so that the slots
    // loaded and read stay in step across tiles.
    __device__ __forceinline__ void load(u32 step) {
        if (step >= n_steps) return;
        if (leader) {
            const u32 bar = bars + 8 * load_slot, dst = base + load_slot * WG_STAGE_BYTES;
            mbar_arrive_expect_tx(bar, WG_A_BYTES + WG_B_BYTES);
            tma_load_2d(a_map, dst, bar, step * WG_BK, a_row);
            tma_load_2d(w_map, dst + WG_A_BYTES, bar, step * WG_BK, w_row);
        }
        load_slot = load_slot == WG_STAGES - 1 ? 0 : load_slot + 1;
    }
    // Tile c's first WG_STAGES − 1 steps in flight; every slot is free (the previous tile's
    // wgmma have retired and a barrier followed).
    __device__ __forceinline__ void begin(const GemmParams& p, const WgCta& c) {
        a_row = c.row_begin + c.m0;
        w_row = c.e * p.n + c.n0;
#pragma unroll
        for (u32 st = 0; st + 1 < WG_STAGES; ++st) load(st);
    }
    // Waits until the slot the next step reads has landed (again, where it already has).
    __device__ __forceinline__ void wait_next() const { mbar_wait(bars + 8 * read_slot, phase); }
    __device__ __forceinline__ void wait_first() const { wait_next(); }
    // Shared address of the slot the next step reads.
    __device__ __forceinline__ u32 next_slot() const { return base + read_slot * WG_STAGE_BYTES; }
    // Refills the slot that step − 1 read (every warpgroup retired its wgmma at the end of
    // step − 1, before the barrier) with step + WG_STAGES − 1, waits until step's slot has
    // landed and returns its shared address (a tile's steps in order, from 0). With side
    // products each step wrote the next one's |W̃| tile through the generic proxy, which the
    // fence hands to the wgmma's async proxy before the barrier.
    __device__ __forceinline__ u32 next(const GemmParams& p, u32 step) {
        (void)p;
#if WG_SIDE
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
        __syncthreads();
        load(step + WG_STAGES - 1);
        wait_next();
        const u32 s = next_slot();
        const bool wrap = read_slot == WG_STAGES - 1;
        read_slot = wrap ? 0 : read_slot + 1;
        phase ^= wrap ? 1u : 0u;
        return s;
    }
};
#endif

// With side products the kernel is persistent (WG_PERSIST): one CTA per multiprocessor walks
// tiles b, b + gridDim.x, ... (raster order, as the one-tile CTAs run), and the last crossbar
// block's periphery of one tile runs beside the first block's wgmma of the next, whose end then
// takes the earlier tile's total to its epilogue. One tile per CTA left that periphery and the
// pipeline fill of the next CTA with no MMAs beside them: 19 % of Nsight Compute's stall
// samples on OLMoE's gate/up GEMM (reports/bench/2026-12-07-analog-wgmma-side.md). Without
// side products two CTAs per multiprocessor hide each other's.
#define WG_PERSIST WG_SIDE
// WG_PIPE 2 takes the TMA descriptors of its operands (WgTmaStages) after the parameters.
#if WG_TMA
#define WG_TMA_PARAMS , const __grid_constant__ TmaMap a_map, const __grid_constant__ TmaMap w_map
#else
#define WG_TMA_PARAMS
#endif
extern "C" __global__ void __launch_bounds__(WG_THREADS, WG_ANALOG_CTAS) moe_analog_wgmma(GemmParams p WG_TMA_PARAMS) {
    extern __shared__ __align__(16) unsigned char wg_smem[];
#if WG_TMA
    // The stages' full barriers, made visible to the TMA unit before thread 0's first copy and
    // to the other threads by the CTA barrier after them: with side products every thread
    // waits on slot 0's (WgTmaStages::wait_first) before any barrier of WgTmaStages::next, and
    // the table staging's barriers (stage_normal_table, stage_ir_table) are not there in every
    // variant.
    __shared__ __align__(8) u64 wg_full[WG_STAGES];
    const u32 wg_bars = smem_addr(wg_full);
    if (threadIdx.x == 0) {
        for (u32 s = 0; s < WG_STAGES; ++s) mbar_init(wg_bars + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
#endif
#if MOE_NORMALS
    stage_normal_table();
#endif
#if MOE_IR_DROP && MOE_IR_TABLE
    stage_ir_table(p.k_block);
#endif
    u32 b = blockIdx.x;  // the tile (CTA of the one-tile schedule) whose wgmma run
    WgCta cta;
    if (!wg_cta(p, wg_smem, b, cta)) return;
    const u32 base = cta.base, t = cta.t, lane = cta.lane, wg = cta.wg, warp_in_wg = cta.warp_in_wg;
    // This thread's first row in a tile starting at row m0 (accumulator halves 0 and 1: + 0, + 8).
    auto row_local0_of = [&](u32 m0) { return m0 + wg * 64 + warp_in_wg * 16 + (lane >> 2); };
    // The rows of the block in prev; all zero for a row past the expert's (see wg_block_part).
    BlockRow br[2] = {};

    float d[WG_BN / 2];
    float* prev = (float*)(wg_smem + (base - smem_addr(wg_smem)) + WG_STAGES * WG_STAGE_BYTES) + t;
#if WG_SIDE
    // The running total in shared memory after prev (thread-minor as prev): the side
    // products' three accumulator sets leave no registers for it (ptxas spilled the variant
    // with normals per column pair).
    float* total = prev + WG_PLANES * WG_PLANE;
#define WG_TOTAL(i) total[(i) * WG_THREADS]
#else
    float total[WG_BN / 2];
#define WG_TOTAL(i) total[i]
#endif
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) {
        d[i] = 0.0f;
        WG_TOTAL(i) = 0.0f;
    }
    wg_fence_acc(d);
#if WG_SIDE
    WgSideAcc side;
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) {
#if MOE_PCM_READ
        side.s2[i] = 0.0f;
#endif
#if MOE_IR_DROP
        side.abs[i] = 0.0f;
        side.ir[i] = 0.0f;
#endif
    }
    wg_fence_side(side);
#endif

    u32 bm_rows = 0;  // bit h: row h had a saturated output in some crossbar block
    const u32* tid_of_col = p.col_tensor_id;
    const float* scale_of_col = p.col_scale;
    WgCols cols;  // the column constants of the next fragment pair the periphery takes
#if WG_PERSIST
    u32 prev_n0 = 0;  // the first column of the tile whose block is in prev
    // prev holds a block whose periphery has yet to run: past this CTA's first block. (Kept as
    // flags and tile numbers of their own, they took registers the periphery needs.)
#define WG_HAVE_PREV(kb) ((kb) > 0 || b != blockIdx.x)
#else
#define WG_HAVE_PREV(kb) ((kb) > 0)
#define prev_n0 cta.n0
#endif
    // prev: the contributions of the block before go to the total (this thread's own values: no
    // barrier), in block order as moe_gemm adds them; then the sums of block kb replace them.
    // With side products prev takes block_values: the IR drop is applied here, once per
    // output, so prev holds at most two planes.
    auto finish_block = [&](u32 kb) {
        (void)kb;
#pragma unroll
        for (int i = 0; i < WG_BN / 2; ++i) {
            if (WG_HAVE_PREV(kb)) WG_TOTAL(i) += prev[i * WG_THREADS];
#if WG_SIDE
#if MOE_IR_DROP
            prev[i * WG_THREADS] = block_value(p, d[i], side.abs[i], side.ir[i]);
            side.abs[i] = 0.0f;
            side.ir[i] = 0.0f;
#else
            prev[i * WG_THREADS] = block_value(p, d[i], 0.0f, 0.0f);
#endif
#if MOE_PCM_READ
            prev[WG_PLANE + i * WG_THREADS] = side.s2[i];
            side.s2[i] = 0.0f;
#endif
#else
            prev[i * WG_THREADS] = d[i];
#endif
            d[i] = 0.0f;
        }
    };
    // Tile c's total is complete: its rows' bound-management flags and its outputs.
    auto tile_done = [&](const WgCta& c) {
        const u32 row_local0 = row_local0_of(c.m0);
#if MOE_BM
#pragma unroll
        for (u32 half = 0; half < 2; ++half)
            if (bm_rows & (1u << half)) p.bm_flag[c.row_begin + row_local0 + 8 * half] = 1u;
        bm_rows = 0;
#else
        (void)row_local0;
#endif
#if WG_SIDE
#pragma unroll
        for (int i = 0; i < WG_BN / 2; ++i) d[i] = WG_TOTAL(i);
        wg_epilogue(p, d, c.row_begin, c.rows_e, c.m0 + wg * 64, c.n0, warp_in_wg, lane);
#pragma unroll
        for (int i = 0; i < WG_BN / 2; ++i) {
            d[i] = 0.0f;
            WG_TOTAL(i) = 0.0f;
        }
#else
        wg_epilogue(p, total, c.row_begin, c.rows_e, c.m0 + wg * 64, c.n0, warp_in_wg, lane);
#endif
    };
#if WG_TMA
    WgTmaStages stages(p, cta, &a_map, &w_map, wg_bars);
#endif
    for (;;) {
        const u32 e = cta.e, row_begin = cta.row_begin, rows_e = cta.rows_e, n0 = cta.n0;
        const u32 row_local0 = row_local0_of(cta.m0);
        const bool row_ok[2] = {row_local0 < rows_e, row_local0 + 8 < rows_e};
#if WG_TMA
        stages.begin(p, cta);
#else
        WgStages stages(p, cta);
        stages.start(p);
#endif
#if WG_SIDE
        // |W̃| of step 0's weight tile; each step makes the next one's (wg_abs_tile).
        stages.wait_first();
        wg_abs_tile(stages.next_slot() + WG_A_BYTES, t);
#endif
        u32 step = 0;
        // Block kb's MMAs, and the periphery of the block before between each step's wgmma
        // issue and wait. The wgmma must not sit in a branch: ptxas serialised them all
        // (C7518, "WG.DP in divergent path") while the MMAs and the periphery were one loop
        // with a pass for each.
        for (u32 kb = 0; kb < p.n_kb; ++kb) {
#pragma unroll 1
            for (u32 j = 0; j < MOE_KB_STEPS; ++j, ++step) {
                const u32 s_a = stages.next(p, step);
                const u32 s_a_wg = s_a + wg * (64 * 128), s_b = s_a + WG_A_BYTES;
#if WG_SIDE
                // Two wgmma groups, so that the register operands of the side products stay
                // alive only until their group retires: the products and k16 step 0's side
                // products (the periphery runs beside them, with one operand set in registers),
                // then the side products of steps 1–3 (the next step's |W̃| tile beside them).
                {
                    const SideA o0 = wg_side_a(p, s_a_wg, warp_in_wg, lane, j, 0);
                    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
                    wg_mma_k16s(d, s_a_wg, s_b);
                    wg_side_mma(side, o0, s_b, 0);
                    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                }
                if (WG_HAVE_PREV(kb))
                    wg_block_part(p, j, prev, br, cols, tid_of_col, scale_of_col, prev_n0, lane, bm_rows);
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                {
                    SideA o[3];
#pragma unroll
                    for (u32 kk = 1; kk < 4; ++kk) o[kk - 1] = wg_side_a(p, s_a_wg, warp_in_wg, lane, j, kk);
                    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
                    for (u32 kk = 1; kk < 4; ++kk) wg_side_mma(side, o[kk - 1], s_b, kk);
                    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                }
                if (step + 1 < stages.n_steps) {
                    stages.wait_next();
                    wg_abs_tile(stages.next_slot() + WG_A_BYTES, t);
                }
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#else
                wg_mma_stage(d, s_a_wg, s_b);
                if (WG_HAVE_PREV(kb))
                    wg_block_part(p, j, prev, br, cols, tid_of_col, scale_of_col, prev_n0, lane, bm_rows);
                // One group in flight across the barrier with WG_PIPE 1, none with 0 and 2.
                asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(WG_PIPE == 1 ? 1 : 0) : "memory");
#endif
            }
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            wg_fence_acc(d);
#if WG_SIDE
            wg_fence_side(side);
#endif
            finish_block(kb);
#if WG_PERSIST
            // The tile before this one has had its last block's periphery (beside this tile's
            // first block) and its contributions added: its total is complete.
            if (kb == 0 && b != blockIdx.x) {
                WgCta done;
                wg_cta(p, wg_smem, b - gridDim.x, done);
                tile_done(done);
            }
#endif
            wg_fence_acc(d);
#if WG_SIDE
            wg_fence_side(side);
#endif
#pragma unroll
            for (u32 half = 0; half < 2; ++half) {
#if WG_PERSIST
                // A row past this expert's may have been live in the tile before.
                if (!row_ok[half]) br[half] = BlockRow{};
#endif
                if (row_ok[half]) br[half] = block_row(p, row_begin + row_local0 + 8 * half, row_local0 + 8 * half, kb);
            }
            const u64 tab_row = ((u64)e * p.n_kb + kb) * p.n;
            tid_of_col = p.col_tensor_id + tab_row;
            scale_of_col = p.col_scale + tab_row;
#if WG_PERSIST
            prev_n0 = n0;
#endif
            cols = wg_cols(p, tid_of_col, scale_of_col, n0, lane, 0);
        }
#if WG_PERSIST
        WgCta next;
        if (!wg_cta(p, wg_smem, b + gridDim.x, next)) break;
        cta = next;
        b += gridDim.x;
        // Every warp's wgmma have read this tile's stages before the next tile's loads refill
        // them.
        __syncthreads();
#else
        break;
#endif
    }
#undef WG_HAVE_PREV
    // The last block's periphery (of the CTA's last tile, cta), with no MMAs left to hide it.
#pragma unroll 1
    for (u32 j = 0; j < MOE_KB_STEPS; ++j)
        wg_block_part(p, j, prev, br, cols, tid_of_col, scale_of_col, prev_n0, lane, bm_rows);
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) WG_TOTAL(i) += prev[i * WG_THREADS];
    tile_done(cta);
#undef prev_n0
#undef WG_TOTAL
}
#elif WG_PIPE < 2
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_gemm_wgmma(GemmParams p) {
    extern __shared__ __align__(16) unsigned char wg_smem[];
    WgCta cta;
    if (!wg_cta(p, wg_smem, blockIdx.x, cta)) return;
    const auto [base, e, row_begin, rows_e, m0, n0, t, lane, wg, warp_in_wg] = cta;
    WgStages stages(p, cta);

    float d[WG_BN / 2];
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) d[i] = 0.0f;
    wg_fence_acc(d);

    stages.start(p);
    for (u32 step = 0; step < stages.n_steps; ++step) {
        const u32 s_a = stages.next(p, step);
        wg_mma_stage(d, s_a + wg * (64 * 128), s_a + WG_A_BYTES);
        asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(WG_PIPE) : "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    wg_fence_acc(d);
    wg_epilogue(p, d, row_begin, rows_e, m0 + wg * 64, n0, warp_in_wg, lane);
}
#else
// WG_PIPE 2 and 3: warp-specialised and persistent. 384 threads: warpgroup 0 loads, warpgroups
// 1 and 2 issue the wgmma of rows 0–63 and 64–127 of the tile. The weight tile of each stage
// comes by TMA (the host's tensor map `w_map` of w as [E·N, K] bf16, 128B swizzle: the same
// layout as wg_swizzle); the gathered A rows by cp.async from the producer's 128 threads. Stage
// s has two mbarriers: full[s] (the weight tile's bytes, and one arrival per producer thread
// that the hardware makes once the thread's cp.async have landed: cp.async.mbarrier.arrive
// .noinc) and empty[s] (one arrival per consumer warp of every CTA that writes into the slot).
// cp.async writes through the generic proxy and wgmma reads through the async proxy, so each
// consumer fences the proxies after its wait on full[s] and before its wgmma. (A first version
// had each producer thread wait for its own group i − 2 and fence before arriving; that tied
// stage i's arrival to the producer's progress two stages on, and the consumers waited on it:
// no faster than WG_PIPE 1, Nsight Compute's stall samples split between the two waits.)
// WG_PIPE 3 pairs CTAs in clusters of 2 that take row tiles 2j and 2j + 1 of one expert and the
// same column tile: each CTA loads half of the weight tile and multicasts it to both, halving
// the weight traffic from L2 (a 128 × 256 tile moves 48 KiB of L2 per 4.2 MFLOP stage without,
// 32 KiB with). Work units are then pairs of row tiles (cluster_tile_offsets), a CTA past its
// expert's last row tile loads no A, skips its wgmma and still takes part in the barriers.
// Each CTA walks the units u, u + units_in_flight, ... in tile_of_block's raster order, so the
// producer fills the stages of its next unit while the consumers run the epilogue of the last.
// Registers: producer 64, consumers 216 per thread (setmaxnreg; 128 × 64 + 256 × 216 ≤ the
// 384 × 168 the launch bounds allocate: an increase waits for registers the CTA released).
#define WG_WS_THREADS 384
#define WG_CLUSTER (WG_PIPE == 3 ? 2 : 1)
#define WG_B_BOX (WG_BN / WG_CLUSTER)  // weight rows each CTA loads per stage
#if WG_STAGES < 3
#error "WG_PIPE 2 and 3 need WG_STAGES >= 3"
#endif

// Arrival on the barrier at the same offset in cluster CTA `rank`. Default (CTA-scope) release
// semantics: it only tells the producers that this warp's wgmma reads of the slot are done
// (wgmma.wait_group), no data of ours is published, and a cluster-scope release would cost a
// memory barrier per arrival (Nsight Compute: 5.7 stall cycles per instruction on it).
__device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 rank) {
    asm volatile(
        "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
        "r"(rank)
        : "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

// Weight rows [row, row + WG_B_BOX) × K [k0, k0 + 64) into dst (swizzled), signalling `bar` of
// every CTA of the cluster (multicast) or of this one.
__device__ __forceinline__ void tma_load_w(const TmaMap* map, u32 dst, u32 bar, u32 k0, u32 row) {
#if WG_CLUSTER == 2
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"((u64)map), "r"(k0), "r"(row), "r"(bar), "h"((unsigned short)3)
        : "memory");
#else
    tma_load_2d(map, dst, bar, k0, row);
#endif
}

#if WG_CLUSTER == 2
#define WG_CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#else
#define WG_CLUSTER_DIMS
#endif
extern "C" __global__ void __launch_bounds__(WG_WS_THREADS, 1) WG_CLUSTER_DIMS
    moe_gemm_wgmma(GemmParams p, const __grid_constant__ TmaMap w_map) {
    extern __shared__ __align__(16) unsigned char wg_smem[];
    const u32 base = (smem_addr(wg_smem) + 1023u) & ~1023u;  // the host adds 1024 bytes of slack
    const u32 full = base + WG_STAGES * WG_STAGE_BYTES, empty = full + 8 * WG_STAGES;
    const u32 t = threadIdx.x, lane = t & 31, wg = t >> 7;
#if WG_CLUSTER == 2
    const u32 rank = cluster_rank();
#else
    const u32 rank = 0;
#endif
    // Work units per expert: row tiles (WG_PIPE 2) or pairs of them (3), as offsets.
    const u32* unit_offsets = p.tile_offsets;
#if WG_CLUSTER == 2
    u32* pair_offsets = (u32*)(wg_smem + (empty + 8 * WG_STAGES - smem_addr(wg_smem)));
    if (t < 32) {  // one warp scans ⌈tiles_e / 2⌉ over the experts
        u32 carry = 0;
        for (u32 e0 = 0; e0 < p.n_experts; e0 += 32) {
            const u32 e = e0 + t;
            const u32 v = warp_inclusive_sum(
                e < p.n_experts ? (p.tile_offsets[e + 1] - p.tile_offsets[e] + 1) / 2 : 0, t);
            if (e < p.n_experts) pair_offsets[e + 1] = carry + v;
            carry += __shfl_sync(~0u, v, 31);
        }
        if (t == 0) pair_offsets[0] = 0;
    }
    unit_offsets = pair_offsets;
#endif
    if (t == 0) {
        for (u32 s = 0; s < WG_STAGES; ++s) {
            mbar_init(full + 8 * s, 128);
            mbar_init(empty + 8 * s, 8 * WG_CLUSTER);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
#if WG_CLUSTER == 2
    cluster_sync();  // the other CTA's barriers exist before any multicast
#endif
    const u32 n_tiles_n = p.n / WG_BN, width = MOE_RASTER_COLS / WG_BN, slab = slab_tiles(n_tiles_n, WG_BN);
    const u32 n_units = unit_offsets[p.n_experts] * n_tiles_n, n_steps = p.k / WG_BK;
    const u32 first = blockIdx.x / WG_CLUSTER, stride = gridDim.x / WG_CLUSTER;
    u32 it = 0;  // stage iterations of this CTA so far (slot it % WG_STAGES, phase it / WG_STAGES)
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 64;\n" ::: "memory");
        for (u32 u = first; u < n_units; u += stride) {
            u32 e, m_unit, n_tile;
            slab_tile(unit_offsets, p.n_experts, u, n_tiles_n, width, slab, e, m_unit, n_tile);
            const u32 row_begin = p.offsets[e], rows_e = p.offsets[e + 1] - row_begin;
            const u32 m0 = (m_unit * WG_CLUSTER + rank) * WG_BM, n0 = n_tile * WG_BN;
            const bool active = m0 < rows_e;
            const WgLoader<128> loader(p, t, e, row_begin, rows_e, m0, n0);
            for (u32 step = 0; step < n_steps; ++step, ++it) {
                const u32 slot = it % WG_STAGES, s_a = base + slot * WG_STAGE_BYTES;
                mbar_wait(empty + 8 * slot, ((it / WG_STAGES) & 1) ^ 1);
                if (t == 0) {
                    mbar_expect_tx(full + 8 * slot, WG_BN * 128);
                    tma_load_w(&w_map, s_a + WG_A_BYTES + rank * (WG_B_BOX * 128), full + 8 * slot, step * WG_BK,
                               e * p.n + n0 + rank * WG_B_BOX);
                }
                if (active) loader.load_a(p, t, WgLoader<128>::chunk0(t, s_a), step * WG_BK);
                asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full + 8 * slot)
                             : "memory");
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
        const u32 cwg = wg - 1, warp_in_wg = (t >> 5) & 3;
        // Slot `s` goes back to the producers of every CTA that multicasts into it.
        auto release = [&](u32 s) {
            if (lane != 0) return;
#if WG_CLUSTER == 2
            mbar_arrive_cluster(empty + 8 * s, 0);
            mbar_arrive_cluster(empty + 8 * s, 1);
#else
            mbar_arrive(empty + 8 * s);
#endif
        };
        float d[WG_BN / 2];
        for (u32 u = first; u < n_units; u += stride) {
            u32 e, m_unit, n_tile;
            slab_tile(unit_offsets, p.n_experts, u, n_tiles_n, width, slab, e, m_unit, n_tile);
            const u32 row_begin = p.offsets[e], rows_e = p.offsets[e + 1] - row_begin;
            const u32 m0 = (m_unit * WG_CLUSTER + rank) * WG_BM;
            const bool active = m0 < rows_e;
#pragma unroll
            for (int i = 0; i < WG_BN / 2; ++i) d[i] = 0.0f;
            wg_fence_acc(d);
            for (u32 step = 0; step < n_steps; ++step, ++it) {
                const u32 slot = it % WG_STAGES;
                mbar_wait(full + 8 * slot, (it / WG_STAGES) & 1);
                if (active) {
                    const u32 s_a = base + slot * WG_STAGE_BYTES;
                    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                    wg_mma_stage(d, s_a + cwg * (64 * 128), s_a + WG_A_BYTES);
                    // One group stays in flight: the previous stage's MMAs have retired, so
                    // its slot goes back to the producers.
                    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                    if (step > 0) release((it - 1) % WG_STAGES);
                } else {
                    release(slot);  // nothing to multiply: the slot is free once filled
                }
            }
            // Unconditional, so that every path into the next unit has no wgmma in flight.
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            wg_fence_acc(d);
            if (active) {
                release((it - 1) % WG_STAGES);
                wg_epilogue(p, d, row_begin, rows_e, m0 + cwg * 64, n_tile * WG_BN, warp_in_wg, lane);
            }
        }
    }
#if WG_CLUSTER == 2
    // No CTA leaves while the other may still multicast into it or arrive on its barriers.
    cluster_sync();
#endif
}
#endif
#endif

// The analog grouped GEMM for sm_90a, moe_analog_wgmma, on the shared parts of gemm_wgmma.cuh.
#if MOE_WGMMA && MOE_ANALOG
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
#endif

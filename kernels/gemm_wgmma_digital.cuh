// The digital grouped GEMM for sm_90a, moe_gemm_wgmma (moe_gemm's contract with MOE_ANALOG 0),
// on the shared parts of gemm_wgmma.cuh:
//   WG_PIPE 0 and 1: one CTA per tile, whose threads all load (cp.async) and multiply;
//   WG_PIPE 2: warp-specialised persistent kernel, one loading warpgroup and two MMA
//              warpgroups synchronised by mbarriers, weights by TMA (see there);
//   WG_PIPE 3: as 2, in clusters of two CTAs that multicast the weight tile.
#if MOE_WGMMA && !MOE_ANALOG
#if WG_PIPE < 2
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

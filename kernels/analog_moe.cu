// Grouped (per-expert) analog and digital MoE expert GEMMs with the crossbar periphery fused.
// Prepended by the host: philox.cuh and the configuration macros
//   MOE_ANALOG   1: analog epilogue per crossbar block along K; 0: digital baseline
//   MOE_SPLIT_W  1: weights as fp16 hi + fp16 lo (two MMAs, ~22-bit weight significand)
//   MOE_PCM_READ 1: PCM_READ short-term weight noise (second accumulator Σ|W|x̃²)
//   MOE_IR_DROP  1: AIHWKIT static IR drop (accumulators Σ|W||x̃| and Σ W x̃ f(j))
//   MOE_ADDITIVE 1: ADDITIVE short-term weight noise (σ² = std²·‖x̃‖² per row and crossbar block)
//   MOE_OUT_NOISE, MOE_ADC: output noise, ADC
//   MOE_BM       1: iterative bound management: rows with a saturated ADC output are flagged
//                   (MOE_MODE 0) and redone by attempt passes (MOE_MODE 4; needs MOE_ADC)
//   MOE_NOISE_QUADS 1: every 4 columns lie in one crossbar at a multiple of 4 (one Philox block)
//   MOE_WGMMA    1 (sm_90a only): also build moe_gemm_wgmma (digital) or moe_analog_wgmma (see there)
//   MOE_MODE     0: store [P, N]; 1: SwiGLU of interleaved gate/up → [P, N/2]; 2: weighted scatter-add → [T, N];
//                3 (digital): SwiGLU → [P, N/2] bf16 (the next GEMM's operand, round to nearest even as to_bf16);
//                4 (MOE_BM): one bound-management attempt: per crossbar block, the outputs of the pending
//                  crossbars of the live rows → bm_scratch [slots, KB, N], saturation → bm_sat
//                5 (digital): store [P, N] rounded to bf16 (the expert outputs that combine_bf16_rows
//                  sums per token: no read-modify-write of the f32 output per expert)
//   MOE_DIAG     1 (moe_gemm): the GDC readout through every crossbar block of a grouped matrix
//                (launch expert g = block g % diag_kb of expert g / diag_kb of weights [E, N, diag_k]),
//                input rows the identity in order: each row tile multiplies only its own K range
// With PCM_READ, ADDITIVE and/or output noise, each output gets one normal (purpose OutputNoise)
// scaled by sqrt(out_noise² + σ_w²), as tile::Crossbar::analog. The CPU model of every kernel
// here, the oracle of the GPU tests, is backend::cuda::reference.
//
// Operands: analog A = integer DAC codes in fp16 (exact for ≤ 11-bit DACs), W̃ in fp16 (hi, lo);
// digital A and W in bf16. Accumulation in f32 (mma.sync m16n8k16). The periphery per crossbar
// block mirrors tile::Crossbar::analog + forward_chunk step 9 (docs/model.md §3), block partial sums
// are added in input-block order as tile::AnalogMatrix::mvm does.

typedef unsigned short u16;

#ifndef MOE_ANALOG
#define MOE_ANALOG 1
#endif
#ifndef MOE_SPLIT_W
#define MOE_SPLIT_W 1
#endif
#ifndef MOE_PCM_READ
#define MOE_PCM_READ 0
#endif
#ifndef MOE_IR_DROP
#define MOE_IR_DROP 0
#endif
#ifndef MOE_ADDITIVE
#define MOE_ADDITIVE 0
#endif
#ifndef MOE_BM
#define MOE_BM 0
#endif
#ifndef MOE_OUT_NOISE
#define MOE_OUT_NOISE 1
#endif
#ifndef MOE_ADC
#define MOE_ADC 1
#endif
#ifndef MOE_MODE
#define MOE_MODE 0
#endif
#ifndef MOE_NOISE_QUADS
#define MOE_NOISE_QUADS 0
#endif
#ifndef MOE_WGMMA
#define MOE_WGMMA 0
#endif
#ifndef MOE_DIAG
#define MOE_DIAG 0
#endif
// Output columns per raster group of one expert's CTAs (tile_of_block): 2048 columns keep the
// group's weight tiles (≤ 2048 × K × 4 bytes) and the expert's gathered rows within the L2.
#ifndef MOE_RASTER_COLS
#define MOE_RASTER_COLS 2048
#endif

// ---------------------------------------------------------------------------------------------
// Routing: stable counting sort of (token, expert, weight) pairs by expert.
// histogram (moe_count) → exclusive scan (moe_scan) → stable scatter (moe_scatter), over slices
// of the host's `slice` consecutive pairs, one block per slice: O(P + E·slices) work. Pairs keep
// their (token, slot) order inside an expert, the order the CPU path gathers tokens in. Expert
// ids come from the device router (route_top_k) or the host's checked routing; the kernels
// only guard their shared-memory tables against an id ≥ n_experts.
// (The first version ran a block per (expert, slice) that read every pair of its slice: E·P
// reads, 0.16 ms of the fine-grained layer's 1.4 with 128 experts.)

// Inclusive prefix sum of `v` over the lanes of a full warp (lane `lane` gets Σ_{l ≤ lane}).
__device__ __forceinline__ u32 warp_inclusive_sum(u32 v, u32 lane) {
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        const u32 x = __shfl_up_sync(~0u, v, o);
        if (lane >= o) v += x;
    }
    return v;
}

// counts[e][s] = pairs of expert e in slice s (shared-memory histogram of n_experts words).
extern "C" __global__ void moe_count(const u32* expert_of_pair, u32 n_pairs, u32 n_experts, u32 slice, u32* counts) {
    extern __shared__ u32 hist[];
    const u32 s = blockIdx.x, begin = s * slice, end = min(n_pairs, begin + slice);
    for (u32 e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    for (u32 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const u32 e = expert_of_pair[i];
        if (e < n_experts) atomicAdd(&hist[e], 1u);
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < n_experts; e += blockDim.x) counts[e * gridDim.x + s] = hist[e];
}

// From counts[e][s]: slice_offsets[e][s] = Σ_{e'<e} pairs of e' + Σ_{s'<s} counts[e][s'] (where
// slice s of expert e starts), which is the exclusive scan of counts in its [e][s] order;
// offsets[e] = slice_offsets[e][0] (offsets[E] = all pairs), tile_offsets[e] = Σ_{e'<e}
// ⌈pairs of e'/tile_rows⌉. One block of MOE_SCAN_THREADS, in chunks of MOE_SCAN_THREADS ×
// MOE_SCAN_ITEMS counts: coalesced loads into shared memory, each thread scans
// MOE_SCAN_ITEMS consecutive ones, warp and block scans of their sums, coalesced stores.
// (A warp per expert, 32 slices per dependent load, took 19 µs of the fine-grained layer with
// 128 experts × 192 slices; per-thread runs of 8 words loaded and stored straight from global
// memory took 24: one multiprocessor's 32 partial-sector writes per store instruction.)
#define MOE_SCAN_THREADS 1024
#define MOE_SCAN_ITEMS 8
extern "C" __global__ void __launch_bounds__(MOE_SCAN_THREADS) moe_scan(const u32* counts, u32 n_experts, u32 n_slices,
                                                                        u32 tile_rows, u32* offsets, u32* tile_offsets,
                                                                        u32* slice_offsets) {
    __shared__ u32 buf[MOE_SCAN_THREADS * MOE_SCAN_ITEMS];
    __shared__ u32 warp_incl[32];
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5, n_warps = MOE_SCAN_THREADS / 32;
    const u32 n = n_experts * n_slices, chunk = MOE_SCAN_THREADS * MOE_SCAN_ITEMS;
    u32 carry = 0;  // counts before this chunk
    for (u32 base = 0; base < n; base += chunk) {
#pragma unroll
        for (u32 j = 0; j < MOE_SCAN_ITEMS; ++j) {
            const u32 i = base + j * MOE_SCAN_THREADS + t;
            buf[j * MOE_SCAN_THREADS + t] = i < n ? counts[i] : 0u;
        }
        __syncthreads();
        u32 v[MOE_SCAN_ITEMS], sum = 0;
#pragma unroll
        for (u32 j = 0; j < MOE_SCAN_ITEMS; ++j) {
            v[j] = buf[t * MOE_SCAN_ITEMS + j];
            sum += v[j];
        }
        const u32 incl = warp_inclusive_sum(sum, lane);
        if (lane == 31) warp_incl[warp] = incl;
        __syncthreads();
        if (warp == 0) warp_incl[lane] = warp_inclusive_sum(warp_incl[lane], lane);
        __syncthreads();
        u32 run = carry + (warp > 0 ? warp_incl[warp - 1] : 0u) + incl - sum;
#pragma unroll
        for (u32 j = 0; j < MOE_SCAN_ITEMS; ++j) {
            buf[t * MOE_SCAN_ITEMS + j] = run;
            run += v[j];
        }
        carry += warp_incl[n_warps - 1];
        __syncthreads();
#pragma unroll
        for (u32 j = 0; j < MOE_SCAN_ITEMS; ++j) {
            const u32 i = base + j * MOE_SCAN_THREADS + t;
            if (i < n) slice_offsets[i] = buf[j * MOE_SCAN_THREADS + t];
        }
        __syncthreads();  // buf and warp_incl are rewritten by the next chunk; slice_offsets is read below
    }
    // The experts' starts and row tiles, 32 experts at a time by warp 0.
    if (warp == 0) {
        u32 tiles = 0;
        for (u32 e0 = 0; e0 < n_experts; e0 += 32) {
            const u32 e = e0 + lane;
            const u32 start = e < n_experts ? slice_offsets[e * n_slices] : 0u;
            const u32 end = e + 1 < n_experts ? slice_offsets[(e + 1) * n_slices] : carry;
            const u32 n_tiles = e < n_experts ? (end - start + tile_rows - 1) / tile_rows : 0u;
            const u32 b = warp_inclusive_sum(n_tiles, lane);
            if (e < n_experts) {
                offsets[e] = start;
                tile_offsets[e] = tiles + b - n_tiles;
            }
            tiles += __shfl_sync(~0u, b, 31);
        }
        if (lane == 0) {
            offsets[n_experts] = carry;
            tile_offsets[n_experts] = tiles;
        }
    }
}

// Stable: block s places the pairs of slice s. Each of the block's W warps ranks a run of
// `per` consecutive pairs (a multiple of 32) 32 at a time in pair order (lanes of one expert
// rank by __match_any_sync), counting its pairs per expert in its row of a [W][E] shared
// table; a scan down each expert's column from slice_offsets[e][s] turns the rows into where
// each warp's pairs of e start, and every pair lands at its warp's start plus its rank. The
// stores go in sorted order (the slice's pairs of one expert are consecutive there), so that a
// warp's stores fall into a few runs rather than 32 scattered words.
// Shared memory: W·E + 2·E + 1 + 3·slice words (the host's `scatter_words`).
// (The first version ranked the whole slice in warp 0 and stored in pair order: 22 µs of the
// fine-grained layer.)
extern "C" __global__ void moe_scatter(const u32* expert_of_pair, const float* weight_of_pair, u32 n_pairs,
                                       u32 n_experts, u32 slice, u32 top_k, const u32* slice_offsets,
                                       u32* sorted_token, float* sorted_weight, u32* sorted_pair) {
    extern __shared__ u32 route_smem[];
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5, n_warps = blockDim.x >> 5;
    u32* table = route_smem;                // [W][E]
    u32* start = table + n_warps * n_experts;  // [E] where the slice's pairs of e go
    u32* seg = start + n_experts;           // [E + 1] where they sit among the slice's sorted pairs
    u32* ids = seg + n_experts + 1;         // [slice] expert of each pair
    u32* pos = ids + slice;                 // [slice] rank among its warp's pairs of its expert, then its position
    u32* order = pos + slice;               // [slice] the slice's pairs in sorted order
    const u32 s = blockIdx.x, begin = s * slice, n = min(n_pairs, begin + slice) - begin;
    const u32 per = ((slice + n_warps - 1) / n_warps + 31u) & ~31u;
    for (u32 i = t; i < n_warps * n_experts; i += blockDim.x) table[i] = 0;
    for (u32 e = t; e < n_experts; e += blockDim.x) start[e] = slice_offsets[e * gridDim.x + s];
    for (u32 j = t; j < n; j += blockDim.x) ids[j] = expert_of_pair[begin + j];
    __syncthreads();
    u32* mine = table + warp * n_experts;
    const u32 stop = min(n, (warp + 1) * per);
    for (u32 j0 = warp * per; j0 < stop; j0 += 32) {
        const u32 j = j0 + lane, e = j < stop ? ids[j] : ~0u;
        const bool ok = e < n_experts;
        const u32 group = __match_any_sync(~0u, e), rank = __popc(group & ((1u << lane) - 1u));
        const u32 first = ok ? mine[e] : 0u;
        __syncwarp();
        if (ok && rank == 0) mine[e] = first + __popc(group);
        __syncwarp();
        if (j < stop) pos[j] = first + rank;
    }
    __syncthreads();
    // Down each expert's column: the warps' starts; seg[e] = the slice's pairs of e, for now.
    for (u32 e = t; e < n_experts; e += blockDim.x) {
        u32 acc = start[e];
        for (u32 w = 0; w < n_warps; ++w) {
            const u32 c = table[w * n_experts + e];
            table[w * n_experts + e] = acc;
            acc += c;
        }
        seg[e] = acc - start[e];
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan of seg over the experts
        u32 carry = 0;
        for (u32 e0 = 0; e0 < n_experts; e0 += 32) {
            const u32 e = e0 + lane, c = e < n_experts ? seg[e] : 0u;
            const u32 incl = warp_inclusive_sum(c, lane);
            if (e < n_experts) seg[e] = carry + incl - c;
            carry += __shfl_sync(~0u, incl, 31);
        }
        if (lane == 0) seg[n_experts] = carry;  // pairs with an id ≥ n_experts have no place
    }
    __syncthreads();
    for (u32 j = t; j < n; j += blockDim.x) {
        const u32 e = ids[j];
        if (e >= n_experts) continue;
        const u32 p = table[(j / per) * n_experts + e] + pos[j];
        pos[j] = p;
        order[seg[e] + p - start[e]] = j;
    }
    __syncthreads();
    for (u32 l = t; l < seg[n_experts]; l += blockDim.x) {
        const u32 j = order[l], p = pos[j], i = begin + j;
        sorted_token[p] = i / top_k;
        sorted_weight[p] = weight_of_pair[i];
        sorted_pair[p] = i;
    }
}

// Noise keys of a batch of sequences routed together: token t belongs to sequence t / window
// (every sequence `window` tokens long but the last), which the CPU runs as its own call
// first_call + t / window; inside it, the pair is row r of its expert (the expert's pairs of
// that sequence before it). Sorted pairs of an expert are in token order, so the sequence's
// first pair is found by binary search. key[pos] = (r, call), read by noise_key_of.
extern "C" __global__ void moe_noise_keys(const u32* sorted_token, const u32* offsets, u32 n_experts, u32 n_pairs,
                                          u32 window, u32 first_call, u32* key) {
    const u32 pos = blockIdx.x * blockDim.x + threadIdx.x;
    if (pos >= n_pairs) return;
    u32 lo = 0, hi = n_experts;  // expert e with offsets[e] <= pos < offsets[e + 1]
    while (hi - lo > 1) {
        const u32 mid = (lo + hi) / 2;
        if (offsets[mid] <= pos) lo = mid; else hi = mid;
    }
    const u32 seq = sorted_token[pos] / window, seq_start = seq * window;
    u32 a = offsets[lo], b = pos;  // first sorted position in [a, pos] with token ≥ seq_start
    while (a < b) {
        const u32 mid = (a + b) / 2;
        if (sorted_token[mid] < seq_start) a = mid + 1; else b = mid;
    }
    key[2 * pos] = pos - a;
    key[2 * pos + 1] = first_call + seq;
}

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

// ---------------------------------------------------------------------------------------------
// The grouped GEMM. CTA tile BM×BN over (rows of one expert) × (output columns), WARPS_M×WARPS_N
// warps of (BM/WARPS_M)×(BN/WARPS_N), BK = 32 per pipeline stage (cp.async, STAGES deep),
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
#define BM MOE_TILE_M
#define BN MOE_TILE_N
#define BK 32
#define LDS 40  // shared row stride in halves: 80 B keeps the 8 rows of an ldmatrix on distinct banks
#define NTHREADS (MOE_WARPS_M * MOE_WARPS_N * 32)
#define MI (BM / MOE_WARPS_M / 16)  // m16 fragments per warp
#define TN (BN / MOE_WARPS_N / 8)   // n8 fragments per warp
#if MOE_ANALOG && MOE_SPLIT_W
#define NB_MAT 2
#else
#define NB_MAT 1
#endif
#define STAGE_HALVES (BM * LDS + NB_MAT * BN * LDS)
#if (BM * 4) % NTHREADS != 0 || (BN * 4) % NTHREADS != 0 || TN % 2 != 0 || MI < 1 || MOE_STAGES < 2
#error "moe_gemm tile configuration"
#endif
// CTAs per SM the register allocation must allow: 2 (≤ 128 registers per thread on 256
// threads) where the f32 accumulator sets take at most 64 of them, so that one CTA's periphery
// epilogue overlaps the other's MMAs (the default tiles of backend::cuda::moe::GemmTile without
// PCM_READ or IR drop); else 1. Left to ptxas, the Lightning-set variant took 143 registers and
// ran 1 CTA per SM: 30.3 ms on the OLMoE layer against 20.9 at 2.
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
    const u16* w_hi;            // [E, N, K]
    const u16* w_lo;            // [E, N, K] (split weights)
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

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// IR-drop weighting of crossbar row j of n: 1 − (1 − j/n)², as tile::Crossbar::refresh_derived.
__device__ __forceinline__ float ir_row_factor(u32 j, float n) {
    float u = 1.0f - (float)j / n;
    return 1.0f - u * u;
}

#if MOE_ANALOG
// Two normals of `purpose` for columns (c, c + 1) of one output row; one Philox call when both
// sit in one crossbar at an even index (the common case), else two (same values either way).
__device__ __forceinline__ float2 periphery_normals(const GemmParams& p, u32 purpose, u32 tid0, u32 tid1, u64 idx0,
                                                    u64 idx1, u32 call) {
    if (tid0 == tid1 && idx1 == idx0 + 1 && (idx0 & 1) == 0)
        return stream_normal_pair(make_stream(p.seed, purpose, tid0), idx0, call, p.attempt);
    return make_float2(stream_normal(make_stream(p.seed, purpose, tid0), idx0, call, p.attempt),
                       stream_normal(make_stream(p.seed, purpose, tid1), idx1, call, p.attempt));
}
#endif

// Noise row and call of sorted pair `pos`, the `row_local`-th row of its expert: the keys of
// the per-MVM noise (tile::Crossbar::forward_chunk keys it by batch row and mvm_id).
__device__ __forceinline__ u32 noise_row_of(const GemmParams& p, u32 pos, u32 row_local) {
    return p.noise_key ? p.noise_key[2 * pos] : row_local;
}
__device__ __forceinline__ u32 noise_call_of(const GemmParams& p, u32 pos) {
    return p.noise_key ? p.noise_key[2 * pos + 1] : p.mvm_id;
}

#if MOE_ANALOG
// One output row of crossbar block kb as the periphery epilogue needs it: the noise-management
// scale α of its operand row and the keys of its per-MVM noise.
struct BlockRow {
    float alpha_nm;
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
    u32 nrow, ncall;
#endif
#if MOE_ADDITIVE
    float sumsq;  // ‖x̃‖² of the row's input segment
#endif
};

// Sorted pair `pos`, the `row_local`-th row of its expert, in crossbar block kb.
__device__ __forceinline__ BlockRow block_row(const GemmParams& p, u32 pos, u32 row_local, u32 kb) {
    BlockRow r;
    const u32 arow = p.a_row_of ? p.a_row_of[pos] : pos;
    r.alpha_nm = p.a_alpha[(u64)arow * p.n_kb + kb];
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
    r.nrow = noise_row_of(p, pos, row_local);
    r.ncall = noise_call_of(p, pos);
#endif
#if MOE_ADDITIVE
    r.sumsq = p.a_sumsq[(u64)arow * p.n_kb + kb];
#endif
    return r;
}

// One thread's block sums of outputs (row, col) and (row, col + 1) of a crossbar block, in DAC
// code units: the product and the side accumulators.
struct PairSums {
    float acc[2];
#if MOE_PCM_READ
    float s2[2];
#endif
#if MOE_IR_DROP
    float abs[2], ir[2];
#endif
};

#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
// Output normals (purpose OutputNoise) of this thread's columns (col0, col0 + 1) and
// (col0 + 8, col0 + 9) of one row: two n8 fragments of the mma.sync / wgmma accumulator layout,
// where lanes l and l ^ 1 hold 4 consecutive columns of each. With MOE_NOISE_QUADS every 4
// columns sit in one crossbar at a multiple of 4 (host-checked), so one Philox block holds the
// normals of a lane pair's 4 columns (words x, y of the even lane, z, w of the odd one): each
// lane of the pair draws the block of one fragment and passes the partner its words, half the
// Philox work for the same values as stream_normal_pair. Both lanes of a pair must call this.
__device__ __forceinline__ void output_normals(const GemmParams& p, const BlockRow& r, const u32* tid_of_col,
                                               u32 col0, u32 lane, float2& z0, float2& z1) {
#if MOE_NOISE_QUADS
    const u32 odd = lane & 1u, pair_mask = 3u << (lane & 30u);
    const u32 col = col0 + 8 * odd;
    const u64 idx = (u64)r.nrow * p.col_block_cols[col] + p.col_local[col];
    const uint4 q =
        stream_block(make_stream(p.seed, PURPOSE_OUTPUT_NOISE, tid_of_col[col]), idx / 4, r.ncall, p.attempt);
    const u32 got0 = __shfl_xor_sync(pair_mask, odd ? q.x : q.z, 1);
    const u32 got1 = __shfl_xor_sync(pair_mask, odd ? q.y : q.w, 1);
    const float2 mine = odd ? box_muller(q.z, q.w) : box_muller(q.x, q.y);
    const float2 theirs = box_muller(got0, got1);
    z0 = odd ? theirs : mine;
    z1 = odd ? mine : theirs;
#else
    auto pair = [&](u32 col) {
        const u64 idx0 = (u64)r.nrow * p.col_block_cols[col] + p.col_local[col];
        const u64 idx1 = (u64)r.nrow * p.col_block_cols[col + 1] + p.col_local[col + 1];
        return periphery_normals(p, PURPOSE_OUTPUT_NOISE, tid_of_col[col], tid_of_col[col + 1], idx0, idx1, r.ncall);
    };
    z0 = pair(col0);
    z1 = pair(col0 + 8);
#endif
}
#endif

// Steps 4–7 and 9 of docs/model.md §3 for outputs (row, col), (row, col + 1) of one crossbar block:
// DAC step, IR drop, short-term weight and output noise (normals z), ADC, and the scale
// α_nm·s_map·α_GDC, added to t[0], t[1] (the running total over the blocks along K). Mirrors
// tile::Crossbar::analog (one normal per output of the summed variance, σ = out_noise without
// PCM_READ or ADDITIVE) and forward_chunk step 9. With MOE_BM, sets `sat_bit` in `sat` when
// an output saturated the ADC in a row that bound management may redo (α_nm > 0); in
// MOE_MODE 4, `sat_bit << c` for output (row, col + c).
__device__ __forceinline__ void block_outputs(const GemmParams& p, const BlockRow& r, const float* scale_of_col,
                                              u32 col, const PairSums& s, float2 z, float* t, u32& sat,
                                              u32 sat_bit) {
    float y[2];
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
        float v = s.acc[c] * p.dac_step;
#if MOE_IR_DROP
        float aa = p.ir_k * (s.abs[c] * p.dac_step);
        float cc = aa * (aa * (0.05f * aa - 0.2f) + 0.5f);
        v -= p.ir_scale * cc * (s.ir[c] * p.dac_step);
#endif
        y[c] = v;
    }
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
#if MOE_PCM_READ
    const float out_var = __fmul_rn(p.out_noise, p.out_noise);
    const float std2 = __fmul_rn(p.w_noise_std, p.w_noise_std);
    const float step2 = __fmul_rn(p.dac_step, p.dac_step);
    float sd[2];
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
        const float s2 = __fmul_rn(s.s2[c], step2);
        sd[c] = __fsqrt_rn(__fadd_rn(out_var, __fmul_rn(std2, s2)));
    }
#elif MOE_ADDITIVE
    const float out_var = __fmul_rn(p.out_noise, p.out_noise);
    const float std2 = __fmul_rn(p.w_noise_std, p.w_noise_std);
    const float sdr = __fsqrt_rn(__fadd_rn(out_var, __fmul_rn(std2, r.sumsq)));
    const float sd[2] = {sdr, sdr};
#else
    const float sd[2] = {p.out_noise, p.out_noise};
#endif
    y[0] += sd[0] * z.x;
    y[1] += sd[1] * z.y;
#endif
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
        float v = y[c];
#if MOE_ADC
        v = fminf(fmaxf(rintf(v / p.adc_step) * p.adc_step, -p.adc_bound), p.adc_bound);
#endif
#if MOE_BM
        if (r.alpha_nm > 0.0f && fabsf(v) >= p.adc_bound) sat |= sat_bit << (MOE_MODE == 4 ? c : 0u);
#endif
        t[c] += v * (r.alpha_nm * scale_of_col[col + c]);
    }
}
#endif

// CTA b → (expert e, row tile m_tile inside the expert, column tile n_tile), false past the last
// tile. Each expert's CTAs run in groups of `width` column tiles, all of the expert's row tiles
// per group, column tile fastest: the CTAs resident at once share a few weight column tiles in
// L2. Column-fastest over all of N instead streams every weight tile from DRAM once per row tile
// where one expert's weights exceed the L2 (Mixtral's gate/up: 235 MB in bf16).
// BEGIN raster_tile (plain C++: tests/raster_host.rs compiles it on the host and checks that it
// is a bijection onto the (expert, row tile, column tile) triples)
__device__ __forceinline__ bool raster_tile(const u32* tile_offsets, u32 n_experts, u32 b, u32 n_tiles_n, u32 width,
                                            u32& e, u32& m_tile, u32& n_tile) {
    if (b >= tile_offsets[n_experts] * n_tiles_n) return false;
    u32 lo = 0, hi = n_experts;  // the last expert whose first CTA is at or before b
    while (hi - lo > 1) {
        u32 mid = (lo + hi) / 2;
        if (tile_offsets[mid] * n_tiles_n <= b) lo = mid; else hi = mid;
    }
    e = lo;
    const u32 tiles_e = tile_offsets[e + 1] - tile_offsets[e];
    const u32 local = b - tile_offsets[e] * n_tiles_n;
    const u32 group = local / (width * tiles_e), r = local - group * width * tiles_e;
    const u32 left = n_tiles_n - group * width, w = left < width ? left : width;
    m_tile = r / w;
    n_tile = group * width + r % w;
    return true;
}

// Column slabs of `slab` column tiles, outermost: every expert's tiles of slab 0 (in
// raster_tile's order within the slab), then of slab 1, ... The weighted scatter-add of the
// down GEMM adds each token's k expert outputs into one f32 output row; in expert order those
// k additions are far apart and the output (OLMoE: 128 MiB) round-trips through DRAM k times,
// while one slab's output columns can stay in L2 for all of them. slab ≥ n_tiles_n is
// raster_tile itself.
__device__ __forceinline__ bool slab_tile(const u32* tile_offsets, u32 n_experts, u32 b, u32 n_tiles_n, u32 width,
                                          u32 slab, u32& e, u32& m_tile, u32& n_tile) {
    const u32 rows = tile_offsets[n_experts];
    if (b >= rows * n_tiles_n) return false;
    const u32 s = b / (rows * slab), left = n_tiles_n - s * slab, w = left < slab ? left : slab;
    if (!raster_tile(tile_offsets, n_experts, b - s * rows * slab, w, width < w ? width : w, e, m_tile, n_tile))
        return false;
    n_tile += s * slab;
    return true;
}
// END raster_tile

// Output columns per slab of the scatter-add GEMMs (slab_tile; 0: no slabs).
#ifndef MOE_SLAB_COLS
#define MOE_SLAB_COLS 0
#endif
__device__ __forceinline__ u32 slab_tiles(u32 n_tiles_n, u32 tile_cols) {
#if MOE_MODE == 2 && MOE_SLAB_COLS > 0
    const u32 slab = MOE_SLAB_COLS / tile_cols;
    return slab > 0 ? slab : 1;
#else
    return n_tiles_n;
#endif
}

__device__ __forceinline__ bool tile_of_block(const GemmParams& p, u32 n_tiles_n, u32 width, u32& e, u32& m_tile,
                                              u32& n_tile) {
    return slab_tile(p.tile_offsets, p.n_experts, blockIdx.x, n_tiles_n, width, slab_tiles(n_tiles_n, p.n / n_tiles_n),
                     e, m_tile, n_tile);
}

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
#if MOE_MODE == 4 && !(MOE_ANALOG && MOE_BM && MOE_ADC)
#error "MOE_MODE 4 (bound-management attempt) needs MOE_ANALOG, MOE_BM and MOE_ADC"
#endif

extern "C" __global__ void __launch_bounds__(NTHREADS, MOE_MIN_CTAS) moe_gemm(GemmParams p) {
    extern __shared__ __align__(16) u16 smem[];
    u32 e, m_tile, n_tile;
    if (!tile_of_block(p, p.n / BN, MOE_RASTER_COLS / BN, e, m_tile, n_tile)) return;
    const u32 row_begin = p.offsets[e], rows_e = p.offsets[e + 1] - row_begin;
    const u32 m0 = m_tile * BM, n0 = n_tile * BN;
#if MOE_MODE == 4
    // A bound-management attempt skips the row tiles without a live row.
    {
        bool live = false;
        for (u32 r = threadIdx.x; r < BM; r += NTHREADS)
            live |= m0 + r < rows_e && p.bm_flag[row_begin + m0 + r] != 0u;
        if (!__syncthreads_or(live)) return;
    }
#endif
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const u32 wm = warp / MOE_WARPS_N, wn = warp % MOE_WARPS_N;
    const u32 K = p.k;

    // Accumulator fragment of this thread (mma.sync m16n8 C layout): row of fragment (mi, half)
    // inside the expert's rows, first of the two columns of n8 fragment tn.
    auto frag_row = [&](u32 mi, u32 half) { return m0 + wm * (MI * 16) + mi * 16 + (lane >> 2) + half * 8; };
    auto frag_col = [&](u32 tn) { return n0 + wn * (TN * 8) + tn * 8 + (lane & 3) * 2; };

    // Loader plan, fixed for the whole K loop: 16-byte chunks, 4 per 32-half row; chunk i of a
    // thread lies NTHREADS/4 rows below chunk 0 in shared memory. The global sources advance by
    // BK per stage, so a stage costs one add per source (the 64-bit index arithmetic per stage
    // was a quarter of the K loop's instructions). A rows are gathered once here.
    constexpr u32 A_CHUNKS = BM * 4 / NTHREADS, B_CHUNKS = BN * 4 / NTHREADS;
    constexpr u32 CHUNK_ROWS = NTHREADS / 4, STAGE_BYTES = STAGE_HALVES * 2;
    const u32 smem_base = smem_addr(smem);
    const u32 ld_dst = ((t >> 2) * LDS + (t & 3) * 8) * 2;  // bytes, chunk 0 of A (B: + BM rows)
#if MOE_DIAG
    // GDC readout: this launch's expert e is crossbar block e % diag_kb of expert e / diag_kb of
    // the weights [E, N, diag_k] (the forward's operands, no regrouped copy), and its rows are
    // the identity rows in order, row r one-hot at input r. The tile's rows [m0, m0 + BM) thus
    // see inputs [m0, m0 + BM) only: the others are zero, and their products add exact zeros to
    // every sum (W x̃, Σ|W|x̃², the IR-drop sums), so the result is the whole block's. A quarter
    // of the MMAs for 512-row crossbars.
    const u32 k_first = m0, k_len = min(BM, K - m0);
    const u64 w_ld = p.diag_k;
    const u64 w_off = ((u64)(e / p.diag_kb) * p.n + n0 + (t >> 2)) * w_ld + (u64)(e % p.diag_kb) * K + k_first +
                      (t & 3) * 8;
#else
    const u32 k_first = 0, k_len = K;
    const u64 w_ld = K;
    const u64 w_off = ((u64)e * p.n + n0 + (t >> 2)) * K + (t & 3) * 8;
#endif
    const u64 b_stride = (u64)CHUNK_ROWS * w_ld;
    const u16* a_src[A_CHUNKS];
    u32 a_bytes[A_CHUNKS];
#pragma unroll
    for (u32 i = 0; i < A_CHUNKS; ++i) {
        const u32 r = (t >> 2) + i * CHUNK_ROWS;
        const bool ok = m0 + r < rows_e;
        const u32 pos = row_begin + m0 + r;
        const u32 row = ok ? (p.a_row_of ? p.a_row_of[pos] : pos) : 0;
        a_src[i] = p.a + (u64)row * K + k_first + (t & 3) * 8;
        a_bytes[i] = ok ? 16u : 0u;
    }
    const u16* w_src = p.w_hi + w_off;
#if NB_MAT == 2
    const u16* wl_src = p.w_lo + w_off;
#endif

    // Copies the next BK columns of K into the stage at byte offset `stage_off`.
    auto load_stage = [&](u32 stage_off) {
        const u32 s = smem_base + stage_off + ld_dst;
#pragma unroll
        for (u32 i = 0; i < A_CHUNKS; ++i) {
            cp_async16(s + i * CHUNK_ROWS * LDS * 2, a_src[i], a_bytes[i]);
            a_src[i] += BK;
        }
#pragma unroll
        for (u32 i = 0; i < B_CHUNKS; ++i) {
            cp_async16(s + (BM + i * CHUNK_ROWS) * LDS * 2, w_src + i * b_stride, 16u);
#if NB_MAT == 2
            cp_async16(s + (BM + BN + i * CHUNK_ROWS) * LDS * 2, wl_src + i * b_stride, 16u);
#endif
        }
        w_src += BK;
#if NB_MAT == 2
        wl_src += BK;
#endif
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // Per-thread ldmatrix offsets (bytes) inside a stage: A fragment rows of this warp, B rows.
    const u32 a_ld = ((wm * (MI * 16) + (lane & 15)) * LDS + (lane >> 4) * 8) * 2;
    const u32 b_ld = ((BM + wn * (TN * 8) + (lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8) * 2;

    float acc[MI][TN][4];
#if MOE_ANALOG
    float total[MI][TN][4];
    u32 bm_rows = 0;  // MOE_BM: bit mi·2 + half: that row had a saturated output in some crossbar block
#endif
#if MOE_PCM_READ
    float acc_s2[MI][TN][4];
#endif
#if MOE_IR_DROP
    float acc_abs[MI][TN][4], acc_ir[MI][TN][4];
#endif
    // Zero the accumulators of one crossbar block along K (before each block's MMAs).
    auto reset_block = [&]() {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    acc[i][j][r] = 0.0f;
#if MOE_PCM_READ
                    acc_s2[i][j][r] = 0.0f;
#endif
#if MOE_IR_DROP
                    acc_abs[i][j][r] = 0.0f;
                    acc_ir[i][j][r] = 0.0f;
#endif
                }
    };
    reset_block();
#if MOE_ANALOG
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) total[i][j][r] = 0.0f;
#endif

    // MOE_DIAG: one crossbar block (n_kb = 1), of which the tile's K range.
    const u32 n_steps = k_len / BK, steps_per_block = MOE_DIAG ? n_steps : p.k_block / BK;
    // Prologue: STAGES − 1 stages in flight (empty groups keep the group count uniform).
#pragma unroll
    for (u32 st = 0; st < MOE_STAGES - 1; ++st) {
        if (st < n_steps) load_stage(st * STAGE_BYTES);
        else asm volatile("cp.async.commit_group;\n" ::);
    }
    // Rotating stage offsets (read: this step's stage; write: the one STAGES − 1 ahead) and the
    // position inside the current crossbar block, as counters instead of divisions.
    u32 read_off = 0, write_off = (MOE_STAGES - 1) * STAGE_BYTES;
#if MOE_ANALOG
    u32 kb = 0, step_in_block = 0;
#endif
    for (u32 step = 0; step < n_steps; ++step) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(MOE_STAGES - 2));
        // Stage `step` has landed for every thread, and every thread is done with the stage
        // consumed at step − 1, which the load below overwrites.
        __syncthreads();
        if (step + MOE_STAGES - 1 < n_steps) load_stage(write_off);
        else asm volatile("cp.async.commit_group;\n" ::);
        write_off = write_off == (MOE_STAGES - 1) * STAGE_BYTES ? 0 : write_off + STAGE_BYTES;
        const u32 s = smem_base + read_off;
        read_off = read_off == (MOE_STAGES - 1) * STAGE_BYTES ? 0 : read_off + STAGE_BYTES;
#pragma unroll
        for (u32 kk = 0; kk < BK; kk += 16) {
            u32 a[MI][4];
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
                ldmatrix_x4(s + a_ld + (mi * 16 * LDS + kk) * 2, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
            u32 b[TN][2];
#pragma unroll
            for (u32 tp = 0; tp < TN / 2; ++tp)
                ldmatrix_x4(s + b_ld + (tp * 16 * LDS + kk) * 2, b[2 * tp][0], b[2 * tp][1], b[2 * tp + 1][0],
                            b[2 * tp + 1][1]);
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
                for (u32 tn = 0; tn < TN; ++tn) mma16816(acc[mi][tn], a[mi], b[tn][0], b[tn][1]);
#if NB_MAT == 2
            {
                u32 bl[TN][2];
#pragma unroll
                for (u32 tp = 0; tp < TN / 2; ++tp)
                    ldmatrix_x4(s + b_ld + ((BN + tp * 16) * LDS + kk) * 2, bl[2 * tp][0], bl[2 * tp][1],
                                bl[2 * tp + 1][0], bl[2 * tp + 1][1]);
#pragma unroll
                for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (u32 tn = 0; tn < TN; ++tn) mma16816(acc[mi][tn], a[mi], bl[tn][0], bl[tn][1]);
            }
#endif
#if MOE_PCM_READ || MOE_IR_DROP
            u32 babs[TN][2];
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                babs[tn][0] = b[tn][0] & 0x7fff7fffu;
                babs[tn][1] = b[tn][1] & 0x7fff7fffu;
            }
#endif
#if MOE_PCM_READ
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi) {
                u32 a2[4] = {hmul2(a[mi][0], a[mi][0]), hmul2(a[mi][1], a[mi][1]), hmul2(a[mi][2], a[mi][2]),
                             hmul2(a[mi][3], a[mi][3])};
#pragma unroll
                for (u32 tn = 0; tn < TN; ++tn) mma16816(acc_s2[mi][tn], a2, babs[tn][0], babs[tn][1]);
            }
#endif
#if MOE_IR_DROP
            {
                u32 j0 = k_first + step_in_block * BK + kk + (lane & 3) * 2;
                float nf = (float)p.k_block;
                u32 f_lo = pack_f16x2(ir_row_factor(j0, nf), ir_row_factor(j0 + 1, nf));
                u32 f_hi = pack_f16x2(ir_row_factor(j0 + 8, nf), ir_row_factor(j0 + 9, nf));
#pragma unroll
                for (u32 mi = 0; mi < MI; ++mi) {
                    u32 aa[4] = {a[mi][0] & 0x7fff7fffu, a[mi][1] & 0x7fff7fffu, a[mi][2] & 0x7fff7fffu,
                                 a[mi][3] & 0x7fff7fffu};
                    u32 af[4] = {hmul2(a[mi][0], f_lo), hmul2(a[mi][1], f_lo), hmul2(a[mi][2], f_hi),
                                 hmul2(a[mi][3], f_hi)};
#pragma unroll
                    for (u32 tn = 0; tn < TN; ++tn) {
                        mma16816(acc_abs[mi][tn], aa, babs[tn][0], babs[tn][1]);
                        mma16816(acc_ir[mi][tn], af, b[tn][0], b[tn][1]);
                    }
                }
            }
#endif
        }

#if MOE_ANALOG
        if (++step_in_block == steps_per_block) {
            step_in_block = 0;
            // Epilogue of crossbar block kb (block_outputs). The block's column tables (tensor
            // id, scale) as row pointers: 32-bit indexing below.
            const u64 tab_row = ((u64)e * p.n_kb + kb) * p.n;
            const u32* tid_of_col = p.col_tensor_id + tab_row;
            const float* scale_of_col = p.col_scale + tab_row;
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
                for (u32 half = 0; half < 2; ++half) {
                    const u32 row_local = frag_row(mi, half);
                    if (row_local >= rows_e) continue;
#if MOE_MODE == 4
                    // Rows without a pending crossbar (lanes l and l ^ 1 share the row).
                    if (p.bm_flag[row_begin + row_local] == 0u) continue;
                    const int slot = p.bm_slot[row_begin + row_local];
#endif
                    const BlockRow br = block_row(p, row_begin + row_local, row_local, kb);
                    float2 z[TN];
#pragma unroll
                    for (u32 tn = 0; tn < TN; tn += 2) {
                        z[tn] = z[tn + 1] = make_float2(0.0f, 0.0f);
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
                        output_normals(p, br, tid_of_col, frag_col(tn), lane, z[tn], z[tn + 1]);
#endif
                    }
#pragma unroll
                    for (u32 tn = 0; tn < TN; ++tn) {
                        const u32 r0 = half * 2;
                        PairSums s;
#pragma unroll
                        for (u32 c = 0; c < 2; ++c) {
                            s.acc[c] = acc[mi][tn][r0 + c];
#if MOE_PCM_READ
                            s.s2[c] = acc_s2[mi][tn][r0 + c];
#endif
#if MOE_IR_DROP
                            s.abs[c] = acc_abs[mi][tn][r0 + c];
                            s.ir[c] = acc_ir[mi][tn][r0 + c];
#endif
                        }
#if MOE_MODE == 4
                        // The attempt's outputs of this row's pending crossbars, scaled as the
                        // running total would add them; saturation per crossbar for the host.
                        float t2[2] = {0.0f, 0.0f};
                        u32 sat = 0u;
                        block_outputs(p, br, scale_of_col, frag_col(tn), s, z[tn], t2, sat, 1u);
#pragma unroll
                        for (u32 c = 0; c < 2; ++c) {
                            const u32 col = frag_col(tn) + c;
                            const u64 xb = ((u64)slot * p.n_kb + kb) * p.n_xbar + p.col_xbar[col];
                            if (!p.bm_pending[xb]) continue;
                            p.bm_scratch[((u64)slot * p.n_kb + kb) * p.n + col] = t2[c];
                            if ((sat >> c) & 1u) p.bm_sat[xb] = 1u;
                        }
#else
                        block_outputs(p, br, scale_of_col, frag_col(tn), s, z[tn], &total[mi][tn][r0], bm_rows,
                                      1u << (mi * 2 + half));
#endif
                    }
                }
            reset_block();
            ++kb;
        }
#endif
    }

#if MOE_MODE == 4
    return;  // the attempt's outputs are in bm_scratch
#endif
#if MOE_BM
    // Flag each saturated row for the bound-management attempts, which redo it.
#pragma unroll
    for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
        for (u32 half = 0; half < 2; ++half)
            if (bm_rows & (1u << (mi * 2 + half))) {
                const u32 pos = row_begin + frag_row(mi, half);
                p.bm_flag[pos] = 1u;
            }
#endif

#if MOE_ANALOG
#define RESULT total
#else
#define RESULT acc
#endif
    // Output: store, SwiGLU, or weighted scatter-add (gather/scatter fused, no padded copies).
#pragma unroll
    for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
        for (u32 half = 0; half < 2; ++half) {
            const u32 row_local = frag_row(mi, half);
            if (row_local >= rows_e) continue;
            const u32 pos = row_begin + row_local;
#if MOE_MODE == 0 || MOE_MODE == 5
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                const u32 col = frag_col(tn);
                store_row2(p.out, (u64)pos * p.n + col, RESULT[mi][tn][half * 2], RESULT[mi][tn][half * 2 + 1]);
            }
#elif MOE_MODE == 1 || MOE_MODE == 3
            // Columns come interleaved in groups of 8: gate group g, up group g (host layout).
#pragma unroll
            for (u32 tn = 0; tn < TN; tn += 2) {
                const u32 col = n0 + wn * (TN * 8) + tn * 8;
                const u32 hcol = (col / 16) * 8 + (lane & 3) * 2;
                float h[2];
#pragma unroll
                for (u32 c = 0; c < 2; ++c) {
                    h[c] = silu_mul(RESULT[mi][tn][half * 2 + c], RESULT[mi][tn + 1][half * 2 + c]);
                }
                store_hidden(p.out, (u64)pos * (p.n / 2) + hcol, h[0], h[1]);
            }
#else
            const u32 token = p.sorted_token[pos];
            const float w = p.sorted_weight[pos];
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                const u32 col = frag_col(tn);
                float* dst = p.out + (u64)token * p.n + col;
                atomic_add2(dst, w * RESULT[mi][tn][half * 2], w * RESULT[mi][tn][half * 2 + 1]);
            }
#endif
        }
}

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
#if WG_BN != 128 && WG_BN != 256
#error "WG_BN must be 128 or 256"
#endif
#if WG_PIPE > 3 || (WG_PIPE < 2 && WG_STAGES < 2 + WG_PIPE)
#error "WG_STAGES too small for WG_PIPE, or no such WG_PIPE"
#endif
#define WG_BM 128
#define WG_BK 64
#define WG_THREADS 256
#define WG_A_BYTES (WG_BM * WG_BK * 2)
// Weight tiles per stage: fp16 hi and lo for split analog weights, else one.
#if MOE_ANALOG && MOE_SPLIT_W
#define WG_NB_MAT 2
#else
#define WG_NB_MAT 1
#endif
#define WG_B_BYTES (WG_BN * WG_BK * 2)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_NB_MAT * WG_B_BYTES)
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
__device__ __forceinline__ u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)(16 >> 4) << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

// Byte offset of 16-byte chunk c (0..7) of row r in a 128B-swizzled tile (1024-byte aligned).
__device__ __forceinline__ u32 wg_swizzle(u32 r, u32 c) { return r * 128u + ((c ^ (r & 7u)) << 4); }

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

// The wgmma of one BK = 64 stage for the warpgroup whose 64 A rows start at s_a: 4 of them, or
// 8 with split analog weights (hi at s_b, lo after it), hi then lo per k16 as moe_gemm adds
// them.
__device__ __forceinline__ void wg_mma_stage(float* d, u32 s_a, u32 s_b) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (u32 kk = 0; kk < WG_BK / 16; ++kk) {
#pragma unroll
        for (u32 b = 0; b < WG_NB_MAT; ++b) {
#if WG_BN == 128
            wgmma_m64n128k16(d, wg_desc(s_a + kk * 32), wg_desc(s_b + b * WG_B_BYTES + kk * 32));
#else
            wgmma_m64n256k16(d, wg_desc(s_a + kk * 32), wg_desc(s_b + b * WG_B_BYTES + kk * 32));
#endif
        }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Loads of one stage (A: WG_BM gathered rows, B: WG_BN weight rows, 64 halves of K each, and
// as many rows of w_lo after them for split analog weights) by
// THREADS threads into the 128B-swizzled layout: thread t takes 16-byte chunk t % 8 of rows
// t / 8 + (THREADS / 8)·i. A rows are kept as operand row indices (~0u: past the expert's
// rows, zero-filled), so a 128-thread producer holds 8 registers for them, not 16.
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
    // cp.async of stage k0: A into s_a, then (load) B into s_a + WG_A_BYTES; the caller commits.
    __device__ __forceinline__ void load_a(const GemmParams& p, u32 t, u32 s_a, u32 k0) const {
        const u32 c = t & 7;
#pragma unroll
        for (u32 i = 0; i < A_CH; ++i) {
            const bool ok = a_row[i] != ~0u;
            const u16* src = p.a + (u64)(ok ? a_row[i] : 0u) * p.k + c * 8 + k0;
            cp_async16(s_a + wg_swizzle((t >> 3) + STEP * i, c), src, ok ? 16u : 0u);
        }
    }
    __device__ __forceinline__ void load(const GemmParams& p, u32 t, u32 s_a, u32 k0) const {
        load_a(p, t, s_a, k0);
        const u32 s_b = s_a + WG_A_BYTES, c = t & 7;
#pragma unroll
        for (u32 b = 0; b < WG_NB_MAT; ++b) {
            const u16* w_src = (b == 0 ? p.w_hi : p.w_lo) + w_off + k0;
#pragma unroll
            for (u32 i = 0; i < B_CH; ++i)
                cp_async16(s_b + b * WG_B_BYTES + wg_swizzle((t >> 3) + STEP * i, c), w_src + (u64)(STEP * i) * p.k,
                           16u);
        }
    }
};

// The tile a CTA of the one-CTA-per-tile kernels (WG_PIPE 0 and 1, digital and analog) takes
// (tile_of_block) and this thread's place in it.
struct WgCta {
    u32 base;             // shared address of the stages, aligned to the 1024-byte swizzle atom
    u32 e, row_begin, rows_e, m0, n0;  // expert, its sorted rows, the tile's first row and column
    u32 t, lane, wg, warp_in_wg;
};

// False past the last tile.
__device__ __forceinline__ bool wg_cta(const GemmParams& p, unsigned char* smem, WgCta& c) {
    u32 m_tile, n_tile;
    if (!tile_of_block(p, p.n / WG_BN, MOE_RASTER_COLS / WG_BN, c.e, m_tile, n_tile)) return false;
    c.base = (smem_addr(smem) + 1023u) & ~1023u;  // the host adds 1024 bytes of slack
    c.row_begin = p.offsets[c.e];
    c.rows_e = p.offsets[c.e + 1] - c.row_begin;
    c.m0 = m_tile * WG_BM;
    c.n0 = n_tile * WG_BN;
    c.t = threadIdx.x;
    c.lane = c.t & 31;
    c.wg = c.t >> 7;
    c.warp_in_wg = (c.t >> 5) & 3;
    return true;
}

// The cp.async stage ring of the one-CTA-per-tile kernels: all WG_THREADS threads load,
// WG_AHEAD K steps ahead of the step being multiplied.
struct WgStages {
    WgLoader<WG_THREADS> loader;
    u32 base, n_steps;  // shared address of slot 0; K steps of WG_BK
    __device__ __forceinline__ WgStages(const GemmParams& p, const WgCta& c)
        : loader(p, c.t, c.e, c.row_begin, c.rows_e, c.m0, c.n0), base(c.base), n_steps(p.k / WG_BK) {}
    __device__ __forceinline__ u32 slot(u32 step) const { return base + (step % WG_STAGES) * WG_STAGE_BYTES; }
    // K step `step` into its slot, as one commit group (empty past the last step, so that
    // the group count, which cp.async.wait_group counts in, stays uniform).
    __device__ __forceinline__ void load(const GemmParams& p, u32 t, u32 step) const {
        if (step < n_steps) loader.load(p, t, slot(step), step * WG_BK);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    // Prologue: the first WG_AHEAD steps in flight.
    __device__ __forceinline__ void start(const GemmParams& p, u32 t) const {
#pragma unroll
        for (u32 st = 0; st < WG_AHEAD; ++st) load(p, t, st);
    }
    // Waits until step `step` has landed for every thread, refills the slot WG_AHEAD steps on
    // and returns step's slot. After the barrier every warpgroup is also done with the slot
    // the refill overwrites: step + WG_AHEAD − WG_STAGES = step − 1 − WG_PIPE, whose wgmma
    // retired at the wait_group WG_PIPE of an earlier step.
    __device__ __forceinline__ u32 next(const GemmParams& p, u32 t, u32 step) const {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_AHEAD - 1));
        // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        load(p, t, step + WG_AHEAD);
        return slot(step);
    }
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
// moe_analog_wgmma: the analog grouped GEMM for sm_90a (moe_gemm's contract with MOE_ANALOG 1, output modes 0–2):
// DAC codes × fp16 weights (hi and lo with MOE_SPLIT_W) by wgmma, 128 × 128 CTA tiles, two
// warpgroups of 64 rows, cp.async loads by all 256 threads and one wgmma group in flight
// across the barrier (WG_PIPE 1) or not (0). The crossbar periphery (block_outputs) of block
// kb runs while the wgmma of block kb + 1 do: at the end of a block each thread moves its
// accumulators to `prev` in shared memory and zeroes them, and each of the MOE_KB_STEPS steps
// of the next block issues its wgmma and then finishes 1/MOE_KB_STEPS of prev's fragment pairs
// on the CUDA cores before it waits for them (wg_block_part). (mma.sync moe_gemm overlaps the
// two only across its 2 CTAs per SM.) Registers: the block sums d and the running total, 64
// each per thread; prev in registers too spilled 580 bytes (ptxas). Shared memory: the stages, then prev
// ([64][256] f32, thread-minor: conflict-free). Side accumulators (PCM_READ, IR drop) would
// need 64 more registers each: those variants run moe_gemm.
// Status (reports/bench/2026-11-24-analog-wgmma.md): bit-identical to moe_gemm, but slower on
// every bench shape (OLMoE layer, Lightning set: 23.8 against 20.7 ms), so the host runs it
// only with AIMC_ANALOG_WGMMA=1. Nsight Compute: the periphery is issue-latency bound (Philox
// and Box–Muller dependency chains; 35 % of issue slots busy) on the 8 warps one CTA per SM
// leaves (200 registers, 208 KiB of shared memory), where moe_gemm has 16. What should lift
// it: more warps for the periphery (epilogue warpgroups fed through prev while the MMA
// warpgroups run on), not more MMA throughput.
#if MOE_PCM_READ || MOE_IR_DROP || MOE_MODE == 3 || WG_BN != 128 || WG_PIPE > 1
#error "the analog wgmma GEMM: no side accumulators, output modes 0-2, WG_BN 128, WG_PIPE 0 or 1"
#endif
#ifndef MOE_KB_STEPS
#error "MOE_KB_STEPS (crossbar rows per block / 64) must be defined"
#endif
#define WG_PAIRS (WG_BN / 16)  // n8 fragment pairs per warpgroup row

// The periphery of the fragment pairs of `prev` (one block; this thread's value i at
// prev[i·256]) that step j of the next block takes, pairs [j·WG_PAIRS/KB_STEPS,
// (j + 1)·WG_PAIRS/KB_STEPS), both rows (halves) of this thread. Each output's contribution
// to the running total replaces its block sum in prev; the caller adds prev to the total once
// the block is done. One copy of this code, called in a loop: unrolled over the block's steps
// it made the kernel 226 KB of SASS, and a third of Nsight Compute's stall samples were
// instruction-cache misses (stall_no_inst).
__device__ __forceinline__ void wg_block_part(const GemmParams& p, u32 j, float* prev, const BlockRow* br,
                                              const bool* row_ok, const u32* tid_of_col, const float* scale_of_col,
                                              u32 n0, u32 lane, u32& bm_rows) {
#pragma unroll 1
    for (u32 fp = j * WG_PAIRS / MOE_KB_STEPS; fp < (j + 1) * WG_PAIRS / MOE_KB_STEPS; ++fp) {
#pragma unroll
        for (u32 half = 0; half < 2; ++half) {
            if (!row_ok[half]) continue;
            const u32 col0 = n0 + fp * 16 + (lane & 3) * 2;
            float2 z[2] = {make_float2(0.0f, 0.0f), make_float2(0.0f, 0.0f)};
#if MOE_OUT_NOISE || MOE_ADDITIVE
            output_normals(p, br[half], tid_of_col, col0, lane, z[0], z[1]);
#endif
#pragma unroll
            for (u32 f = 0; f < 2; ++f) {
                float* v = prev + (4 * (2 * fp + f) + 2 * half) * WG_THREADS;
                PairSums s;
                s.acc[0] = v[0];
                s.acc[1] = v[WG_THREADS];
                // 0 + x is x for every x but −0 (→ +0), which adds to the total as −0 would:
                // the total is never −0 (it starts at +0, and a sum is −0 only of two −0s).
                float c[2] = {0.0f, 0.0f};
                block_outputs(p, br[half], scale_of_col, col0 + 8 * f, s, z[f], c, bm_rows, 1u << half);
                v[0] = c[0];
                v[WG_THREADS] = c[1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_analog_wgmma(GemmParams p) {
    extern __shared__ __align__(16) unsigned char wg_smem[];
    WgCta cta;
    if (!wg_cta(p, wg_smem, cta)) return;
    const auto [base, e, row_begin, rows_e, m0, n0, t, lane, wg, warp_in_wg] = cta;
    const WgStages stages(p, cta);
    // This thread's two rows of the tile (accumulator halves 0 and 1).
    const u32 row_local0 = m0 + wg * 64 + warp_in_wg * 16 + (lane >> 2);
    const bool row_ok[2] = {row_local0 < rows_e, row_local0 + 8 < rows_e};

    float d[WG_BN / 2], total[WG_BN / 2];
    float* prev = (float*)(wg_smem + (base - smem_addr(wg_smem)) + WG_STAGES * WG_STAGE_BYTES) + t;
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) {
        d[i] = 0.0f;
        total[i] = 0.0f;
    }
    wg_fence_acc(d);

    stages.start(p, t);
    u32 bm_rows = 0;  // bit h: row h had a saturated output in some crossbar block
    BlockRow br[2];   // the rows of the block in prev
    const u32* tid_of_col = p.col_tensor_id;
    const float* scale_of_col = p.col_scale;
    // prev: the contributions of block kb − 1 go to the total (this thread's own values: no
    // barrier), in block order as moe_gemm adds them; then the sums of block kb replace them.
    auto finish_block = [&](u32 kb) {
#pragma unroll
        for (int i = 0; i < WG_BN / 2; ++i) {
            if (kb > 0) total[i] += prev[i * WG_THREADS];
            prev[i * WG_THREADS] = d[i];
            d[i] = 0.0f;
        }
    };
    u32 step = 0;
    // Block kb's MMAs, and the periphery of block kb − 1 between each step's wgmma issue and
    // wait. The wgmma must not sit in a branch: ptxas serialised them all (C7518, "WG.DP in
    // divergent path") while the MMAs and the periphery were one loop with a pass for each.
    for (u32 kb = 0; kb < p.n_kb; ++kb) {
#pragma unroll 1
        for (u32 j = 0; j < MOE_KB_STEPS; ++j, ++step) {
            const u32 s_a = stages.next(p, t, step);
            wg_mma_stage(d, s_a + wg * (64 * 128), s_a + WG_A_BYTES);
            if (kb > 0) wg_block_part(p, j, prev, br, row_ok, tid_of_col, scale_of_col, n0, lane, bm_rows);
            asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(WG_PIPE) : "memory");
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        wg_fence_acc(d);
        finish_block(kb);
        wg_fence_acc(d);
#pragma unroll
        for (u32 half = 0; half < 2; ++half)
            if (row_ok[half]) br[half] = block_row(p, row_begin + row_local0 + 8 * half, row_local0 + 8 * half, kb);
        const u64 tab_row = ((u64)e * p.n_kb + kb) * p.n;
        tid_of_col = p.col_tensor_id + tab_row;
        scale_of_col = p.col_scale + tab_row;
    }
    // The last block's periphery, with no MMAs left to hide it.
#pragma unroll 1
    for (u32 j = 0; j < MOE_KB_STEPS; ++j)
        wg_block_part(p, j, prev, br, row_ok, tid_of_col, scale_of_col, n0, lane, bm_rows);
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) total[i] += prev[i * WG_THREADS];
#if MOE_BM
#pragma unroll
    for (u32 half = 0; half < 2; ++half)
        if (bm_rows & (1u << half)) p.bm_flag[row_begin + row_local0 + 8 * half] = 1u;
#else
    (void)bm_rows;
#endif
    wg_epilogue(p, total, row_begin, rows_e, m0 + wg * 64, n0, warp_in_wg, lane);
}
#elif WG_PIPE < 2
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_gemm_wgmma(GemmParams p) {
    extern __shared__ __align__(16) unsigned char wg_smem[];
    WgCta cta;
    if (!wg_cta(p, wg_smem, cta)) return;
    const auto [base, e, row_begin, rows_e, m0, n0, t, lane, wg, warp_in_wg] = cta;
    const WgStages stages(p, cta);

    float d[WG_BN / 2];
#pragma unroll
    for (int i = 0; i < WG_BN / 2; ++i) d[i] = 0.0f;
    wg_fence_acc(d);

    stages.start(p, t);
    for (u32 step = 0; step < stages.n_steps; ++step) {
        const u32 s_a = stages.next(p, t, step);
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
// comes by TMA (the host's tensor map `w_map` of w_hi as [E·N, K] bf16, 128B swizzle: the same
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

// The host's CUtensorMap (an opaque 128-byte object, 64-byte aligned as a kernel parameter).
struct __align__(64) TmaMap {
    u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
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
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
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
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"((u64)map), "r"(k0), "r"(row), "r"(bar)
        : "memory");
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
                if (active) loader.load_a(p, t, s_a, step * WG_BK);
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

// Weights f32 → fp16 hi + fp16 lo with hi + lo ≈ w to ~22 significant bits (analog operands).
extern "C" __global__ void split_f16(const float* w, u64 n, u16* hi, u16* lo) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = w[i];
    u16 h = f32_to_f16(x);
    float hf;
    asm("cvt.f32.f16 %0, %1;" : "=f"(hf) : "h"(h));
    hi[i] = h;
    lo[i] = f32_to_f16(x - hf);
}

// Step 8 of docs/model.md §3, iterative bound management, after the attempts of MOE_MODE 4
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

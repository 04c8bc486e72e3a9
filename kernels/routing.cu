// Routing of one MoE layer on the GPU: the (token, expert, weight) pairs sorted by expert
// (moe_count → moe_scan → moe_scatter) and the per-MVM noise keys of sequences routed together
// (moe_noise_keys). Launched by backend::cuda::routing::route, which mirrors the CPU's
// model::moe::dispatch (tokens gathered per expert in (token, slot) order).
// warp_inclusive_sum is shared with the clustered GEMM of gemm_wgmma.cuh.
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

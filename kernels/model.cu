// The dense parts of a decoder forward pass on the GPU (backend::cuda::model): embedding
// gather, RMSNorm, bias, clamp, RoPE, causal attention, SwiGLU, residual adds, and the
// per-position metrics of an evaluation. Prepended by the host: philox.cuh (for u32/u64).
// f32 throughout; each kernel names the Rust function it mirrors (src/model/, and
// backend::score::compare for token_metrics). The
// products with weight matrices go through cuBLAS SGEMM (backend::cuda::blas::Blas::sgemm_nt).

// Mirrors `embed_tokens.select(Axis(0), ids)` in Model::forward_batch: out[r] = table[ids[r]].
extern "C" __global__ void embed_gather(const float* table, const u32* ids, float* out, u32 rows, u32 width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * width) return;
    const u64 r = i / width, c = i % width;
    out[i] = table[(u64)ids[r] * width + c];
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Mirrors RmsNorm::forward_inplace: each consecutive `width`-wide group of a row is normalised,
// y = w ⊙ (x · 1/sqrt(mean(x²) + ε)). One warp per group; x = nullptr normalises y in place.
extern "C" __global__ void rms_norm(const float* x, float* y, const float* w, u64 groups, u32 width, float eps) {
    const u64 g = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const u32 lane = threadIdx.x & 31;
    if (g >= groups) return;
    const float* xs = (x ? x : y) + g * width;
    float* ys = y + g * width;
    float ss = 0.0f;
    for (u32 c = lane; c < width; c += 32) ss += xs[c] * xs[c];
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)width + eps);
    for (u32 c = lane; c < width; c += 32) ys[c] = w[c] * (xs[c] * inv);
}

// Mirrors Linear::forward's `y += b` (rows of `width`).
extern "C" __global__ void add_bias(float* y, const float* b, u64 n, u32 width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += b[i % width];
}

// Mirrors StandardAttention::forward's clip_qkv: x = clamp(x, −c, c).
extern "C" __global__ void clamp_abs(float* x, u64 n, float c) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fminf(fmaxf(x[i], -c), c);
}

// Mirrors RopeTable::apply with offset 0 per sequence: `cos`, `sin` are the table's
// [positions, half] rows; the rows are sequences of `window` tokens one after another, row r at
// position r mod window. Pairs (i, i + half) or, interleaved, (2i, 2i + 1) of each head.
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, u32 rows, u32 heads,
                                u32 head_width, u32 half, u32 interleaved, u32 window) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * half) return;
    const u32 k = i % half;
    const u64 rh = i / half;
    const u32 h = rh % heads;
    const u64 r = rh / heads;
    float* row = x + r * ((u64)heads * head_width) + (u64)h * head_width;
    const u32 a = interleaved ? 2 * k : k, b = interleaved ? 2 * k + 1 : k + half;
    const u64 pos = r % window;
    const float c = cos_t[pos * half + k], s = sin_t[pos * half + k];
    const float x0 = row[a], x1 = row[b];
    row[a] = x0 * c - x1 * s;
    row[b] = x1 * c + x0 * s;
}

// Rows of queries per CTA of causal_attention (one warp each) and keys per shared-memory tile.
#define ATT_ROWS 16
#define ATT_KEYS 32
// Largest value head width: each lane keeps ATT_DV_MAX / 32 output accumulators.
#define ATT_DV_MAX 256
// Accumulators per lane the host compiles for (⌈dv / 32⌉: 2 for 64-wide heads instead of 8
// mostly idle ones).
#ifndef ATT_DV_SLOTS
#define ATT_DV_SLOTS (ATT_DV_MAX / 32)
#endif
#if ATT_DV_SLOTS > ATT_DV_MAX / 32
#error "ATT_DV_SLOTS"
#endif

// Mirrors multi_head_attention / causal_attention for `s` rows that are sequences of `window`
// rows one after another (the last may be shorter): with b the first row of row i's sequence,
// out[i, h·dv..] = softmax_{b≤j≤i}(q_i·k_j · scale) · v_j, query head h reading key/value head
// h / (heads / kv_heads). Online softmax over tiles of 32 keys (Milakov & Gimelshein 2018): the
// same function as the CPU's max-subtracted softmax, rounded in another order.
// Grid (⌈s / ATT_ROWS⌉, heads); block ATT_ROWS warps; dynamic shared memory
// (ATT_KEYS·(dq + 1) + ATT_KEYS·dv + ATT_ROWS·dq) floats.
extern "C" __global__ void causal_attention(const float* q, const float* k, const float* v, float* out, u32 s,
                                            u32 heads, u32 kv_heads, u32 dq, u32 dv, float scale, u32 window) {
    extern __shared__ float smem[];
    float* ks = smem;                          // [ATT_KEYS][dq + 1]
    float* vs = ks + ATT_KEYS * (dq + 1);      // [ATT_KEYS][dv]
    float* qs = vs + ATT_KEYS * dv;            // [ATT_ROWS][dq]
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const u32 h = blockIdx.y, g = h / (heads / kv_heads);
    const u32 row0 = blockIdx.x * ATT_ROWS;
    const u32 i = row0 + warp;
    const u64 q_stride = (u64)heads * dq, k_stride = (u64)kv_heads * dq, v_stride = (u64)kv_heads * dv;
    if (i < s)
        for (u32 d = lane; d < dq; d += 32) qs[warp * dq + d] = q[i * q_stride + (u64)h * dq + d];
    float acc[ATT_DV_SLOTS];
#pragma unroll
    for (u32 c = 0; c < ATT_DV_SLOTS; ++c) acc[c] = 0.0f;
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    const u32 last = min(row0 + ATT_ROWS, s);  // keys first..last are visible to some row
    const u32 first = row0 / window * window;
    const u32 b = i / window * window;         // this row's first key
    for (u32 j0 = first / ATT_KEYS * ATT_KEYS; j0 < last; j0 += ATT_KEYS) {
        __syncthreads();
        // Warp per key, lanes along the head: coalesced rows, no index division.
        for (u32 jj = warp; jj < ATT_KEYS; jj += ATT_ROWS) {
            const u32 j = j0 + jj;
            for (u32 d = lane; d < dq; d += 32)
                ks[jj * (dq + 1) + d] = j < s ? k[j * k_stride + (u64)g * dq + d] : 0.0f;
            for (u32 d = lane; d < dv; d += 32) vs[jj * dv + d] = j < s ? v[j * v_stride + (u64)g * dv + d] : 0.0f;
        }
        __syncthreads();
        // Tiles wholly before the row's sequence are skipped (a tile of masked keys only would
        // make the running max −∞ and its correction NaN).
        if (i >= s || j0 > i || j0 + ATT_KEYS <= b) continue;
        const u32 j = j0 + lane;
        const bool seen = j >= b && j <= i;
        float score = -__int_as_float(0x7f800000);
        if (seen) {
            float dot = 0.0f;
            for (u32 d = 0; d < dq; ++d) dot += qs[warp * dq + d] * ks[lane * (dq + 1) + d];
            score = dot * scale;
        }
        const float m_new = fmaxf(m, warp_max(score));
        const float corr = expf(m - m_new);
        const float p = seen ? expf(score - m_new) : 0.0f;
        l = l * corr + warp_sum(p);
#pragma unroll
        for (u32 c = 0; c < ATT_DV_SLOTS; ++c) acc[c] *= corr;
        const u32 n_keys = min(ATT_KEYS, i + 1 - j0);
        for (u32 jj = 0; jj < n_keys; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (u32 c = 0; c < ATT_DV_SLOTS; ++c) {
                const u32 d = lane + 32 * c;
                if (d < dv) acc[c] += pj * vs[jj * dv + d];
            }
        }
        m = m_new;
    }
    if (i >= s) return;
    const float inv = 1.0f / l;
#pragma unroll
    for (u32 c = 0; c < ATT_DV_SLOTS; ++c) {
        const u32 d = lane + 32 * c;
        if (d < dv) out[i * ((u64)heads * dv) + (u64)h * dv + d] = acc[c] * inv;
    }
}

// silu(g)·u as common::silu_mul computes it.
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Mirrors common::silu_mul: h[r, c] = silu(gu[r, c]) · gu[r, inter + c].
extern "C" __global__ void silu_mul(const float* gu, float* h, u64 rows, u32 inter) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * inter) return;
    const u64 r = i / inter, c = i % inter;
    h[i] = silu_times(gu[r * 2 * inter + c], gu[r * 2 * inter + inter + c]);
}

// Mirrors common::silu_mul on the kernel layout of a grouped gate/up matrix, whose gate and up
// rows come interleaved in groups of 8 (backend::cuda::moe::interleave_rows): h[r, j] =
// silu(g)·u with g at column (j / 8)·16 + j % 8 of gu's row r and u 8 columns later.
extern "C" __global__ void silu_mul_interleaved(const float* gu, float* h, u64 rows, u32 inter) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * inter) return;
    const u64 r = i / inter;
    const u32 j = (u32)(i % inter), col = (j / 8) * 16 + j % 8;
    h[i] = silu_times(gu[r * 2 * inter + col], gu[r * 2 * inter + col + 8]);
}

// pos_of_pair[sorted_pair[p]] = p: where each (token, slot) pair landed in the expert-sorted
// order (backend::cuda::moe::GpuRouting).
extern "C" __global__ void invert_pairs(const u32* sorted_pair, u32* pos_of_pair, u32 pairs) {
    const u32 p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < pairs) pos_of_pair[sorted_pair[p]] = p;
}

#define COMBINE_MAX_K 32

// Mirrors the sum of model::moe::dispatch: out[t, c] = Σ w·y[p, c] over token t's k sorted pairs
// p in expert order (ascending p: the pairs are sorted by expert), each product rounded before
// its add as `row *= w; o += &row` does. y is [pairs, width] in sorted order; k ≤ COMBINE_MAX_K.
extern "C" __global__ void combine_pairs(const float* y, const u32* pos_of_pair, const float* sorted_weight,
                                         float* out, u32 tokens, u32 k, u32 width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)tokens * width) return;
    const u32 t = (u32)(i / width), c = (u32)(i % width);
    u32 pos[COMBINE_MAX_K];
    for (u32 j = 0; j < k; ++j) {
        const u32 p = pos_of_pair[(u64)t * k + j];
        u32 q = j;
        for (; q > 0 && pos[q - 1] > p; --q) pos[q] = pos[q - 1];
        pos[q] = p;
    }
    float acc = 0.0f;
    for (u32 j = 0; j < k; ++j) acc += sorted_weight[pos[j]] * y[(u64)pos[j] * width + c];
    out[i] = acc;
}

// h += y, or with `gate_logit` (one per row, Qwen2-MoE shared_expert_gate) h += y · σ(gate):
// the residual adds of DecoderLayer::forward and MoeBlock::forward.
extern "C" __global__ void add_rows(float* h, const float* y, const float* gate_logit, u64 n, u32 width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = y[i];
    if (gate_logit) v *= 1.0f / (1.0f + expf(-gate_logit[i / width]));
    h[i] += v;
}

#define MET_THREADS 256

// Mirrors backend::score::compare for one position per CTA (reference row r; its logits are row
// r + r / per_seq: sequences of per_seq + 1 rows, the last row of each scoring nothing; per_seq =
// 0: row r): with la = log_softmax(logits row)
// (max subtracted, Σ exp in f64, as log_softmax_rows), nll = −la[target], agree = (argmax la ==
// the digital argmax, first index on ties), kl = Σ_v exp(pd_v)·(pd_v − la_v) in f64. Writes
// out[3r..3r + 3] = (nll, kl, agree as 0 or 1): one copy back for all three.
extern "C" __global__ void token_metrics(const float* logits, const float* ref_logp, const u32* ref_argmax,
                                         const u32* targets, u32 vocab, u32 per_seq, double* out) {
    __shared__ float s_f[MET_THREADS / 32];
    __shared__ double s_d[MET_THREADS / 32];
    __shared__ u32 s_i[MET_THREADS / 32];
    const u32 r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    const float* x = logits + (u64)(per_seq ? r + r / per_seq : r) * vocab;
    const float* pd = ref_logp + (u64)r * vocab;
    // max
    float m = -__int_as_float(0x7f800000);
    for (u32 c = threadIdx.x; c < vocab; c += MET_THREADS) m = fmaxf(m, x[c]);
    m = warp_max(m);
    if (lane == 0) s_f[warp] = m;
    __syncthreads();
    m = s_f[0];
    for (u32 w = 1; w < MET_THREADS / 32; ++w) m = fmaxf(m, s_f[w]);
    // Σ exp(x − m) in f64
    double z = 0.0;
    for (u32 c = threadIdx.x; c < vocab; c += MET_THREADS) z += exp((double)(x[c] - m));
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    __syncthreads();
    if (lane == 0) s_d[warp] = z;
    __syncthreads();
    z = 0.0;
    for (u32 w = 0; w < MET_THREADS / 32; ++w) z += s_d[w];
    const double lse = (double)m + log(z);
    // argmax of la (first index of the largest) and the KL sum
    float best = -__int_as_float(0x7f800000);
    u32 best_i = 0xffffffffu;
    double k_sum = 0.0;
    for (u32 c = threadIdx.x; c < vocab; c += MET_THREADS) {
        const float la = (float)((double)x[c] - lse);
        if (la > best) {
            best = la;
            best_i = c;
        }
        const double p = (double)pd[c];
        k_sum += exp(p) * (p - (double)la);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ob > best || (ob == best && oi < best_i)) {
            best = ob;
            best_i = oi;
        }
        k_sum += __shfl_xor_sync(0xffffffffu, k_sum, o);
    }
    __syncthreads();
    if (lane == 0) {
        s_f[warp] = best;
        s_i[warp] = best_i;
        s_d[warp] = k_sum;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (u32 w = 1; w < MET_THREADS / 32; ++w) {
        if (s_f[w] > best || (s_f[w] == best && s_i[w] < best_i)) {
            best = s_f[w];
            best_i = s_i[w];
        }
    }
    k_sum = 0.0;
    for (u32 w = 0; w < MET_THREADS / 32; ++w) k_sum += s_d[w];
    out[3 * r] = -(double)(float)((double)x[targets[r]] - lse);
    out[3 * r + 1] = k_sum;
    out[3 * r + 2] = best_i == ref_argmax[r] ? 1.0 : 0.0;
}

// Mirrors RouterKind::route for the rules with a fixed number k of experts per token (the
// checkpoint's softmax rule with its optional group limit, softmax:K, sigmoid:K), one thread per
// token, in the CPU's order: scores (softmax with the max subtracted and a sequential sum, or
// independent sigmoids), group limit (groups ranked by their best score, ties to the lower
// group; scores outside the kept groups become 0), top-k descending with ties to the lower
// expert, optional renormalisation by the sequential sum of the kept weights, × scaling.
// `scores` is [T, E] scratch. Writes expert_of_pair / weight_of_pair [T·k] in (token, slot) order.
extern "C" __global__ void route_topk(const float* logits, float* scores, u32 tokens, u32 experts, u32 k,
                                      u32 sigmoid, u32 n_group, u32 topk_group, u32 renormalize, float scaling,
                                      u32* expert_of_pair, float* weight_of_pair) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (u64)t * experts;
    float* s = scores + (u64)t * experts;
    const float NEG_INF = -__int_as_float(0x7f800000);
    if (sigmoid) {
        for (u32 e = 0; e < experts; ++e) s[e] = 1.0f / (1.0f + expf(-l[e]));
    } else {
        float m = NEG_INF;
        for (u32 e = 0; e < experts; ++e) m = fmaxf(m, l[e]);
        float sum = 0.0f;
        for (u32 e = 0; e < experts; ++e) {
            s[e] = expf(l[e] - m);
            sum += s[e];
        }
        for (u32 e = 0; e < experts; ++e) s[e] /= sum;
    }
    if (n_group > 1 && topk_group < n_group) {
        const u32 size = experts / n_group;
        // Kept groups as a bit set (n_group ≤ 64, host-checked); the best unkept group each time.
        unsigned long long kept = 0ull;
        for (u32 r = 0; r < topk_group; ++r) {
            float best = NEG_INF;
            u32 best_g = 0;
            bool any = false;
            for (u32 g = 0; g < n_group; ++g) {
                if (kept >> g & 1ull) continue;
                float gb = NEG_INF;
                for (u32 e = g * size; e < (g + 1) * size; ++e) gb = fmaxf(gb, s[e]);
                if (!any || gb > best) {
                    best = gb;
                    best_g = g;
                    any = true;
                }
            }
            kept |= 1ull << best_g;
        }
        for (u32 e = 0; e < experts; ++e)
            if (!(kept >> (e / size) & 1ull)) s[e] = 0.0f;
    }
    u32* eo = expert_of_pair + (u64)t * k;
    float* wo = weight_of_pair + (u64)t * k;
    float sum = 0.0f;
    for (u32 slot = 0; slot < k; ++slot) {
        float best = NEG_INF;
        u32 best_e = 0;
        bool any = false;
        for (u32 e = 0; e < experts; ++e) {
            if (s[e] == NEG_INF) continue;  // taken
            if (!any || s[e] > best) {
                best = s[e];
                best_e = e;
                any = true;
            }
        }
        s[best_e] = NEG_INF;
        eo[slot] = best_e;
        wo[slot] = best;
        sum += best;
    }
    for (u32 slot = 0; slot < k; ++slot) {
        float w = wo[slot];
        if (renormalize && sum > 0.0f) w /= sum;
        wo[slot] = w * scaling;
    }
}

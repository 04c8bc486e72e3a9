// Conductance programming, drift and read noise of PCM-family devices on the GPU.
// Prepended: philox.cuh. Compiled with --fmad=false so every formula rounds as the Rust one.
// Each function names the Rust function it mirrors; the equations live in src/device/pcm.rs (the PCM
// device model) and src/device/converter.rs.

// Mirrors the fields of device::PcmLike that the kernels need (host: backend::cuda::program).
struct PcmParams {
    float g_max_us;
    float prog_coeffs[4];
    u32 n_prog_coeffs;
    float prog_coeff_g_max_reference_us;
    u32 drift_model;  // 0 AIHWKIT, 1 HERMES, 2 constant (nu_const_mean, nu_const_std)
    float nu_const_mean;
    float nu_const_std;
    u32 read_model;  // 0 AIHWKIT, 1 HERMES, 2 state-independent
    float prog_noise_scale;
    float read_noise_scale;
    float drift_scale;
};

// AIHWKIT _ZERO_CLIP (pcm.rs ZERO_CLIP).
#define PCM_ZERO_CLIP 1e-7f

__device__ __forceinline__ float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// Mirrors PcmLike::sigma_prog_us.
__device__ float sigma_prog_us(const PcmParams& p, float g_target_us) {
    float x = g_target_us / p.g_max_us;
    float power = 1.0f;
    float sigma = p.prog_coeffs[0];
    for (u32 i = 1; i < p.n_prog_coeffs; ++i) {
        power *= x;
        sigma += power * p.prog_coeffs[i];
    }
    return sigma * (p.g_max_us / p.prog_coeff_g_max_reference_us);
}

// Mirrors PcmLike::nu_moments.
__device__ float2 nu_moments(const PcmParams& p, float g_target_us) {
    float g_r = fmaxf(fabsf(g_target_us / p.g_max_us), PCM_ZERO_CLIP);
    if (p.drift_model == 0) {
        float ln = logf(g_r);
        return make_float2(clampf(-0.0155f * ln + 0.0244f, 0.049f, 0.1f),
                           clampf(-0.0125f * ln - 0.0059f, 0.008f, 0.045f));
    }
    if (p.drift_model == 1) {
        float ln = logf(g_r);
        float mean = g_r < 0.0945f ? clampf(-0.0387f * ln - 0.0182f, 0.072f, 0.13f)
                                   : -0.0436f * g_r * g_r - 0.0126f * g_r + 0.0736f;
        float std = g_r < 0.3055f ? clampf(-0.0117f * ln - 0.0057f, 0.0091f, 0.04f)
                                  : -0.0118f * g_r * g_r + 0.0093f * g_r + 0.0073f;
        return make_float2(mean, std);
    }
    return make_float2(p.nu_const_mean, p.nu_const_std);
}

// Mirrors PcmLike::q_s.
__device__ float q_s(const PcmParams& p, float g_prog_us) {
    float g_r = fabsf(g_prog_us) / p.g_max_us;
    if (p.read_model == 0) return fminf(0.0088f / fmaxf(powf(g_r, 0.65f), 1e-3f), 0.2f);
    if (p.read_model == 1) {
        if (g_r < 0.16f) return clampf(-0.0117f * logf(g_r) - 0.0069f, 0.015f, 0.04f);
        return 0.0069f * g_r * g_r * g_r - 0.0280f * g_r * g_r + 0.0211f * g_r + 0.0123f;
    }
    return 1.0f / p.g_max_us;
}

// Mirrors <PcmLike as Device>::program.
__device__ float pcm_program(const PcmParams& p, float g_target_us, float xi) {
    return fmaxf(g_target_us + p.prog_noise_scale * sigma_prog_us(p, g_target_us) * xi, 0.0f);
}

// Mirrors <PcmLike as Device>::drift_exponent.
__device__ float pcm_drift_exponent(const PcmParams& p, float g_target_us, float xi) {
    float2 m = nu_moments(p, g_target_us);
    return fabsf(m.x + m.y * xi) * p.drift_scale;
}

// Mirrors <PcmLike as Device>::read; `ratio` = drift_time_ratio(t), `time_factor` =
// read_noise_time_factor(t), both computed in f64 on the host exactly as the Rust code does.
__device__ float pcm_read(const PcmParams& p, float g_prog_us, float nu, float ratio, float time_factor, float xi) {
    float g_drift = ratio > 1.0f ? g_prog_us * powf(ratio, -nu) : g_prog_us;
    float sigma = q_s(p, g_prog_us) * time_factor;
    return fmaxf(g_drift + fabsf(g_drift) * p.read_noise_scale * sigma * xi, 0.0f);
}

// Mirrors tile::operand::to_binary16: the nearest binary16 value (ties to even; overflow to
// ±inf, subnormals kept), back in f32. The effective weights W̃ after drift and read noise
// are rounded once with it, as tile::Crossbar::drift_to rounds them.
__device__ __forceinline__ float to_binary16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// Mirrors WeightConverter::to_conductances (differential pair).
__device__ __forceinline__ float2 pair_conductances(float w, float s, float g_max_us) {
    float sw = s * w;
    return make_float2(clampf(sw, 0.0f, g_max_us), clampf(-sw, 0.0f, g_max_us));
}

// Mirrors the per-element body of tile::Crossbar::program for element `local` (row-major
// index inside its crossbar) of tensor `tensor_id`: target weight (normalised) → programmed net
// weight, with the drift exponents of the two devices in *nu0, *nu1.
__device__ __forceinline__ float program_element(const PcmParams& p, float w_target, float g_scale_target, u64 seed,
                                                 u32 tensor_id, u64 local, float* nu0, float* nu1) {
    const float2 xp = stream_normal_pair(make_stream(seed, PURPOSE_PROGRAM_NOISE, tensor_id), 2 * local, 0, 0);
    const float2 xd = stream_normal_pair(make_stream(seed, PURPOSE_DRIFT_EXPONENT, tensor_id), 2 * local, 0, 0);
    const float2 gt = pair_conductances(w_target, g_scale_target, p.g_max_us);
    const float gp0 = pcm_program(p, gt.x, xp.x);
    const float gp1 = pcm_program(p, gt.y, xp.y);
    *nu0 = pcm_drift_exponent(p, gt.x, xd.x);
    *nu1 = pcm_drift_exponent(p, gt.y, xd.y);
    return (gp0 - gp1) / g_scale_target;
}

// Mirrors the per-element loop of tile::Crossbar::program: w_target (normalised, [n]) →
// programmed net weight w_prog and drift exponents nu[2·i + d].
extern "C" __global__ void program_weights(const float* w_target, float* w_prog, float* nu, u64 n,
                                           u64 seed, u32 tensor_id, float g_scale_target, PcmParams p) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    w_prog[i] = program_element(p, w_target[i], g_scale_target, seed, tensor_id, i, nu + 2 * i, nu + 2 * i + 1);
}

// Mirrors the per-element loop of tile::Crossbar::drift_to: re-convert w_prog with the scale
// g_scale_us, drift + read noise, back to normalised weights rounded to binary16.
extern "C" __global__ void drift_weights(const float* w_prog, const float* nu, float* w, u64 n, u64 seed,
                                         u32 tensor_id, float g_scale_us, float ratio, float time_factor,
                                         PcmParams p) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    PhiloxStream read = make_stream(seed, PURPOSE_READ_NOISE, tensor_id);
    float2 xi = stream_normal_pair(read, 2 * i, 0, 0);
    float2 gp = pair_conductances(w_prog[i], g_scale_us, p.g_max_us);
    float g0 = pcm_read(p, gp.x, nu[2 * i], ratio, time_factor, xi.x);
    float g1 = pcm_read(p, gp.y, nu[2 * i + 1], ratio, time_factor, xi.y);
    w[i] = to_binary16((g0 - g1) / g_scale_us);
}

// max |x| as IEEE bits (non-negative floats order as unsigned integers); *out_bits starts at 0.
extern "C" __global__ void abs_max(const float* x, u64 n, u32* out_bits) {
    u32 m = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        m = max(m, __float_as_uint(fabsf(x[i])));
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) atomicMax(out_bits, m);
}

// Element (e, c, kb, j) of a grouped matrix [E, N, K] with crossbar blocks of k_block rows along
// K (backend::cuda::moe::GroupedMatrix): expert e, column c, K block kb, row j inside the block.
struct GroupedIndex {
    u32 e, c, kb, j, n_kb;
};
// The element of this thread in a launch of backend::cuda::row_launch(E·N, K, per): ⌈K /
// (blockDim·per)⌉ blocks per row e·N + c, `per` consecutive elements per thread, the first at
// flat index *i; false past the row's end. 32-bit divisions only (a flat 64-bit index costs two
// 64-bit divisions per element).
__device__ __forceinline__ bool grouped_element(u32 n, u32 k, u32 k_block, u32 per, GroupedIndex& g, u64& i) {
    const u32 span = blockDim.x * per, chunks = (k + span - 1) / span;
    const u32 row = blockIdx.x / chunks;
    const u32 kk = (blockIdx.x - row * chunks) * span + threadIdx.x * per;
    if (kk >= k) return false;
    g.e = row / n;
    g.c = row - g.e * n;
    g.kb = kk / k_block;
    g.j = kk - g.kb * k_block;
    g.n_kb = k / k_block;
    i = (u64)row * k + kk;
    return true;
}

// drift_weights over the experts of a grouped matrix (backend::cuda::moe::GroupedMatrix,
// [E, N, K]): element (e, c, k) is input j = k − kb·k_block of local row col_local[c] of the
// crossbar col_tensor_id[(e·n_kb + kb)·n + c] (k_block inputs), whose conductance scale is
// col_g_scale[same index]; its read-noise counter is 2·(col_local[c]·k_block + j), as
// tile::Crossbar::drift_to draws it, rounded to binary16 as there. nu holds the two devices'
// exponents as [2, E·N·K].
extern "C" __global__ void drift_grouped(const float* w_prog, const float* nu, float* w, u64 len, u32 n, u32 k,
                                         u32 k_block, const u32* col_tensor_id, const u32* col_local,
                                         const float* col_g_scale, u64 seed, float ratio, float time_factor,
                                         PcmParams p) {
    GroupedIndex g;
    u64 i;
    if (!grouped_element(n, k, k_block, 1, g, i)) return;
    const u32 c = g.c, j = g.j;
    const u64 tab = ((u64)g.e * g.n_kb + g.kb) * n + c;
    const float g_scale_us = col_g_scale[tab];
    PhiloxStream read = make_stream(seed, PURPOSE_READ_NOISE, col_tensor_id[tab]);
    const u64 local = (u64)col_local[c] * k_block + j;
    float2 xi = stream_normal_pair(read, 2 * local, 0, 0);
    float2 gp = pair_conductances(w_prog[i], g_scale_us, p.g_max_us);
    float g0 = pcm_read(p, gp.x, nu[i], ratio, time_factor, xi.x);
    float g1 = pcm_read(p, gp.y, nu[len + i], ratio, time_factor, xi.y);
    w[i] = to_binary16((g0 - g1) / g_scale_us);
}

// [G, N, row] gate and up → [G, 2N, row], rows interleaved in groups of 8 (gate group g, then up
// group g). Mirrors backend::cuda::moe::interleave_rows and its swiglu_source.
extern "C" __global__ void interleave_swiglu_rows(const float* gate, const float* up, float* out, u64 len, u32 n,
                                                  u32 row) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const u64 r = i / row, j = i % row, g = r / (2 * n);
    const u32 f = (u32)(r % (2 * n)), g8 = f / 8, c = (g8 / 2) * 8 + f % 8;
    out[i] = ((g8 & 1) ? up : gate)[(g * n + c) * row + j];
}

// out[g·n + c] = Σ_j |a[(g / blocks)·s_e + (g % blocks)·s_kb + j·sj + c·sc]| for j < rows, in
// f64 as tile::crossbar's mean_abs_f64 accumulates the GDC readouts (crossbar block g =
// e·blocks + kb: the readout rows [E·KB·k_block, N], or W̃ [E, N, K] in place). One thread per
// (g, c).
extern "C" __global__ void abs_column_sums(const float* a, double* out, u32 groups, u32 rows, u32 n, u32 blocks,
                                           u64 s_e, u64 s_kb, u64 sj, u64 sc) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)groups * n) return;
    const u32 g = (u32)(i / n), c = (u32)(i % n);
    const float* base = a + (u64)(g / blocks) * s_e + (u64)(g % blocks) * s_kb + c * sc;
    double s = 0.0;
    for (u32 j = 0; j < rows; ++j) s += (double)fabsf(base[(u64)j * sj]);
    out[i] = s;
}

// The GDC means from abs_column_sums' f64 sums (groups × n), rounded once to f32 as
// tile::Crossbar's mean_abs_f64: per column, sum / rows (per_column), or one value per crossbar,
// Σ of its columns' sums in column order / (rows · its columns). One thread per (group, crossbar
// column block x < n_xbar), writing the means of that crossbar's columns.
extern "C" __global__ void gdc_column_means(const double* sums, float* means, u32 groups, u32 n, u32 rows,
                                            u32 per_column, const u32* col_xbar, const u32* col_block_cols,
                                            u32 n_xbar) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)groups * n_xbar) return;
    const u32 g = (u32)(i / n_xbar), x = (u32)(i % n_xbar);
    const double* s = sums + (u64)g * n;
    float* m = means + (u64)g * n;
    double total = 0.0;
    if (!per_column)
        for (u32 c = 0; c < n; ++c)
            if (col_xbar[c] == x) total += s[c];
    for (u32 c = 0; c < n; ++c) {
        if (col_xbar[c] != x) continue;
        m[c] = per_column ? (float)(s[c] / (double)rows) : (float)(total / ((double)rows * (double)col_block_cols[c]));
    }
}

// The digital scales after a GDC readout: s_map · α with α = reference / max(readout, min), as
// tile::Crossbar's drift compensation computes α.
extern "C" __global__ void gdc_scales(const float* means, const float* reference, const float* s_map, float* out,
                                      u64 len, float min_readout) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) out[i] = s_map[i] * (reference[i] / fmaxf(means[i], min_readout));
}

// Crossbar slot of grouped element (e, kb, column c): (e·n_kb + kb)·n_xbar + col_xbar[c], one
// per crossbar (backend::cuda::moe::GroupedMatrix numbers its column blocks by col_xbar).
__device__ __forceinline__ u64 crossbar_slot(const GroupedIndex& g, const u32* col_xbar, u32 n_xbar) {
    return ((u64)g.e * g.n_kb + g.kb) * n_xbar + col_xbar[g.c];
}

// max |x / s| per crossbar of a grouped matrix [E, N, K] as IEEE bits (non-negative floats order
// as unsigned integers; out_bits starts at 0), s = col_div[(e·n_kb + kb)·n + c] or 1 when
// col_div is null: max_abs of tile::Crossbar::program's w_target (x = W, s = s_map) or of its
// programmed weights (x = W̃_prog). Each thread reduces 8 elements, then the lanes of a warp
// that hit one crossbar (all of them but at row ends) reduce and one of them does the atomic:
// an atomic per element put up to 2^20 of them on each of a few addresses.
extern "C" __global__ void crossbar_abs_max(const float* x, const float* col_div, u32 n, u32 k, u32 k_block,
                                            const u32* col_xbar, u32 n_xbar, u32* out_bits) {
    // 8 consecutive elements per thread: one row segment of one crossbar (k_block % 8 == 0,
    // host-checked). max |x/d| = (max |x|)/d for d > 0, as division rounds monotonically.
    GroupedIndex g;
    u64 i;
    if (!grouped_element(n, k, k_block, 8, g, i)) return;
    const float4 a = *(const float4*)(x + i), b = *(const float4*)(x + i + 4);
    float v = fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                    fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w))));
    if (col_div) v = v / col_div[((u64)g.e * g.n_kb + g.kb) * n + g.c];
    const u64 slot = crossbar_slot(g, col_xbar, n_xbar);
    const u32 peers = __match_any_sync(__activemask(), slot);
    const u32 m = __reduce_max_sync(peers, __float_as_uint(v));
    if ((threadIdx.x & 31u) == (u32)(__ffs(peers) - 1)) atomicMax(out_bits + slot, m);
}

// Per (e, kb, c): WeightConverter::scale of the column's crossbar max (differential pair:
// g_max / max(|W|max, ZERO_CLIP)). len = E·n_kb·n.
extern "C" __global__ void crossbar_scales(const u32* max_bits, u64 len, u32 n, const u32* col_xbar, u32 n_xbar,
                                           float g_max_us, float* scale) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const u64 group = i / n;
    const u32 c = i % n;
    scale[i] = g_max_us / fmaxf(__uint_as_float(max_bits[group * n_xbar + col_xbar[c]]), 1e-7f);
}

// tile::Crossbar::program over the experts of a grouped matrix [E, N, K]: element (e, c, k) is
// input j of local row col_local[c] of crossbar col_tensor_id[tab] (tab = (e·n_kb + kb)·n + c),
// target w / s_map[tab] under the conductance scale g_target[tab]; programming and drift
// exponent counters 2·(col_local[c]·k_block + j), as drift_grouped reads them. nu is [2, len].
extern "C" __global__ void program_grouped(const float* w, const float* s_map, const float* g_target, float* w_prog,
                                           float* nu, u64 len, u32 n, u32 k, u32 k_block, const u32* col_tensor_id,
                                           const u32* col_local, u64 seed, PcmParams p) {
    GroupedIndex g;
    u64 i;
    if (!grouped_element(n, k, k_block, 1, g, i)) return;
    const u64 tab = ((u64)g.e * g.n_kb + g.kb) * n + g.c;
    const u64 local = (u64)col_local[g.c] * k_block + g.j;
    w_prog[i] = program_element(p, w[i] / s_map[tab], g_target[tab], seed, col_tensor_id[tab], local, nu + i,
                                nu + len + i);
}

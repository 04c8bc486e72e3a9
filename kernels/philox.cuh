// Philox4x32-10 counter-based streams and Box–Muller normals.
// Mirrors src/rng.rs bit for bit (key/counter layout, 24-bit uniform grid, Box–Muller lanes,
// ln_f32 and sincos_turns); see that module's doc for the layout. Sources are concatenated by the
// host (no #include), so this file must stay free of includes.
//
// Normals are bit-identical to the CPU in every kernel file: the float steps of ln_f32,
// sincos_turns and box_muller use the round-to-nearest intrinsics __fadd_rn, __fsub_rn,
// __fmul_rn, __fdiv_rn, __fsqrt_rn, which the compiler never contracts into FMAs, whatever
// --fmad says, and which round exactly as Rust's f32 +, −, ×, ÷, sqrt (Rust never contracts).
// Keep the operation order of the Rust expressions when editing. The device physics of
// program.cu needs --fmad=false in addition (the host sets it for rng.cu and program.cu).

typedef unsigned int u32;
typedef unsigned long long u64;

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define INV_2_POW_24 5.9604644775390625e-08f
// std::f32::consts::TAU and LN_2 rounded to f32 (exact hex literals).
#define TAU_F32 0x1.921fb6p+2f
#define LN_2_F32 0x1.62e430p-1f

// Purpose numbers of src/rng.rs `Purpose` (frozen).
#define PURPOSE_PROGRAM_NOISE 1u
#define PURPOSE_DRIFT_EXPONENT 2u
#define PURPOSE_READ_NOISE 3u
// Output noise and short-term weight noise, drawn as one normal with the summed variance.
#define PURPOSE_OUTPUT_NOISE 4u
// Reserved on the CPU (weight noise drawn separately); no kernel draws from it.
#define PURPOSE_SHORT_TERM_WEIGHT_NOISE 5u
#define PURPOSE_TEST_DATA 6u
#define PURPOSE_TENSOR_ID 7u

// Mirrors rng::philox4x32_10.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        u32 lo0 = PHILOX_M0 * ctr.x;
        u32 hi0 = __umulhi(PHILOX_M0, ctr.x);
        u32 lo1 = PHILOX_M1 * ctr.z;
        u32 hi1 = __umulhi(PHILOX_M1, ctr.z);
        ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
    }
    return ctr;
}

// Mirrors rng::Stream (seed split into key words, purpose, tensor id).
struct PhiloxStream {
    u32 k0, k1, purpose, tensor_id;
};

__device__ __forceinline__ PhiloxStream make_stream(u64 seed, u32 purpose, u32 tensor_id) {
    PhiloxStream s;
    s.k0 = (u32)seed;
    s.k1 = (u32)(seed >> 32);
    s.purpose = purpose;
    s.tensor_id = tensor_id;
    return s;
}

// Mirrors rng::Stream::block.
__device__ __forceinline__ uint4 stream_block(PhiloxStream s, u64 call, u32 mvm_id, u32 attempt) {
    u32 w3 = (s.purpose << 24) | ((attempt & 0xFFu) << 16) | ((u32)(call >> 32) & 0xFFFFu);
    return philox4x32_10(make_uint4((u32)call, s.tensor_id, mvm_id, w3), s.k0, s.k1);
}

// Mirrors rng::ln_f32: ln u for a positive normal f32 from the exact split u = 2^e·m,
// m in [√½, √2), and ln m = 2·atanh(s), s = (m − 1)/(m + 1), odd series through s^9.
__device__ __forceinline__ float ln_f32(float u) {
    u32 bits = __float_as_uint(u);
    u32 high = (bits & 0x007FFFFFu) > 0x003504F3u ? 1u : 0u;
    int e = (int)((bits >> 23) & 0xFFu) - 127 + (int)high;
    float m = __uint_as_float(((bits & 0x007FFFFFu) | 0x3F800000u) - (high << 23));
    float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    float s2 = __fmul_rn(s, s);
    // 1 + s2·(1/3 + s2·(1/5 + s2·(1/7 + s2·(1/9)))), constants = Rust's f32 quotients.
    float series = __fmul_rn(s2, 0x1.c71c72p-4f);                    // 1/9
    series = __fmul_rn(s2, __fadd_rn(0x1.24924ap-3f, series));       // 1/7
    series = __fmul_rn(s2, __fadd_rn(0x1.99999ap-3f, series));       // 1/5
    series = __fadd_rn(1.0f, __fmul_rn(s2, __fadd_rn(0x1.555556p-2f, series)));  // 1/3
    return __fadd_rn(__fmul_rn((float)e, LN_2_F32), __fmul_rn(__fmul_rn(2.0f, s), series));
}

// Mirrors rng::sincos_turns: (sin θ, cos θ) for θ = 2π·m·2^-24, m a 24-bit integer. The nearest
// quarter turn is split off in integers; Taylor series of sin (x^9) and cos (x^10) on the residual.
__device__ __forceinline__ float2 sincos_turns(u32 m) {
    u32 quarter = (m + (1u << 21)) >> 22;  // 0..=4
    int residual = (int)m - (int)(quarter << 22);
    float x = __fmul_rn(__fmul_rn((float)residual, INV_2_POW_24), TAU_F32);
    float x2 = __fmul_rn(x, x);
    // x·(1 + x2·(−1/6 + x2·(1/120 + x2·(−1/5040 + x2·(1/362880)))))
    float ps = __fmul_rn(x2, 0x1.71de3ap-19f);                         // 1/362880
    ps = __fmul_rn(x2, __fadd_rn(-0x1.a01a02p-13f, ps));               // −1/5040
    ps = __fmul_rn(x2, __fadd_rn(0x1.111112p-7f, ps));                 // 1/120
    ps = __fmul_rn(x2, __fadd_rn(-0x1.555556p-3f, ps));                // −1/6
    float sn = __fmul_rn(x, __fadd_rn(1.0f, ps));
    // 1 + x2·(−1/2 + x2·(1/24 + x2·(−1/720 + x2·(1/40320 + x2·(−1/3628800)))))
    float pc = __fmul_rn(x2, -0x1.27e4fcp-22f);                        // −1/3628800
    pc = __fmul_rn(x2, __fadd_rn(0x1.a01a02p-16f, pc));                // 1/40320
    pc = __fmul_rn(x2, __fadd_rn(-0x1.6c16c2p-10f, pc));               // −1/720
    pc = __fmul_rn(x2, __fadd_rn(0x1.555556p-5f, pc));                 // 1/24
    float cs = __fadd_rn(1.0f, __fmul_rn(x2, __fadd_rn(-0.5f, pc)));
    // Quadrant k: (sin θ, cos θ) = (sn, cs), (cs, −sn), (−sn, −cs), (−cs, sn).
    u32 k = quarter & 3u;
    bool odd = (k & 1u) != 0u;
    float first = odd ? cs : sn, second = odd ? sn : cs;
    u32 flip_first = (k >> 1) << 31;
    u32 flip_second = ((k ^ (k >> 1)) & 1u) << 31;
    return make_float2(__uint_as_float(__float_as_uint(first) ^ flip_first),
                       __uint_as_float(__float_as_uint(second) ^ flip_second));
}

// Mirrors rng::box_muller: (ρ·cos θ, ρ·sin θ), ρ = sqrt(−2·ln_f32(u)).
__device__ __forceinline__ float2 box_muller(u32 a, u32 b) {
    float u = __fmul_rn((float)((a >> 8) + 1u), INV_2_POW_24);  // exact
    float rho = __fsqrt_rn(__fmul_rn(-2.0f, ln_f32(u)));
    float2 sc = sincos_turns(b >> 8);
    return make_float2(__fmul_rn(rho, sc.y), __fmul_rn(rho, sc.x));
}

// Mirrors rng::Stream::normal_attempt.
__device__ __forceinline__ float stream_normal(PhiloxStream s, u64 index, u32 mvm_id, u32 attempt) {
    uint4 r = stream_block(s, index / 4, mvm_id, attempt);
    u32 lane = (u32)(index % 4);
    float2 z = (lane < 2) ? box_muller(r.x, r.y) : box_muller(r.z, r.w);
    return (lane & 1u) ? z.y : z.x;
}

// Normals `index` and `index + 1` for an even `index`: one Philox call, one Box–Muller pair
// (lanes 0/1 or 2/3), identical to two stream_normal calls.
__device__ __forceinline__ float2 stream_normal_pair(PhiloxStream s, u64 index, u32 mvm_id, u32 attempt) {
    uint4 r = stream_block(s, index / 4, mvm_id, attempt);
    return ((index % 4) < 2) ? box_muller(r.x, r.y) : box_muller(r.z, r.w);
}

// Mirrors rng::Stream::uniform.
__device__ __forceinline__ float stream_uniform(PhiloxStream s, u64 index, u32 mvm_id) {
    uint4 r = stream_block(s, index / 4, mvm_id, 0);
    u32 lane = (u32)(index % 4);
    u32 w = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
    return (float)(w >> 8) * INV_2_POW_24;
}

// Philox4x32-10 counter-based streams and Box–Muller normals.
// Mirrors src/rng.rs bit for bit (key/counter layout, 24-bit uniform grid, Box–Muller lanes);
// see that module's doc for the layout. Sources are concatenated by the host (no #include), so
// this file must stay free of includes. Compile with --fmad=false where parity with the CPU
// matters (the host does for rng.cu and program.cu).

typedef unsigned int u32;
typedef unsigned long long u64;

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define INV_2_POW_24 5.9604644775390625e-08f
// std::f32::consts::TAU rounded to f32.
#define TAU_F32 6.28318548202514648f

// Purpose numbers of src/rng.rs `Purpose` (frozen).
#define PURPOSE_PROGRAM_NOISE 1u
#define PURPOSE_DRIFT_EXPONENT 2u
#define PURPOSE_READ_NOISE 3u
#define PURPOSE_OUTPUT_NOISE 4u
#define PURPOSE_SHORT_TERM_WEIGHT_NOISE 5u
#define PURPOSE_TEST_DATA 6u

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

// Mirrors rng::box_muller.
__device__ __forceinline__ float2 box_muller(u32 a, u32 b) {
    float u = (float)((a >> 8) + 1u) * INV_2_POW_24;
    float v = (float)(b >> 8) * INV_2_POW_24;
    float r = sqrtf(-2.0f * logf(u));
    float theta = TAU_F32 * v;
    return make_float2(r * cosf(theta), r * sinf(theta));
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

// Philox4x32-10 counter-based streams and the table normal transform.
// Mirrors src/rng.rs bit for bit (key/counter layout, 24-bit uniform grid, one normal per word)
// and src/rng/normal.rs (normal_from_word); see those modules' docs for the layout. Sources are
// concatenated by the host (no #include), so this file must stay free of includes. The host
// puts rng::normal::NormalTable::cuda_source in front of it: NORMAL_SEGMENT_BITS,
// NORMAL_FRAC_BITS and the (a, b) table NORMAL_TABLE in exact hexadecimal literals.
//
// Normals are bit-identical to the CPU in every kernel file, whatever --fmad says: integer
// operations, an exact integer → float conversion, an exact power-of-two scaling and one
// __fmaf_rn, which rounds as Rust's f32::mul_add.

typedef unsigned int u32;
typedef unsigned long long u64;

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define INV_2_POW_24 5.9604644775390625e-08f

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

// One Philox4x32 round with round key (k0, k1).
__device__ __forceinline__ uint4 philox_round(uint4 ctr, u32 k0, u32 k1) {
    u32 lo0 = PHILOX_M0 * ctr.x;
    u32 hi0 = __umulhi(PHILOX_M0, ctr.x);
    u32 lo1 = PHILOX_M1 * ctr.z;
    u32 hi1 = __umulhi(PHILOX_M1, ctr.z);
    return make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
}

// Mirrors rng::philox4x32_10.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        ctr = philox_round(ctr, k0, k1);
    }
    return ctr;
}

// philox4x32_10 with its key schedule precomputed (rng::philox_round_keys: round r's key at
// rk[2r], rk[2r + 1]). With rk in the kernel's parameters, the key words are constant-bank
// operands of the XORs: the schedule costs no instruction per call.
__device__ __forceinline__ uint4 philox4x32_10_keyed(uint4 ctr, const u32* rk) {
#pragma unroll
    for (int round = 0; round < 10; ++round) ctr = philox_round(ctr, rk[2 * round], rk[2 * round + 1]);
    return ctr;
}

// Two philox4x32_10_keyed blocks in lockstep, round by round: two independent dependency
// chains that the scheduler issues interleaved (written one after the other, ptxas ran most of
// the first before starting the second).
__device__ __forceinline__ void philox4x32_10_keyed_x2(uint4& a, uint4& b, const u32* rk) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        a = philox_round(a, rk[2 * round], rk[2 * round + 1]);
        b = philox_round(b, rk[2 * round], rk[2 * round + 1]);
    }
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

// The counter of call `call` of a stream of `purpose` and `tensor_id` (rng::Stream::block's
// layout).
__device__ __forceinline__ uint4 stream_counter(u32 purpose, u32 tensor_id, u64 call, u32 mvm_id, u32 attempt) {
    u32 w3 = (purpose << 24) | ((attempt & 0xFFu) << 16) | ((u32)(call >> 32) & 0xFFFFu);
    return make_uint4((u32)call, tensor_id, mvm_id, w3);
}

// Mirrors rng::Stream::block.
__device__ __forceinline__ uint4 stream_block(PhiloxStream s, u64 call, u32 mvm_id, u32 attempt) {
    return philox4x32_10(stream_counter(s.purpose, s.tensor_id, call, mvm_id, attempt), s.k0, s.k1);
}

// stream_block for a stream of `purpose` and `tensor_id` keyed by the round keys rk of its seed.
__device__ __forceinline__ uint4 stream_block_keyed(const u32* rk, u32 purpose, u32 tensor_id, u64 call, u32 mvm_id,
                                                    u32 attempt) {
    return philox4x32_10_keyed(stream_counter(purpose, tensor_id, call, mvm_id, attempt), rk);
}

// Mirrors rng::normal::NormalTable::normal with the (a, b) table at `table` (NORMAL_TABLE, or
// a copy in shared memory): sign = bit 31, m = the low 31 bits (m = 0 read as m = 1: the same
// octave 30, segment 0 and frac 0), sh = leading zeros of m = octave + 1, t = m << sh (leading
// one at bit 31), so t >> (31 − SEGMENT_BITS) is 2^SEGMENT_BITS + segment and the entry index
// (sh << SEGMENT_BITS) + (t >> (31 − SEGMENT_BITS)) − 2·2^SEGMENT_BITS: no clamp, no mask, and
// the constant folds into the load's offset. The next NORMAL_FRAC_BITS bits give frac;
// |z| = fma(frac, b, a).
// The leading zeros of m ≥ 1 in one instruction: bfind.shiftamt is FLO.SH, where __clz
// becomes FLO and a subtraction from 31. (The host harness of tests/philox_host.rs compiles
// this file without __CUDA_ARCH__.)
__device__ __forceinline__ u32 leading_zeros_nonzero(u32 m) {
#ifdef __CUDA_ARCH__
    u32 sh;
    asm("bfind.shiftamt.u32 %0, %1;" : "=r"(sh) : "r"(m));
    return sh;
#else
    return (u32)__clz(m);
#endif
}

__device__ __forceinline__ float normal_from_word_in(const float2* table, u32 w) {
    const u32 m = max(w & 0x7FFFFFFFu, 1u);
    const u32 sh = leading_zeros_nonzero(m);
    const u32 t = m << sh;
    // frac = the NORMAL_FRAC_BITS bits below the segment as a mantissa of [1, 2), minus 1: exact.
    const float frac = __uint_as_float(0x3F800000u | ((t << (NORMAL_SEGMENT_BITS + 1)) >> (32 - NORMAL_FRAC_BITS))) - 1.0f;
    const float2 ab = table[(sh << NORMAL_SEGMENT_BITS) + (t >> (31 - NORMAL_SEGMENT_BITS)) - (2u << NORMAL_SEGMENT_BITS)];
    const float z = __fmaf_rn(frac, ab.y, ab.x);
    return __uint_as_float(__float_as_uint(z) | (w & 0x80000000u));
}
__device__ __forceinline__ float normal_from_word(u32 w) { return normal_from_word_in(NORMAL_TABLE, w); }

// The normals of two words (a, b) of one Philox block.
__device__ __forceinline__ float2 normal_pair_in(const float2* table, u32 a, u32 b) {
    return make_float2(normal_from_word_in(table, a), normal_from_word_in(table, b));
}

// Mirrors rng::Stream::normal_attempt.
__device__ __forceinline__ float stream_normal_in(const float2* table, PhiloxStream s, u64 index, u32 mvm_id,
                                                  u32 attempt) {
    uint4 r = stream_block(s, index / 4, mvm_id, attempt);
    u32 lane = (u32)(index % 4);
    u32 w = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
    return normal_from_word_in(table, w);
}
__device__ __forceinline__ float stream_normal(PhiloxStream s, u64 index, u32 mvm_id, u32 attempt) {
    return stream_normal_in(NORMAL_TABLE, s, index, mvm_id, attempt);
}

// Normals `index` and `index + 1` for an even `index`: one Philox call (words 0/1 or 2/3),
// identical to two stream_normal calls.
__device__ __forceinline__ float2 stream_normal_pair_in(const float2* table, PhiloxStream s, u64 index, u32 mvm_id,
                                                        u32 attempt) {
    uint4 r = stream_block(s, index / 4, mvm_id, attempt);
    return ((index % 4) < 2) ? normal_pair_in(table, r.x, r.y) : normal_pair_in(table, r.z, r.w);
}
__device__ __forceinline__ float2 stream_normal_pair(PhiloxStream s, u64 index, u32 mvm_id, u32 attempt) {
    return stream_normal_pair_in(NORMAL_TABLE, s, index, mvm_id, attempt);
}

// Mirrors rng::Stream::uniform.
__device__ __forceinline__ float stream_uniform(PhiloxStream s, u64 index, u32 mvm_id) {
    uint4 r = stream_block(s, index / 4, mvm_id, 0);
    u32 lane = (u32)(index % 4);
    u32 w = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
    return (float)(w >> 8) * INV_2_POW_24;
}

//! `kernels/philox.cuh` against `src/rng.rs`, without a GPU: the device functions are compiled
//! as host C++ (the CUDA round-to-nearest intrinsics mapped to plain IEEE single-precision
//! operations, contraction off) and must reproduce the Rust stream bit for bit:
//! - `normal_from_word` with the generated table (`rng::NormalTable::cuda_source`) on 2²⁴ words
//!   spread over all octaves and every word below 2¹⁶ of both signs (compared by a hash of
//!   the result bits);
//! - Philox blocks, uniforms and normals of several streams, including counters above 2³²,
//!   other purposes, MVM ids and bound-management attempts.
//!
//! This checks the kernel source, not the GPU's arithmetic; `tests/gpu_backend/device.rs`
//! (`philox_uniforms_and_normals_bit_identical`) checks the device itself. Skips with a
//! printed reason when no C++ compiler is found (`$CXX`, else `c++`/`g++`/`clang++`).
mod common;

use std::path::PathBuf;
use std::process::Command;

use aimc::rng::{normal_from_word, NormalTable, Purpose, Stream};

const PHILOX_CUH: &str = include_str!("../kernels/philox.cuh");

/// Host definitions of what philox.cuh takes from CUDA. `__f*_rn` are exactly rounded IEEE
/// single operations, which plain `float` arithmetic is on x86-64/aarch64 with
/// `-ffp-contract=off` (no fused multiply-add, no excess precision).
const PRELUDE: &str = r#"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#define __device__
#define __forceinline__ inline
struct uint4 { unsigned int x, y, z, w; };
struct float2 { float x, y; };
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline int __clz(unsigned int x) { return x == 0 ? 32 : __builtin_clz(x); }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
"#;

/// `main`: `hash` prints the FNV-1a hash of normal_from_word over the words of [`hashed_words`];
/// `stream SEED PURPOSE TID START COUNT MVM ATTEMPT` writes, per index, the raw u32 bits of
/// lane index%4 of the Philox block, the uniform and the normal (little-endian) to stdout.
const MAIN: &str = r#"
static inline unsigned long long fnv(unsigned long long h, unsigned int v) {
    for (int i = 0; i < 4; ++i) { h ^= (v >> (8 * i)) & 0xFFu; h *= 0x100000001b3ULL; }
    return h;
}
int main(int argc, char** argv) {
    if (argc == 2 && !std::strcmp(argv[1], "hash")) {
        unsigned long long h = 0xcbf29ce484222325ULL;
        for (unsigned int i = 0; i < (1u << 24); ++i) h = fnv(h, __float_as_uint(normal_from_word(i * 257u)));
        for (unsigned int m = 0; m < (1u << 17); ++m) h = fnv(h, __float_as_uint(normal_from_word(m ^ ((m & 1u) << 31))));
        std::printf("%016llx\n", h);
        return 0;
    }
    if (argc != 9 || std::strcmp(argv[1], "stream")) return 2;
    unsigned long long seed = std::strtoull(argv[2], 0, 0), start = std::strtoull(argv[5], 0, 0);
    unsigned int purpose = std::strtoul(argv[3], 0, 0), tid = std::strtoul(argv[4], 0, 0);
    unsigned long long count = std::strtoull(argv[6], 0, 0);
    unsigned int mvm = std::strtoul(argv[7], 0, 0), attempt = std::strtoul(argv[8], 0, 0);
    PhiloxStream s = make_stream(seed, purpose, tid);
    // The GEMM epilogue's path: the key schedule precomputed (rng::philox_round_keys).
    unsigned int rk[20];
    for (unsigned int round = 0; round < 10; ++round) {
        rk[2 * round] = s.k0 + round * PHILOX_W0;
        rk[2 * round + 1] = s.k1 + round * PHILOX_W1;
    }
    for (unsigned long long i = start; i < start + count; ++i) {
        uint4 r = stream_block(s, i / 4, mvm, attempt);
        uint4 k = stream_block_keyed(rk, purpose, tid, i / 4, mvm, attempt);
        if (k.x != r.x || k.y != r.y || k.z != r.z || k.w != r.w) return 3;
        unsigned int lane = (unsigned int)(i % 4);
        unsigned int w[4] = {r.x, r.y, r.z, r.w};
        float u = stream_uniform(s, i, mvm), z = stream_normal(s, i, mvm, attempt);
        unsigned int out[3] = {w[lane], __float_as_uint(u), __float_as_uint(z)};
        std::fwrite(out, 4, 3, stdout);
    }
    return 0;
}
"#;

/// The harness binary, built once per test process.
fn harness() -> Option<PathBuf> {
    static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            common::build_host_cpp(
                "philox_host",
                &format!(
                    "{PRELUDE}\n{}\n#line 1 \"philox.cuh\"\n{PHILOX_CUH}\n{MAIN}",
                    NormalTable::get().cuda_source()
                ),
            )
        })
        .clone()
}

fn fnv(mut h: u64, v: u32) -> u64 {
    for b in v.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The words the `hash` mode transforms, in its order: i·257 for i < 2²⁴ (every octave), then
/// m < 2¹⁷ with the sign bit set on odd m (the deep octaves word by word).
fn hashed_words() -> impl Iterator<Item = u32> {
    (0..1u32 << 24)
        .map(|i| i.wrapping_mul(257))
        .chain((0..1u32 << 17).map(|m| m ^ ((m & 1) << 31)))
}

#[test]
fn normal_transform_matches_the_rust_one() {
    let Some(bin) = harness() else { return };
    let out = Command::new(&bin).arg("hash").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let h = hashed_words().fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        fnv(h, normal_from_word(w).to_bits())
    });
    assert_eq!(
        text.trim(),
        format!("{h:016x}"),
        "kernels/philox.cuh normal_from_word differs from src/rng/normal.rs"
    );
}

#[test]
fn blocks_uniforms_and_normals_match_the_rust_streams() {
    let Some(bin) = harness() else { return };
    // (seed, purpose, tensor id, first index, count, MVM id, attempt). The second case crosses
    // counter call 2^32 (index 2^34), where word 3 takes the high call bits; the last has call
    // bits 32..47 = 0x8000, so a narrower mask of those bits would show.
    let cases = [
        (0u64, Purpose::OutputNoise, 0u32, 0u64, 40_000u64, 0u32, 0u8),
        (
            0x1234_5678_9abc_def0,
            Purpose::OutputNoise,
            77,
            (1 << 34) - 20_000,
            40_000,
            5,
            3,
        ),
        (42, Purpose::ProgramNoise, 0xdead_beef, 123, 20_000, 0, 0),
        (
            u64::MAX,
            Purpose::ReadNoise,
            u32::MAX,
            1 << 49,
            20_000,
            u32::MAX,
            255,
        ),
    ];
    for (seed, purpose, tid, start, count, mvm, attempt) in cases {
        let out = Command::new(&bin)
            .arg("stream")
            .arg(seed.to_string())
            .arg((purpose as u32).to_string())
            .arg(tid.to_string())
            .arg(start.to_string())
            .arg(count.to_string())
            .arg(mvm.to_string())
            .arg(attempt.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "harness exit {:?}", out.status);
        let words: Vec<u32> = out
            .stdout
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(words.len() as u64, 3 * count);
        let s = Stream::new(seed, purpose, tid);
        for (i, w) in words.chunks_exact(3).enumerate() {
            let idx = start + i as u64;
            let what = format!("seed {seed:#x} {purpose:?} tensor {tid} index {idx}");
            assert_eq!(
                w[0],
                s.block(idx / 4, mvm, attempt)[(idx % 4) as usize],
                "block, {what}"
            );
            assert_eq!(w[1], s.uniform(idx, mvm).to_bits(), "uniform, {what}");
            assert_eq!(
                w[2],
                s.normal_attempt(idx, mvm, attempt).to_bits(),
                "normal, {what}"
            );
        }
    }
}

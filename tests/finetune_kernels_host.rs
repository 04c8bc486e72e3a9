//! `kernels/finetune.cu` compiled as host C++ (each launch a loop over its blocks and threads,
//! contraction off), without a GPU, against the Rust it mirrors:
//! - `ft_adam` gives `finetune::adam::Adam::step`'s weights bit for bit over several steps;
//! - `ft_effective_weights` and `ft_map_scales` index the `[E, K/k_block, N]` tables as
//!   `backend::cuda::grouped::GroupedMatrix` lays them out (the crossbar layouts' mapping scales
//!   of a matrix split into 2×2 crossbars);
//! - `ft_swiglu_backward` reads and writes gate and up interleaved in groups of 8;
//! - `ft_combine` sums a token's rows in expert (sorted-row) order from 0, as the CPU objective;
//! - `ft_dequantize` is α_nm·code·Δ per (row, crossbar block), through a row map.
//!
//! This checks the kernel source, not the GPU (`tests/gpu_finetune.rs` does). The warp-shuffle
//! kernels (`ft_segment_abs_max`, `ft_row_sums`) are not run here. Skips with a printed reason
//! when no C++ compiler is found.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aimc::backend::cuda::grouped::GroupedMatrix;
use aimc::finetune::adam::{Adam, BETA1, BETA2, EPS};
use aimc::model::common::SwiGlu;
use aimc::rng::{Purpose, Stream};
use aimc::tile::{AnalogMatrix, TilePreset};
use ndarray::Array2;

const FINETUNE_CU: &str = include_str!("../kernels/finetune.cu");

/// What the kernel file takes from CUDA and philox.cuh, on the host.
const PRELUDE: &str = r#"
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
#define FT_HOST 1
typedef unsigned int u32;
typedef unsigned long long u64;
struct Dim { unsigned int x; };
static Dim blockIdx, blockDim, threadIdx;
static inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class T> static T __shfl_xor_sync(unsigned, T, int) { std::abort(); }
static float ft_host_f16_to_f32(unsigned short h) {
    const unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
"#;

/// `main KERNEL ARGS...`: reads the kernel's input buffers from stdin (little-endian, in
/// argument order), runs it over `threads` threads in blocks of 256, writes its outputs.
const MAIN: &str = r#"
template <class F> static void launch(u64 threads, F f) {
    blockDim.x = 256;
    for (u64 b = 0; b < (threads + 255) / 256; ++b) {
        blockIdx.x = (unsigned)b;
        for (unsigned t = 0; t < 256; ++t) { threadIdx.x = t; f(); }
    }
}
template <class T> static std::vector<T> rd(u64 n) {
    std::vector<T> v(n);
    if (n && fread(v.data(), sizeof(T), n, stdin) != n) std::abort();
    return v;
}
template <class T> static void wr(const std::vector<T>& v) { fwrite(v.data(), sizeof(T), v.size(), stdout); }
static u64 U(const char* s) { return strtoull(s, nullptr, 10); }
static float F(const char* s) { return __uint_as_float((u32)strtoul(s, nullptr, 10)); }
int main(int argc, char** argv) {
    const char* k = argv[1];
    if (!strcmp(k, "adam")) {
        u64 n = U(argv[2]);
        float lr = F(argv[3]), c1 = F(argv[4]), c2 = F(argv[5]), b1 = F(argv[6]), b2 = F(argv[7]), o1 = F(argv[8]),
              o2 = F(argv[9]), eps = F(argv[10]);
        auto w = rd<float>(n), g = rd<float>(n), m = rd<float>(n), v = rd<float>(n);
        launch(n, [&] { ft_adam(w.data(), g.data(), m.data(), v.data(), n, lr, c1, c2, b1, b2, o1, o2, eps); });
        wr(w); wr(m); wr(v);
    } else if (!strcmp(k, "swiglu")) {
        u64 rows = U(argv[2]); u32 nh = (u32)U(argv[3]);
        auto gu = rd<float>(rows * 2 * nh), gh = rd<float>(rows * nh);
        std::vector<float> out(rows * 2 * nh);
        launch(rows * nh, [&] { ft_swiglu_backward(gu.data(), gh.data(), rows, nh, out.data()); });
        wr(out);
    } else if (!strcmp(k, "eff")) {
        u64 len = U(argv[2]); u32 n = (u32)U(argv[3]), kk = (u32)U(argv[4]), kb = (u32)U(argv[5]); u64 nt = U(argv[6]);
        auto w = rd<unsigned short>(len); auto cs = rd<float>(nt);
        std::vector<float> out(len);
        launch(len, [&] { ft_effective_weights(w.data(), cs.data(), len, n, kk, kb, out.data()); });
        wr(out);
    } else if (!strcmp(k, "mapsc")) {
        u64 len = U(argv[2]); u32 n = (u32)U(argv[3]); float omega = F(argv[4]);
        auto seg = rd<float>(len);
        std::vector<float> out(len);
        launch(len, [&] { ft_map_scales(seg.data(), nullptr, nullptr, n, 1, len, omega, out.data()); });
        wr(out);
    } else if (!strcmp(k, "combine")) {
        u32 t = (u32)U(argv[2]), kk = (u32)U(argv[3]), n = (u32)U(argv[4]); u64 p = U(argv[5]);
        auto rows = rd<float>(p * n); auto pos = rd<u32>((u64)t * kk); auto sw = rd<float>(p);
        std::vector<float> y((u64)t * n);
        launch((u64)t * n, [&] { ft_combine(rows.data(), pos.data(), sw.data(), t, kk, n, y.data()); });
        wr(y);
    } else if (!strcmp(k, "dequant")) {
        u64 rows = U(argv[2]); u32 kk = (u32)U(argv[3]), kb = (u32)U(argv[4]), dac = (u32)U(argv[5]);
        float step = F(argv[6]); u64 rx = U(argv[7]);
        auto codes = rd<unsigned short>(rx * kk); auto alpha = rd<float>(rx * (kk / kb)); auto x = rd<float>(rx * kk);
        auto row_of = rd<u32>(rows);
        std::vector<float> out(rows * kk);
        launch(rows * kk, [&] { ft_dequantize(codes.data(), alpha.data(), x.data(), row_of.data(), rows, kk, kb, dac, step, out.data()); });
        wr(out);
    } else {
        return 2;
    }
    return 0;
}
"#;

fn binary() -> Option<PathBuf> {
    let source = format!("{PRELUDE}\n#line 1 \"finetune.cu\"\n{FINETUNE_CU}\n{MAIN}");
    common::build_host_cpp("finetune_kernels_host", &source)
}

fn bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain numbers (f32, u32, u16) viewed as their bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n) }.to_vec()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs `kernel` with `args` on `input`; its output bytes.
fn run(bin: &Path, kernel: &str, args: &[String], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(bin)
        .arg(kernel)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{kernel}: {:?}", out.status);
    out.stdout
}

fn normals(tensor: u32, n: usize, scale: f32) -> Vec<f32> {
    let s = Stream::new(13, Purpose::TestData, tensor);
    (0..n).map(|i| scale * s.normal(i as u64, 0)).collect()
}

fn f32_arg(v: f32) -> String {
    v.to_bits().to_string()
}

#[test]
fn finetune_kernels_match_the_rust_they_mirror() {
    let Some(bin) = binary() else { return };
    adam_is_bit_identical(&bin);
    effective_weights_and_map_scales_use_the_grouped_tables(&bin);
    swiglu_backward_reads_the_interleaved_layout(&bin);
    combine_sums_in_expert_order(&bin);
    dequantize_is_alpha_code_step(&bin);
}

fn adam_is_bit_identical(bin: &Path) {
    let (a, b, c, d) = (6, 7, 5, 9);
    let w0 = normals(1, a * b + c * d, 0.1);
    let mut experts = vec![SwiGlu {
        gate_up: Array2::from_shape_vec((a, b), w0[..a * b].to_vec()).unwrap(),
        down: Array2::from_shape_vec((c, d), w0[a * b..].to_vec()).unwrap(),
    }];
    let mut adam = Adam::new(&experts);
    let n = w0.len();
    let (mut w, mut m, mut v) = (w0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    for (t, lr) in [(1, 1e-3f32), (2, 7e-4), (3, 2e-4)] {
        let g = normals(10 + t as u32, n, 0.01);
        let grads = vec![SwiGlu {
            gate_up: Array2::from_shape_vec((a, b), g[..a * b].to_vec()).unwrap(),
            down: Array2::from_shape_vec((c, d), g[a * b..].to_vec()).unwrap(),
        }];
        adam.step(&mut experts, &grads, lr);
        let c1 = 1.0 - BETA1.powi(t);
        let c2 = 1.0 - BETA2.powi(t);
        let args: Vec<String> = std::iter::once(n.to_string())
            .chain(
                [lr, c1, c2, BETA1, BETA2, 1.0 - BETA1, 1.0 - BETA2, EPS]
                    .into_iter()
                    .map(f32_arg),
            )
            .collect();
        let input = [bytes(&w), bytes(&g), bytes(&m), bytes(&v)].concat();
        let out = floats(&run(bin, "adam", &args, &input));
        w = out[..n].to_vec();
        m = out[n..2 * n].to_vec();
        v = out[2 * n..].to_vec();
        let rust: Vec<u32> = experts[0]
            .gate_up
            .iter()
            .chain(experts[0].down.iter())
            .map(|x| x.to_bits())
            .collect();
        let kernel: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
        assert_eq!(kernel, rust, "Adam step {t}");
    }
}

/// A preset with 64×64 crossbars, so that a 128×128 matrix spans 2×2 of them.
fn small_crossbars() -> TilePreset {
    let mut p = TilePreset::builtin("pcm-3d-8tier").unwrap();
    p.stack.rows = 64;
    p.stack.cols = 64;
    p
}

fn effective_weights_and_map_scales_use_the_grouped_tables(bin: &Path) {
    let preset = small_crossbars();
    let (e, n, k) = (2usize, 128usize, 128usize);
    let weights: Vec<Array2<f32>> = (0..e)
        .map(|x| Array2::from_shape_vec((n, k), normals(20 + x as u32, n * k, 0.05)).unwrap())
        .collect();
    let layouts: Vec<AnalogMatrix> = weights
        .iter()
        .enumerate()
        .map(|(x, w)| {
            AnalogMatrix::layout(w.view(), &preset, preset.device.build(), 0, 100 + x as u32)
                .unwrap()
        })
        .collect();
    let refs: Vec<&AnalogMatrix> = layouts.iter().collect();
    let tables = GroupedMatrix::tables(&refs).unwrap();
    let kb = tables.k_block;
    assert_eq!((kb, k / kb, tables.n_xbar), (64, 2, 2));
    // W̃ as binary16 operands, and the expected Ŵ from each crossbar's own mapping scales.
    let flat: Vec<f32> = weights.iter().flat_map(|w| w.iter().copied()).collect();
    let w16: Vec<u16> = flat
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let out = floats(&run(
        bin,
        "eff",
        &[
            flat.len().to_string(),
            n.to_string(),
            k.to_string(),
            kb.to_string(),
            tables.col_scale.len().to_string(),
        ],
        &[bytes(&w16), bytes(&tables.col_scale)].concat(),
    ));
    for (x, mat) in layouts.iter().enumerate() {
        for (g, block) in mat.geometry().iter().zip(mat.blocks()) {
            for (lc, c) in g.out_range.clone().enumerate() {
                for j in g.in_range.clone() {
                    let i = (x * n + c) * k + j;
                    let want = half::f16::from_bits(w16[i]).to_f32() * block.map_scale()[lc];
                    assert_eq!(out[i].to_bits(), want.to_bits(), "Ŵ[{x}, {c}, {j}]");
                }
            }
        }
    }
    // s_map from each (expert, K block, column)'s row-segment maximum: the layouts' own.
    let mut seg = vec![0.0f32; tables.col_scale.len()];
    for x in 0..e {
        for c in 0..n {
            for b in 0..k / kb {
                let row = &flat[(x * n + c) * k + b * kb..][..kb];
                seg[(x * (k / kb) + b) * n + c] = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            }
        }
    }
    let omega = preset.mapping.weight_scaling_omega;
    assert!(preset.mapping.per_column);
    let s_map = floats(&run(
        bin,
        "mapsc",
        &[seg.len().to_string(), n.to_string(), f32_arg(omega)],
        &bytes(&seg),
    ));
    let want: Vec<u32> = tables.col_scale.iter().map(|v| v.to_bits()).collect();
    assert_eq!(
        s_map.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want,
        "s_map"
    );
}

fn swiglu_backward_reads_the_interleaved_layout(bin: &Path) {
    let (rows, nh) = (3usize, 16usize);
    let gu = normals(30, rows * 2 * nh, 1.5);
    let gh = normals(31, rows * nh, 1.0);
    let out = floats(&run(
        bin,
        "swiglu",
        &[rows.to_string(), nh.to_string()],
        &[bytes(&gu), bytes(&gh)].concat(),
    ));
    for r in 0..rows {
        for j in 0..nh {
            // Gate column j sits at (j/8)·16 + j%8, up column j eight further.
            let f = (j / 8) * 16 + j % 8;
            let (a, u, g) = (gu[r * 2 * nh + f], gu[r * 2 * nh + f + 8], gh[r * nh + j]);
            let sg = 1.0 / (1.0 + (-a).exp());
            let ga = g * (u * (sg * (1.0 + a * (1.0 - sg))));
            let gu_ = g * (a / (1.0 + (-a).exp()));
            let (ka, ku) = (out[r * 2 * nh + f], out[r * 2 * nh + f + 8]);
            assert!((ka - ga).abs() <= 1e-6 * ga.abs().max(1e-3), "∂a[{r}, {j}]");
            assert!(
                (ku - gu_).abs() <= 1e-6 * gu_.abs().max(1e-3),
                "∂u[{r}, {j}]"
            );
        }
    }
}

fn combine_sums_in_expert_order(bin: &Path) {
    // 3 tokens, 2 pairs each; sorted rows 0..6 (by expert). Token t's pairs in slot order.
    let (t, k, n) = (3usize, 2usize, 4usize);
    let p = t * k;
    let rows = normals(40, p * n, 1.0);
    let pos: Vec<u32> = vec![4, 1, 0, 5, 3, 2];
    let sw: Vec<f32> = normals(41, p, 0.5);
    let y = floats(&run(
        bin,
        "combine",
        &[t.to_string(), k.to_string(), n.to_string(), p.to_string()],
        &[bytes(&rows), bytes(&pos), bytes(&sw)].concat(),
    ));
    for tok in 0..t {
        let mut ps: Vec<usize> = pos[tok * k..(tok + 1) * k]
            .iter()
            .map(|&q| q as usize)
            .collect();
        ps.sort_unstable();
        for c in 0..n {
            let mut acc = 0.0f32;
            for &q in &ps {
                acc += sw[q] * rows[q * n + c];
            }
            assert_eq!(y[tok * n + c].to_bits(), acc.to_bits(), "ŷ[{tok}, {c}]");
        }
    }
}

fn dequantize_is_alpha_code_step(bin: &Path) {
    let (rx, k, kb, rows) = (3usize, 64usize, 32usize, 4usize);
    let codes_f: Vec<f32> = normals(50, rx * k, 40.0)
        .into_iter()
        .map(|v| v.round().clamp(-127.0, 127.0))
        .collect();
    let codes: Vec<u16> = codes_f
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    let alpha: Vec<f32> = normals(51, rx * (k / kb), 1.0)
        .into_iter()
        .map(f32::abs)
        .collect();
    let x = normals(52, rx * k, 1.0);
    let row_of: Vec<u32> = vec![2, 0, 2, 1];
    let step = 2.0f32 / 254.0;
    for dac in [1u32, 0] {
        let out = floats(&run(
            bin,
            "dequant",
            &[
                rows.to_string(),
                k.to_string(),
                kb.to_string(),
                dac.to_string(),
                f32_arg(step),
                rx.to_string(),
            ],
            &[bytes(&codes), bytes(&alpha), bytes(&x), bytes(&row_of)].concat(),
        ));
        for p in 0..rows {
            let r = row_of[p] as usize;
            for j in 0..k {
                let want = if dac == 1 {
                    alpha[r * (k / kb) + j / kb] * (codes_f[r * k + j] * step)
                } else {
                    x[r * k + j]
                };
                assert_eq!(out[p * k + j].to_bits(), want.to_bits(), "x̂[{p}, {j}]");
            }
        }
    }
}

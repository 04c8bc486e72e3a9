//! The CTA raster of the grouped GEMMs (`raster_tile` in `kernels/analog_moe.cu`), compiled as
//! host C++: for expert tile counts with empty experts, ragged raster groups and widths from 1
//! to beyond the column tiles, every (expert, row tile, column tile) is produced by exactly one
//! block, blocks past the last tile are rejected, and each raster group covers `width`
//! consecutive column tiles of one expert. A wrong raster would skip or repeat output tiles
//! silently in the benchmarks of shapes wider than one group (Mixtral's gate/up: 14 groups).
//! Skips with a printed reason when no C++ compiler is found (`$CXX`, else `c++`/`g++`/`clang++`).
mod common;

use std::process::Command;

const KERNEL: &str = include_str!("../kernels/analog_moe.cu");

/// The text between the BEGIN/END raster_tile markers.
fn raster_source() -> &'static str {
    let begin = KERNEL.find("// BEGIN raster_tile").expect("BEGIN marker");
    let body = &KERNEL[begin..];
    let body = &body[body.find('\n').unwrap() + 1..];
    // The marker comment runs over two lines; the function starts at `__device__`.
    let body = &body[body.find("__device__").unwrap()..];
    &body[..body.find("// END raster_tile").expect("END marker")]
}

#[test]
fn raster_covers_every_output_tile_once() {
    let source = format!(
        "#include <cstdio>\n#include <cstdlib>\n#include <vector>\n#define __device__\n\
         #define __forceinline__ inline\ntypedef unsigned int u32;\n{}\n\
         int main(int argc, char** argv) {{\n\
           u32 n_tiles_n = atoi(argv[1]), width = atoi(argv[2]), n_experts = argc - 3;\n\
           std::vector<u32> off(n_experts + 1, 0);\n\
           for (u32 i = 0; i < n_experts; ++i) off[i + 1] = off[i] + atoi(argv[3 + i]);\n\
           for (u32 b = 0; b < off[n_experts] * n_tiles_n + 5; ++b) {{\n\
             u32 e = 0, m = 0, n = 0;\n\
             bool ok = raster_tile(off.data(), n_experts, b, n_tiles_n, width, e, m, n);\n\
             printf(\"%u %d %u %u %u\\n\", b, ok ? 1 : 0, e, m, n);\n\
           }}\n\
         }}\n",
        raster_source()
    );
    let Some(exe) = common::build_host_cpp("raster_host", &source) else {
        return;
    };
    // (column tiles, raster width, row tiles per expert).
    let cases: [(u32, u32, &[u32]); 6] = [
        (8, 8, &[16, 16, 15, 1]),     // OLMoE-like: one group
        (112, 8, &[16, 0, 17, 3, 0]), // Mixtral-like: 14 groups, empty experts
        (20, 16, &[5, 2, 0, 7]),      // a ragged last group of 4
        (7, 3, &[1, 4, 2]),           // width not dividing N
        (5, 1, &[3, 0, 2]),           // width 1
        (3, 32, &[2, 5]),             // width beyond N
    ];
    for (n_tiles, width, tiles) in cases {
        let out = Command::new(&exe)
            .arg(n_tiles.to_string())
            .arg(width.to_string())
            .args(tiles.iter().map(|t| t.to_string()))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let total: u32 = tiles.iter().sum::<u32>() * n_tiles;
        let mut seen = std::collections::HashSet::new();
        let mut last_group = None;
        for line in text.lines() {
            let v: Vec<u32> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            let (b, ok, e, m, n) = (v[0], v[1] == 1, v[2], v[3], v[4]);
            assert_eq!(ok, b < total, "{n_tiles} {width} {tiles:?}: block {b}");
            if !ok {
                continue;
            }
            assert!(
                m < tiles[e as usize] && n < n_tiles,
                "{tiles:?}: block {b} -> {e} {m} {n}"
            );
            assert!(seen.insert((e, m, n)), "{tiles:?}: ({e}, {m}, {n}) twice");
            // Blocks of one raster group of one expert are contiguous.
            let group = (e, n / width);
            if last_group != Some(group) {
                assert!(
                    !seen.iter().any(|&(e2, m2, n2)| (e2, n2 / width) == group
                        && (e2, m2, n2) != (e, m, n)),
                    "{tiles:?}: group {group:?} split at block {b}"
                );
                last_group = Some(group);
            }
        }
        assert_eq!(seen.len() as u32, total, "{n_tiles} {width} {tiles:?}");
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

//! The CTA raster of the grouped GEMMs (`raster_tile` in `kernels/raster.cuh`), compiled as
//! host C++: for expert tile counts with empty experts, ragged raster groups and widths from 1
//! to beyond the column tiles, every (expert, row tile, column tile) is produced by exactly one
//! block, blocks past the last tile are rejected, and each raster group covers `width`
//! consecutive column tiles of one expert; the same in column slabs (`slab_tile`), whose
//! blocks come slab by slab. A wrong raster would skip or repeat output tiles
//! silently in the benchmarks of shapes wider than one group (Mixtral's gate/up: 14 groups).
//! Skips with a printed reason when no C++ compiler is found (`$CXX`, else `c++`/`g++`/`clang++`).
mod common;

use std::process::Command;

const KERNEL: &str = include_str!("../kernels/raster.cuh");

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
           u32 n_tiles_n = atoi(argv[1]), width = atoi(argv[2]), slab = atoi(argv[3]), n_experts = argc - 4;\n\
           std::vector<u32> off(n_experts + 1, 0);\n\
           for (u32 i = 0; i < n_experts; ++i) off[i + 1] = off[i] + atoi(argv[4 + i]);\n\
           for (u32 b = 0; b < off[n_experts] * n_tiles_n + 5; ++b) {{\n\
             u32 e = 0, m = 0, n = 0;\n\
             bool ok = slab > 0 ? slab_tile(off.data(), n_experts, b, n_tiles_n, width, slab, e, m, n)\n\
                                : raster_tile(off.data(), n_experts, b, n_tiles_n, width, e, m, n);\n\
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
    // Each case also in column slabs (slab_tile): none, one dividing the column tiles, one
    // leaving a narrower last slab, and one wider than them all.
    for (n_tiles, width, tiles, slab) in cases
        .iter()
        .flat_map(|&(n, w, t)| [0, 1, 2, 3, n + 1].map(|s| (n, w, t, s)))
    {
        let out = Command::new(&exe)
            .arg(n_tiles.to_string())
            .arg(width.to_string())
            .arg(slab.to_string())
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
            // Slabs come in order: a block's column tile is in the slab its index says.
            if let Some(in_slab) = n.checked_div(slab) {
                let rows: u32 = tiles.iter().sum();
                assert_eq!(
                    in_slab,
                    b / (rows * slab),
                    "{tiles:?} slab {slab}: block {b}"
                );
            }
            // Blocks of one raster group (of one expert, within one slab) are contiguous.
            let slab_tiles = if slab == 0 { n_tiles } else { slab };
            let group_of = |e: u32, n: u32| (e, n / slab_tiles, (n % slab_tiles) / width);
            let group = group_of(e, n);
            if last_group != Some(group) {
                assert!(
                    !seen
                        .iter()
                        .any(|&(e2, m2, n2)| group_of(e2, n2) == group && (e2, m2, n2) != (e, m, n)),
                    "{tiles:?}: group {group:?} split at block {b}"
                );
                last_group = Some(group);
            }
        }
        assert_eq!(seen.len() as u32, total, "{n_tiles} {width} {tiles:?}");
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

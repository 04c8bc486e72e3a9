//! The digital (bf16) MoE layer: against an f32 computation on the host, the bf16 conversion
//! (round to nearest even) and the SwiGLU epilogue that feed the down GEMM, and the sm_90a
//! wgmma kernel against the mma.sync kernel over its tile shapes and pipelining modes.

use crate::support::{
    gpu, hopper, rel_rms, route_host, routing, silu_mul, store_rows, test_matrix,
};
use aimc::backend::cuda::gemm::{grouped_gemm, GemmOutput, Precision, WgmmaTile};
use aimc::backend::cuda::grouped::{to_bf16_device, GpuGroupedMatrix, GroupedMatrix};
use aimc::backend::cuda::layer::{DigitalCombine, GpuMoeLayer};
use aimc::backend::cuda::periphery::quantize;

/// A digital grouped matrix of `e` experts, `rows` outputs × `cols` inputs, test weights of
/// scale 0.06 (ids `id`..`id + e`), one crossbar block per expert (`k_block = cols`).
fn digital_table(e: usize, rows: usize, cols: usize, id: u32) -> GroupedMatrix {
    GroupedMatrix {
        n_experts: e,
        n_cols: rows,
        k: cols,
        k_block: cols,
        weights: (0..e as u32)
            .flat_map(|i| {
                test_matrix(rows, cols, id + i, 0.06)
                    .into_raw_vec_and_offset()
                    .0
            })
            .collect(),
        col_tensor_id: vec![0; e * rows],
        col_scale: vec![1.0; e * rows],
        col_local: (0..rows as u32).collect(),
        col_block_cols: vec![rows as u32; rows],
        col_xbar: vec![0; rows],
        n_xbar: 1,
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn digital_moe_layer_matches_f32_within_bf16() {
    let dev = gpu("digital moe");
    let (t, k, e, n, d) = (160, 2, 3, 128, 256);
    let table = |rows, cols, id| digital_table(e, rows, cols, id);
    let gate = table(n, d, 300);
    let up = table(n, d, 310);
    let down = table(d, n, 320);
    let gate_up = GroupedMatrix::interleave_swiglu(&gate, &up).unwrap();
    let layer = GpuMoeLayer {
        gate_up: GpuGroupedMatrix::upload(&dev, &gate_up, Precision::DigitalBf16).unwrap(),
        down: GpuGroupedMatrix::upload(&dev, &down, Precision::DigitalBf16).unwrap(),
        periphery: None,
        seed: 0,
    };
    let x = test_matrix(t, d, 7, 1.0);
    let (experts, weights) = routing(t, k, e);
    let r = route_host(&dev, &experts, &weights, t, k, e);
    let xd = dev.upload(x.as_slice().unwrap()).unwrap();
    let run = |c| {
        dev.download(&layer.forward_with(&dev, &xd, &r, 0, c).unwrap())
            .unwrap()
    };
    let dot = |m: &GroupedMatrix, ex: usize, row: usize, v: &[f32]| -> f32 {
        m.weights[(ex * m.n_cols + row) * m.k..][..m.k]
            .iter()
            .zip(v)
            .map(|(a, b)| a * b)
            .sum()
    };
    let mut want = vec![0.0f32; t * d];
    for tok in 0..t {
        for slot in 0..k {
            let ex = experts[tok * k + slot] as usize;
            let xv: Vec<f32> = x.row(tok).to_vec();
            let h: Vec<f32> = (0..n)
                .map(|j| silu_mul(dot(&gate, ex, j, &xv), dot(&up, ex, j, &xv)))
                .collect();
            for (c, v) in want[tok * d..][..d].iter_mut().enumerate() {
                *v += weights[tok * k + slot] * dot(&down, ex, c, &h);
            }
        }
    }
    // bf16 operands (2^-9 relative per rounding), f32 accumulation; Bf16Rows rounds each
    // expert output once more. A wrong slot, weight or row in the combine is O(1).
    for combine in [DigitalCombine::ScatterAdd, DigitalCombine::Bf16Rows] {
        let y = run(combine);
        let rel = rel_rms(y.iter(), want.iter());
        println!(
            "digital moe layer ({combine:?}): rel. RMS diff to f32 {rel:.3e} (bound 1e-2; {})",
            Precision::DigitalBf16.describe()
        );
        assert!(rel <= 1e-2, "{combine:?}: {rel}");
    }
    // The combine sums in slot order: the same bits every run.
    assert_eq!(run(DigitalCombine::Bf16Rows), run(DigitalCombine::Bf16Rows));
}

/// (tokens, top-k, experts, hidden n, model d) of the digital kernel tests: several row tiles per
/// expert with a ragged last one, K = 4 and 2 wgmma stages.
const DIGITAL_LAYER: (usize, usize, usize, usize, usize) = (600, 2, 3, 128, 256);

/// Interleaved gate/up `[E, 2n, d]` and down `[E, d, n]` tables of [`DIGITAL_LAYER`].
fn digital_layer_tables() -> (GroupedMatrix, GroupedMatrix) {
    let (_, _, e, n, d) = DIGITAL_LAYER;
    let table = |rows, cols, id| digital_table(e, rows, cols, id);
    let gate_up = GroupedMatrix::interleave_swiglu(&table(n, d, 300), &table(n, d, 310)).unwrap();
    (gate_up, table(d, n, 320))
}

/// bf16 bits of `x` rounded to nearest, ties to even (finite or infinite `x`; no NaN here).
fn bf16_rne(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn to_bf16_rounds_to_nearest_even_at_any_length() {
    let dev = gpu("to_bf16");
    // Lengths around the kernel's 8 values per thread, and a large one; values: random
    // magnitudes over many binades, exact ties (1 + 2^-8 + k·2^-7), the largest finite f32
    // (rounds to infinity), infinities, signed zeros, subnormals.
    let mut values: Vec<f32> = (0..(1 << 20) + 3)
        .map(|i: u32| {
            let h = i.wrapping_mul(0x9E37_79B9) ^ (i >> 7);
            f32::from_bits((h & 0x807F_FFFF) | (((h >> 23) % 60 + 97) << 23))
        })
        .collect();
    let ties = (0..64).map(|k| 1.0 + 2f32.powi(-8) + k as f32 * 2f32.powi(-7));
    let special = [
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e-40,
        -3e-39,
    ];
    for (slot, v) in values.iter_mut().step_by(5).zip(ties.chain(special)) {
        *slot = v;
    }
    for len in [1, 7, 8, 9, 1001, values.len()] {
        let x = dev.upload(&values[..len]).unwrap();
        let got = dev.download(&to_bf16_device(&dev, &x).unwrap()).unwrap();
        let bad = (0..len).filter(|&i| got[i] != bf16_rne(values[i])).count();
        println!("to_bf16, {len} values: {bad} differ from round-to-nearest-even");
        assert_eq!(bad, 0, "length {len}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn digital_swiglu_epilogue_writes_the_bf16_operand() {
    let dev = gpu("digital bf16 SwiGLU");
    let (t, k, e, n, d) = DIGITAL_LAYER;
    let (gate_up, _) = digital_layer_tables();
    let x = test_matrix(t, d, 8, 1.0);
    let (experts, weights) = routing(t, k, e);
    let r = route_host(&dev, &experts, &weights, t, k, e);
    let xd = dev.upload(x.as_slice().unwrap()).unwrap();
    let input = quantize(&dev, &xd, t, d, d, None).unwrap();
    // The mma.sync kernel everywhere, and on Hopper the wgmma kernel's default tile and its
    // clustered warp-specialised variant.
    let mut tiles = vec![None];
    if dev.compute_capability() == (9, 0) {
        tiles.push(WgmmaTile::choose(2 * n, d).unwrap());
        tiles.push(Some(WgmmaTile::new(256, 4, 3)));
    }
    for tile in tiles {
        let m = GpuGroupedMatrix::upload(&dev, &gate_up, Precision::DigitalBf16)
            .unwrap()
            .use_wgmma(tile);
        let mut h = dev.zeros::<f32>(t * k * n).unwrap();
        grouped_gemm(
            &dev,
            &m,
            &input,
            &r,
            true,
            None,
            0,
            0,
            GemmOutput::SwiGlu,
            &mut h,
        )
        .unwrap();
        let want = dev.download(&to_bf16_device(&dev, &h).unwrap()).unwrap();
        let mut hb = dev.zeros::<u16>(t * k * n).unwrap();
        grouped_gemm(
            &dev,
            &m,
            &input,
            &r,
            true,
            None,
            0,
            0,
            GemmOutput::SwiGluBf16,
            &mut hb,
        )
        .unwrap();
        let got = dev.download(&hb).unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!("bf16 SwiGLU epilogue ({tile:?}): {differ} of {} bf16 values differ from to_bf16(f32 SwiGLU)", got.len());
        assert_eq!(differ, 0);
        // An f32 buffer for bf16 rows is a clear error, not a silent reinterpretation.
        let err = grouped_gemm(
            &dev,
            &m,
            &input,
            &r,
            true,
            None,
            0,
            0,
            GemmOutput::SwiGluBf16,
            &mut h,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("SwiGluBf16"), "{err}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn digital_wgmma_layer_matches_the_mma_sync_kernel() {
    let Some(dev) = hopper("digital wgmma") else {
        return;
    };
    let (t, k, e, n, d) = DIGITAL_LAYER;
    let (gate_up, down) = digital_layer_tables();
    let layer = |tile: Option<WgmmaTile>| GpuMoeLayer {
        gate_up: GpuGroupedMatrix::upload(&dev, &gate_up, Precision::DigitalBf16)
            .unwrap()
            .use_wgmma(tile),
        down: GpuGroupedMatrix::upload(&dev, &down, Precision::DigitalBf16)
            .unwrap()
            .use_wgmma(tile),
        periphery: None,
        seed: 0,
    };
    let mma = layer(None);
    let x = test_matrix(t, d, 8, 1.0);
    let (experts, weights) = routing(t, k, e);
    let r = route_host(&dev, &experts, &weights, t, k, e);
    let xd = dev.upload(x.as_slice().unwrap()).unwrap();
    let combines = [DigitalCombine::ScatterAdd, DigitalCombine::Bf16Rows];
    let y_mma = combines.map(|c| {
        dev.download(&mma.forward_with(&dev, &xd, &r, 0, c).unwrap())
            .unwrap()
    });
    let input = quantize(&dev, &xd, t, d, d, None).unwrap();
    let store = |m: &GpuGroupedMatrix| store_rows(&dev, m, &input, &r, None, 0);
    let store_mma = store(&mma.gate_up);
    // Every tile width, pipelining mode and a stage count at the minimum and above the number
    // of K steps (the down GEMM has 2).
    // The persistent kernels (pipes 2 and 3) also on 3 CTAs or 2 clusters, each walking several
    // tiles across the barriers' phases; with clusters, experts with an odd number of row
    // tiles leave the second CTA of their last pair without rows (1,200 pairs over 3 experts: 12 or 13 row tiles, each with 2 column
    // tiles of 128 in either GEMM; 4 K steps in gate/up, 2 in down).
    let mut tiles: Vec<WgmmaTile> = [
        (128, 4, 0, 0),
        (128, 4, 1, 0),
        (128, 5, 1, 0),
        (256, 3, 1, 0),
        (256, 4, 1, 0),
        (256, 4, 2, 0),
        (128, 3, 2, 3),
        (128, 6, 2, 3),
        (256, 4, 2, 3),
        (256, 4, 3, 0),
        (128, 4, 3, 0),
        (128, 3, 3, 4),
        (256, 4, 3, 4),
    ]
    .into_iter()
    .map(|(cols, stages, pipe, ctas)| WgmmaTile {
        ctas,
        ..WgmmaTile::new(cols, stages, pipe)
    })
    .collect();
    // The default: the clustered kernel for gate/up, one CTA per tile for the scatter-add.
    tiles.extend(WgmmaTile::choose(2 * n, d).unwrap());
    for tile in tiles {
        let wg = layer(Some(tile));
        // Whole layer (SwiGLU and scatter-add epilogues). Same bf16 operands, f32 accumulation
        // in another order: a hidden value may round to the neighbouring bf16 (2^-8 relative)
        // before the down GEMM, far below the O(1) error of a wrong fragment or swizzle layout.
        for (c, y_mma) in combines.iter().zip(&y_mma) {
            let y_wg = dev
                .download(&wg.forward_with(&dev, &xd, &r, 0, *c).unwrap())
                .unwrap();
            let rel = rel_rms(y_wg.iter(), y_mma.iter());
            println!(
                "digital wgmma {tile:?} layer ({c:?}) vs mma.sync layer: rel. RMS {rel:.2e} (bound 1e-3)"
            );
            assert!(rel <= 1e-3, "{tile:?} {c:?}: {rel}");
        }
        // Store epilogue of the gate/up GEMM: f32 sums of identical bf16 products.
        let rel = rel_rms(store(&wg.gate_up).iter(), store_mma.iter());
        println!("digital wgmma {tile:?} store vs mma.sync store: rel. RMS {rel:.2e} (bound 1e-5)");
        assert!(rel <= 1e-5, "{tile:?}: {rel}");
    }
}

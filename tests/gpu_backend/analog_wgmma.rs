//! The sm_90a analog wgmma kernel against the analog mma.sync kernel, over the presets it runs
//! (with and without side products, bound management, 250-column crossbars) and each tile
//! width, pipe and persistent schedule. A file of its own because its case matrix grows with
//! each kernel variant; the data and bounds it shares with the mma.sync layer tests are in
//! `support`.

use crate::support::{
    analog_experts, analog_layer_tables, assert_layer_parity, bound_managed_presets, hopper,
    lightning_set, narrow_crossbars, route_host, routing, store_rows, test_matrix,
};
use aimc::backend::cuda::gemm::{analog_wgmma_tile_of, Precision, WgmmaTile, ANALOG_WGMMA_COLS};
use aimc::backend::cuda::grouped::{GpuGroupedMatrix, GroupedMatrix};
use aimc::backend::cuda::layer::GpuMoeLayer;
use aimc::backend::cuda::periphery::{quantize, GemmPeriphery};
use aimc::tile::{BoundManagement, TilePreset};
use ndarray::Array2;

#[test]
#[ignore = "needs a CUDA GPU"]
fn analog_wgmma_layer_matches_the_mma_sync_kernel() {
    let Some(dev) = hopper("analog wgmma") else {
        return;
    };
    // 1,200 pairs over 3 experts: 3–4 row tiles each, the last partly filled. gate/up: K =
    // 1024 in two 512-row crossbar blocks (8 wgmma steps each), N = 512; down: K = 256, one
    // 256-row block (4 steps, two fragment pairs of the previous block per step).
    let (t, k, e, n, d) = (600, 2, 3, 256, 1024);
    let (experts, weights) = routing(t, k, e);
    let r = route_host(&dev, &experts, &weights, t, k, e);
    let x = test_matrix(t, d, 6, 0.3).mapv(|v| v.clamp(-1.0, 1.0));
    let xd = dev.upload(x.as_slice().unwrap()).unwrap();
    let mut bm = lightning_set();
    bm.name = "Lightning set + iterative bound management".into();
    bm.periphery.bound_management = BoundManagement::Iterative;
    let presets = [
        lightning_set(),
        {
            // Philox per lane, not per lane pair: quads straddle the 205-column crossbars.
            let mut p = lightning_set();
            p.name = "Lightning set, 250-column crossbars".into();
            p.stack.cols = 250;
            p
        },
        bm,
        TilePreset::resolve("aihwkit-default").unwrap(),
        bound_managed_presets().pop().unwrap(), // ADDITIVE + iterative
        // Side products (PCM_READ, IR drop): the 64-column tile with pipe 0 alone.
        TilePreset::resolve("standard-hwa").unwrap(),
        {
            let mut p = narrow_crossbars();
            p.name = "standard-hwa, 250-column crossbars".into();
            p
        },
    ];
    // Both tiles: 128 columns (one CTA per multiprocessor) and 64 (two; the gate/up blocks'
    // 4 fragment pairs over 8 steps, the down block's over 4), each with its default pipe, and
    // the 64-column tile with the other pipes too (1: a wgmma group in flight across steps;
    // 2: TMA stages, the gate/up operand copied into sorted-pair order, the last expert's last
    // row tile reading zeros past the operand's end), and the mix of 0 and 2: cp.async where
    // the gate/up rows are gathered per token, TMA stages in the down GEMM.
    let tiles = |k_block: usize| {
        let mut t: Vec<_> = ANALOG_WGMMA_COLS
            .iter()
            .filter_map(|&c| analog_wgmma_tile_of(c, k_block))
            .collect();
        t.push(WgmmaTile::new(64, 3, 1));
        t.push(WgmmaTile::new(64, 3, 2));
        t.push(WgmmaTile {
            gather_pipe: 0,
            ..WgmmaTile::new(64, 3, 2)
        });
        t
    };
    assert_eq!(tiles(512).len(), 5);
    assert_eq!(tiles(512)[0], WgmmaTile::new(64, 3, 0));
    for (preset, ti) in presets.iter().flat_map(|p| (0..5).map(move |i| (p, i))) {
        let [gates, ups, downs] = analog_experts(preset, (e, n, d));
        let (gate_up, down) = analog_layer_tables(&gates, &ups, &downs);
        let periphery = GemmPeriphery::from_spec(&preset.periphery).unwrap();
        // Side products run the 64-column tile alone, persistent: with a CTA per
        // multiprocessor (each takes one tile of this layer), then with 5, which walk ~20 tiles
        // each, so that a tile's last periphery and epilogue follow the next tile's first block;
        // and with TMA stages on 5 CTAs, whose ring of slots and barrier phases runs on across
        // the tiles, throughout or in the down GEMM alone.
        if periphery.side_products() && ti == 2 {
            continue;
        }
        {
            let precision = Precision::AnalogF16;
            let (tile_gu, tile_down) = if periphery.side_products() {
                let ctas = if ti == 0 { 0 } else { 5 };
                let pick = if ti >= 3 { ti } else { 0 };
                let walk = |t: WgmmaTile| WgmmaTile { ctas, ..t };
                (
                    walk(tiles(gate_up.k_block)[pick]),
                    walk(tiles(down.k_block)[pick]),
                )
            } else {
                (tiles(gate_up.k_block)[ti], tiles(down.k_block)[ti])
            };
            let what = format!("{}, tile {}", preset.name, tile_gu.describe());
            let upload = |m: &GroupedMatrix| GpuGroupedMatrix::upload(&dev, m, precision).unwrap();
            let wg = GpuMoeLayer {
                gate_up: upload(&gate_up).use_wgmma(Some(tile_gu)),
                down: upload(&down).use_wgmma(Some(tile_down)),
                periphery: Some(periphery),
                seed: 21,
            };
            // Two 512-row blocks for gate/up, one of 256 for down: both on the wgmma kernel.
            assert_eq!(
                (gate_up.k_block, down.k_block, wg.down.wgmma().is_some()),
                (512, 256, true),
                "{what}"
            );
            let mma = GpuMoeLayer {
                gate_up: upload(&gate_up).use_wgmma(None),
                down: upload(&down).use_wgmma(None),
                periphery: Some(periphery),
                seed: 21,
            };
            let run = |l: &GpuMoeLayer| {
                let y = dev.download(&l.forward(&dev, &xd, &r, 5).unwrap()).unwrap();
                Array2::from_shape_vec((t, d), y).unwrap()
            };
            // Same operands, the same exact products in f32 and the same periphery code (block_outputs): any ADC code that differs is a bug here, not
            // rounding, but the bound is the layer parity bound of the CPU comparison.
            assert_layer_parity(&format!("wgmma vs mma.sync, {what}"), &run(&wg), &run(&mma));
            // Store epilogue of gate/up: the sums of ADC outputs, compared element-wise.
            let input = quantize(&dev, &xd, t, d, gate_up.k_block, Some(&periphery)).unwrap();
            let store =
                |m: &GpuGroupedMatrix| store_rows(&dev, m, &input, &r, Some((&periphery, 21)), 5);
            let (a, b) = (store(&wg.gate_up), store(&mma.gate_up));
            let differ = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| (*x - *y).abs() > 1e-6 * (1.0 + y.abs()))
                .count();
            println!(
                "analog wgmma store vs mma.sync ({what}): {differ} of {} outputs differ",
                a.len()
            );
            assert!(differ * 1000 <= a.len(), "{what}: {differ} of {}", a.len());
        }
    }
}

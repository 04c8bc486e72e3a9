//! Splitting large matrices into equal-part blocks (docs/model.md §3) and 3D tile stacks (§4).
use aimc::tile::{split_equal, AnalogMatrix, TilePreset, TileStack};
use ndarray::Array2;

#[test]
fn split_equal_gives_near_equal_parts_first_ones_larger() {
    let lens = |n, m| {
        split_equal(n, m)
            .iter()
            .map(|r| r.len())
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(1300, 512), vec![434, 433, 433]);
    assert_eq!(lens(700, 512), vec![350, 350]);
    assert_eq!(lens(512, 512), vec![512]);
    assert_eq!(lens(513, 512), vec![257, 256]);
    assert_eq!(lens(10, 3), vec![3, 3, 2, 2]);
    assert!(split_equal(0, 4).is_empty());
    let parts = split_equal(1300, 512);
    assert_eq!((parts[0].start, parts[2].end), (0, 1300));
    assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
}

/// A 1300×700 matrix (n_out × n_in) on 512×512 crossbars: 3×2 blocks of 434/433 × 350, each with
/// its own tensor id; under `ideal` the blocks recombine to W and W·x to 1e-6 relative.
#[test]
fn matrix_1300x700_splits_and_recombines_under_ideal() {
    let preset = TilePreset::builtin("ideal").unwrap();
    let (n_out, n_in) = (1300, 700);
    let w = Array2::from_shape_fn((n_out, n_in), |(i, j)| {
        (((i * 7919 + j * 104729) % 1000) as f32 - 500.0) / 250.0
    });
    let m = AnalogMatrix::program(w.view(), &preset, 5, 42).unwrap();
    assert_eq!(m.num_blocks(), 6);
    let geo = m.geometry();
    let shapes: Vec<(usize, usize)> = geo
        .iter()
        .map(|g| (g.out_range.len(), g.in_range.len()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            (434, 350),
            (434, 350),
            (433, 350),
            (433, 350),
            (433, 350),
            (433, 350)
        ]
    );
    assert_eq!(geo[3].out_range, 434..867);
    assert_eq!(geo[3].in_range, 350..700);
    let ids: std::collections::HashSet<u32> = geo.iter().map(|g| g.tensor_id).collect();
    assert_eq!(ids.len(), 6, "block tensor ids must differ");

    let back = m.effective_weights();
    let max_err = back
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // W̃ = w/s_map rounded to binary16: each weight within 2⁻¹¹ relative (docs/model.md §3).
    let w_max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_err <= 2f32.powi(-11) * w_max * 1.001 + 1e-6,
        "recombined weights differ by {max_err}"
    );

    let x = Array2::from_shape_fn((17, n_in), |(b, j)| ((b * 3 + j) as f32 * 0.01).sin());
    let y = m.mvm(x.view(), 0);
    let y_ref = x.dot(&w.t());
    let num: f64 = y
        .iter()
        .zip(&y_ref)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = y_ref.iter().map(|b| (*b as f64).powi(2)).sum();
    // Binary16 W̃ (2⁻¹¹ relative per weight): 7.2e-4 here, where outputs partly cancel.
    assert!(
        (num / den).sqrt() < 2e-3,
        "relative error {}",
        (num / den).sqrt()
    );
}

#[test]
fn oversized_crossbar_and_bad_weights_are_errors() {
    let preset = TilePreset::builtin("ideal").unwrap();
    let big = Array2::<f32>::zeros((10, 513));
    let err = aimc::tile::Crossbar::program(big.view(), &preset, 0, 9).unwrap_err();
    assert!(format!("{err:#}").contains("tensor 9"), "{err:#}");
    let mut w = Array2::<f32>::zeros((4, 4));
    w[[2, 3]] = f32::NAN;
    let err = aimc::tile::Crossbar::program(w.view(), &preset, 0, 9).unwrap_err();
    assert!(format!("{err:#}").contains("[2, 3]"), "{err:#}");
}

/// One tier active per MVM; switches counted only when the tier changes.
#[test]
fn tile_stack_counts_tier_switches() {
    let preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let mut stack = TileStack::new(&preset);
    assert_eq!(stack.num_tiers(), 8);
    let w = Array2::from_shape_fn((16, 32), |(i, j)| (i as f32 - j as f32) / 32.0);
    stack.program_tier(0, w.view(), 1, 10).unwrap();
    stack.program_tier(5, w.view(), 1, 11).unwrap();
    assert!(stack.program_tier(8, w.view(), 1, 12).is_err());
    stack.drift_to(3600.0);
    let x = Array2::<f32>::ones((2, 32));
    for tier in [0, 0, 5, 5, 0, 5] {
        stack.mvm(tier, x.view(), 0).unwrap();
    }
    assert_eq!(stack.mvm_count(), 6);
    assert_eq!(stack.tier_switches(), 3);
    assert_eq!(stack.active_tier(), Some(5));
    assert!(stack.mvm(3, x.view(), 0).is_err(), "unprogrammed tier");
}

/// Memory per weight: 16 B for aihwkit-default (programmed + current weights, ν of both devices),
/// 28 B with IR drop and PCM_READ (|W̃| and [W̃; W̃∘F] copies).
#[test]
fn crossbar_memory_is_accounted() {
    let w = Array2::<f32>::ones((64, 32));
    let n = 64 * 32;
    let a = aimc::tile::Crossbar::program(
        w.view(),
        &TilePreset::builtin("aihwkit-default").unwrap(),
        0,
        0,
    )
    .unwrap();
    assert_eq!(a.memory_bytes(), 16 * n);
    let s = aimc::tile::Crossbar::program(
        w.view(),
        &TilePreset::builtin("standard-hwa").unwrap(),
        0,
        0,
    )
    .unwrap();
    assert_eq!(s.memory_bytes(), 28 * n);
}

/// `AnalogMatrix::layout` (what the GPU eval builds instead of programming the CPU crossbars)
/// has the blocks, shapes, tensor ids, mapping scales and `global_exact` references of the
/// programmed matrix, the target conductance scale of W/s_map, and no weight arrays at all.
#[test]
fn layout_has_the_programmed_matrix_geometry_and_scales_and_no_weights() {
    let mut preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let (n_out, n_in) = (700, 600);
    let w = Array2::from_shape_fn((n_out, n_in), |(i, j)| {
        (((i * 7919 + j * 104729) % 1000) as f32 - 500.0) / 250.0
    });
    for gdc in [
        aimc::tile::DriftCompensation::GlobalExact,
        aimc::tile::DriftCompensation::Global,
    ] {
        preset.drift_compensation = gdc;
        let device = preset.device.build();
        let converter = aimc::device::WeightConverter::for_device(device.as_ref());
        let prog =
            AnalogMatrix::program_with_device(w.view(), &preset, device.clone(), 3, 9).unwrap();
        let lay = AnalogMatrix::layout(w.view(), &preset, device, 3, 9).unwrap();
        assert!(prog.num_blocks() > 1, "the test needs a split matrix");
        assert_eq!(lay.geometry(), prog.geometry());
        for ((b, p), g) in lay.blocks().iter().zip(prog.blocks()).zip(lay.geometry()) {
            assert!(b.is_layout() && !p.is_layout());
            assert_eq!((b.n_out(), b.n_in()), (p.n_out(), p.n_in()));
            assert_eq!(b.map_scale(), p.map_scale());
            assert_eq!(b.tensor_id(), p.tensor_id());
            let target = w.slice(ndarray::s![g.out_range.clone(), g.in_range.clone()]);
            let max_mapped = target
                .indexed_iter()
                .map(|((i, _), &v)| (v / b.map_scale()[i]).abs())
                .fold(0.0f32, f32::max);
            assert_eq!(b.conductance_scale_us(), converter.scale(max_mapped));
            assert_eq!(b.memory_bytes(), 0);
            assert!(b.weights().is_empty() && b.programmed_weights().is_empty());
            assert_eq!(b.drift_exponents().len(), p.drift_exponents().len());
            assert!(b.drift_exponents().iter().all(|nu| nu.is_empty()));
            assert!(p.memory_bytes() > 0);
            match gdc {
                aimc::tile::DriftCompensation::GlobalExact => {
                    assert_eq!(b.gdc_reference(), p.gdc_reference())
                }
                _ => assert!(b.gdc_reference().is_empty()),
            }
            assert!(b.gdc_alpha().iter().all(|&a| a == 1.0));
        }
    }
}

/// Running a layout is a caller bug, refused loudly instead of returning zeros.
#[test]
#[should_panic(expected = "crossbar layout")]
fn layout_refuses_to_run() {
    let preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let w = Array2::from_elem((8, 8), 0.5f32);
    let lay = aimc::tile::Crossbar::layout(w.view(), &preset, preset.device.build(), 1, 2).unwrap();
    let _ = lay.mvm(Array2::ones((1, 8)).view(), 0);
}

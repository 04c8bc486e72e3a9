//! CPU-only checks of the kernel design (run everywhere): the reference model of the kernels
//! (same tables and epilogue, exact operands) against the CPU crossbar path, also with the
//! kernels' fp16 operands emulated, with bound management and additive weight noise. Also the
//! host-side checks of the backend's interface that need no GPU: the error for a periphery the
//! kernels cannot run, the kernel parameter layouts, and how a backend request resolves.

use crate::support::{
    bound_managed_presets, cpu_moe_layer, drifted, hwa_experts, refs, rel_rms, routing,
    saturating_inputs, test_matrix, LAYER_REL_RMS_BOUND,
};
use aimc::backend::cuda::gemm::Precision;
use aimc::backend::cuda::grouped::GroupedMatrix;
use aimc::backend::cuda::periphery::GemmPeriphery;
use aimc::backend::cuda::CudaDevice;
use aimc::tile::{BoundManagement, TilePreset};
use ndarray::Array2;

/// ADC codes of `a` and `b` (outputs of one crossbar block, α_nm = 1): fraction differing and
/// the largest difference in steps.
fn code_diff(a: &Array2<f32>, b: &Array2<f32>, unit: impl Fn(usize) -> f32) -> (f64, i64) {
    let (mut differ, mut max_steps) = (0usize, 0i64);
    for (((_, c), _), (x, y)) in a.indexed_iter().zip(a.iter().zip(b.iter())) {
        let (cx, cy) = ((*x / unit(c)).round() as i64, (*y / unit(c)).round() as i64);
        differ += usize::from(cx != cy);
        max_steps = max_steps.max((cx - cy).abs());
    }
    (differ as f64 / a.len() as f64, max_steps)
}

#[test]
fn kernel_reference_reproduces_crossbar_adc_codes() {
    let (n, d, rows) = (256, 512, 48);
    let (preset, mats, grouped) = hwa_experts(2, (n, d), 40, 3, 500);
    let p = GemmPeriphery::from_spec(&preset.periphery).unwrap();
    let x = test_matrix(rows, d, 8, 0.4).mapv(|v| v.clamp(-1.0, 1.0));
    let step = preset.periphery.adc.unwrap().step();
    for (ex, mat) in mats.iter().enumerate() {
        let cpu = mat.mvm(x.view(), 6);
        let reference = aimc::backend::cuda::reference::grouped_rows(
            &grouped,
            ex,
            x.view(),
            Some(&p),
            None,
            3,
            6,
        );
        let (frac, steps) = code_diff(&cpu, &reference, |c| step * grouped.col_scale[ex * n + c]);
        println!(
            "kernel reference vs crossbar, expert {ex}: {:.4}% codes differ, max {steps} step(s)",
            100.0 * frac
        );
        assert!(frac < 1e-3 && steps <= 1, "{frac} {steps}");
    }
}

/// The operand precision the analog kernel uses (W̃ in fp16, which the crossbars' binary16 W̃
/// makes exact; the side products' derived inputs x̃², x̃·f(j) in fp16) keeps ADC codes within
/// the parity bound of the GPU backend (< 0.1 % differ, by ≤ 1 step: rarer than the flips the
/// output noise causes).
#[test]
fn f16_operands_keep_adc_codes_within_bound() {
    let (n, d, rows) = (256, 512, 64);
    let (preset, mats, grouped) = hwa_experts(2, (n, d), 70, 5, 900);
    let p = GemmPeriphery::from_spec(&preset.periphery).unwrap();
    let x = test_matrix(rows, d, 11, 0.4).mapv(|v| v.clamp(-1.0, 1.0));
    let step = preset.periphery.adc.unwrap().step();
    // The crossbars' W̃ are binary16 values: fp16 operands hold them exactly.
    assert!(grouped
        .weights
        .iter()
        .all(|&w| aimc::tile::operand::to_binary16(w) == w));
    let mut worst = (0.0f64, 0i64);
    for (ex, mat) in mats.iter().enumerate() {
        let cpu = mat.mvm(x.view(), 1);
        let emulated = aimc::backend::cuda::reference::grouped_rows(
            &grouped,
            ex,
            x.view(),
            Some(&p),
            Some(Precision::AnalogF16),
            5,
            1,
        );
        let (frac, steps) = code_diff(&cpu, &emulated, |c| step * grouped.col_scale[ex * n + c]);
        worst = (worst.0.max(frac), worst.1.max(steps));
    }
    println!(
        "emulated fp16 operands vs CPU crossbar: {:.4}% codes differ (max {} step)",
        100.0 * worst.0,
        worst.1
    );
    assert!(worst.0 < 1e-3 && worst.1 <= 1, "{worst:?}");
}

#[test]
fn kernel_reference_matches_tiled_matrix_with_abs_max() {
    let mut preset = TilePreset::resolve("standard-hwa").unwrap();
    preset.periphery.noise_management = aimc::tile::NoiseManagement::AbsMax;
    // 640 outputs → 2 crossbars of 320 columns; 1024 inputs → 2 crossbars of 512 rows.
    let (n, d, rows) = (640, 1024, 24);
    let mat = drifted(&preset, test_matrix(n, d, 60, 0.05).view(), 4, 700, 86400.0);
    let grouped = GroupedMatrix::from_analog(&[&mat]).unwrap();
    assert_eq!(grouped.col_block_cols[0], 320);
    assert_eq!(grouped.col_local[330], 10);
    let p = GemmPeriphery::from_spec(&preset.periphery).unwrap();
    let x = test_matrix(rows, d, 9, 1.0);
    let cpu = mat.mvm(x.view(), 2);
    let reference =
        aimc::backend::cuda::reference::grouped_rows(&grouped, 0, x.view(), Some(&p), None, 4, 2);
    let rel = rel_rms(reference.iter(), cpu.iter());
    println!("kernel reference vs 2×2-block crossbar matrix (ABS_MAX): rel. RMS {rel:.2e}");
    assert!(rel <= 1e-5, "{rel}");
}

#[test]
fn kernel_reference_layer_matches_per_expert_crossbars() {
    let preset = TilePreset::resolve("standard-hwa").unwrap();
    let (t, k, e, n, d, seed, mvm_id) = (40, 2, 3, 128, 512, 8u64, 3u32);
    let program = |rows, cols, id: u32| {
        drifted(
            &preset,
            test_matrix(rows, cols, id, 0.04).view(),
            seed,
            id,
            60.0,
        )
    };
    let gates: Vec<_> = (0..e as u32).map(|i| program(n, d, 800 + 3 * i)).collect();
    let ups: Vec<_> = (0..e as u32).map(|i| program(n, d, 801 + 3 * i)).collect();
    let downs: Vec<_> = (0..e as u32).map(|i| program(d, n, 802 + 3 * i)).collect();
    let x = test_matrix(t, d, 10, 0.3).mapv(|v| v.clamp(-1.0, 1.0));
    let (experts, weights) = routing(t, k, e);
    let y_cpu = cpu_moe_layer([&gates, &ups, &downs], &x, (&experts, &weights, k), mvm_id);
    let gate_up = GroupedMatrix::interleave_swiglu(
        &GroupedMatrix::from_analog(&refs(&gates)).unwrap(),
        &GroupedMatrix::from_analog(&refs(&ups)).unwrap(),
    )
    .unwrap();
    let down = GroupedMatrix::from_analog(&refs(&downs)).unwrap();
    let p = GemmPeriphery::from_spec(&preset.periphery).unwrap();
    let y = aimc::backend::cuda::reference::moe_layer(
        &gate_up,
        &down,
        Some(&p),
        None,
        seed,
        mvm_id,
        x.view(),
        &experts,
        &weights,
        k,
    );
    let rel = rel_rms(y.iter(), y_cpu.iter());
    println!("kernel reference MoE layer vs per-expert crossbars: rel. RMS {rel:.2e}");
    assert!(rel <= 1e-5, "{rel}");
    // With the analog kernel's operand rounding emulated, the layer stays inside the bound
    // the GPU test asserts (LAYER_REL_RMS_BOUND).
    let emulated = aimc::backend::cuda::reference::moe_layer(
        &gate_up,
        &down,
        Some(&p),
        Some(Precision::AnalogF16),
        seed,
        mvm_id,
        x.view(),
        &experts,
        &weights,
        k,
    );
    let rel = rel_rms(emulated.iter(), y_cpu.iter());
    println!("emulated fp16 MoE layer vs per-expert crossbars: rel. RMS {rel:.2e} (bound {LAYER_REL_RMS_BOUND:.0e})");
    assert!(rel <= LAYER_REL_RMS_BOUND, "{rel}");
}

#[test]
fn unsupported_periphery_is_a_clear_error() {
    let mut preset = TilePreset::resolve("aihwkit-default").unwrap();
    // Iterative bound management is supported; a DAC whose codes fp16 cannot hold is not.
    GemmPeriphery::from_spec(&preset.periphery).unwrap();
    preset.periphery.dac.as_mut().unwrap().bits = 12;
    let err = GemmPeriphery::from_spec(&preset.periphery)
        .unwrap_err()
        .to_string();
    assert!(err.contains("periphery.dac.bits"), "{err}");
}

#[test]
fn kernel_reference_matches_crossbars_with_bound_management_and_additive_noise() {
    // 2 crossbar blocks along K and 2 along N: bound management acts per crossbar row.
    let (n, d, rows, seed, mvm_id) = (768, 1024, 24, 5u64, 2u32);
    let w = test_matrix(n, d, 900, 0.04);
    let x = saturating_inputs(&w, rows, 901);
    for preset in bound_managed_presets() {
        let mat = drifted(&preset, w.view(), seed, 77, 3600.0);
        let cpu = mat.mvm(x.view(), mvm_id);
        let grouped = GroupedMatrix::from_analog(&[&mat]).unwrap();
        assert!(grouped.n_xbar >= 2);
        let p = GemmPeriphery::from_spec(&preset.periphery).unwrap();
        let reference = aimc::backend::cuda::reference::grouped_rows(
            &grouped,
            0,
            x.view(),
            Some(&p),
            None,
            seed,
            mvm_id,
        );
        let rel = rel_rms(reference.iter(), cpu.iter());
        // Outputs off by more than f32 rounding: one-step ADC flips where the two summation
        // orders straddle a code boundary (< 0.1 % of outputs, the parity rule of docs/model.md §3). A wrong
        // bound-management path would change whole crossbar rows (≥ 256 outputs = 1.4 %).
        let y_max = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let flips = reference
            .iter()
            .zip(cpu.iter())
            .filter(|(a, b)| (*a - *b).abs() > 1e-5 * y_max)
            .count();
        let flip_frac = flips as f64 / cpu.len() as f64;
        // Bound management acted: the same crossbars without it give other outputs.
        let mut plain = preset.clone();
        plain.periphery.bound_management = BoundManagement::None;
        let unmanaged = drifted(&plain, w.view(), seed, 77, 3600.0).mvm(x.view(), mvm_id);
        let effect = rel_rms(unmanaged.iter(), cpu.iter());
        println!(
            "{}: kernel reference vs crossbars rel. RMS {rel:.2e}, {flips} ADC flips ({:.3}%); \
             bound management changes the outputs by {effect:.2e}",
            preset.name,
            100.0 * flip_frac
        );
        assert!(flip_frac < 1e-3 && rel <= 1e-3, "{}: {rel}", preset.name);
        assert!(
            effect > 1e-3,
            "{}: bound management never acted",
            preset.name
        );
    }
}

#[test]
fn kernel_parameter_structs_match_the_cuda_layout() {
    // Sizes NVRTC reports for the .param of moe_gemm and program_weights (compute_90 PTX).
    assert_eq!(aimc::backend::cuda::gemm::GEMM_PARAMS_BYTES, 344);
    assert_eq!(
        std::mem::size_of::<aimc::backend::cuda::program::PcmParams>(),
        56
    );
}

#[test]
fn backend_request_cuda_errors_and_auto_falls_back_without_a_gpu() {
    use aimc::backend::{BackendRequest, Execution};
    assert!(!Execution::resolve(BackendRequest::Cpu).unwrap().has_gpu());
    if CudaDevice::open(0).is_err() {
        let err = Execution::resolve(BackendRequest::Cuda)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--backend cuda"), "{err}");
        assert!(!Execution::resolve(BackendRequest::Auto).unwrap().has_gpu());
    } else {
        let auto = Execution::resolve(BackendRequest::Auto).unwrap();
        assert!(auto.has_gpu());
        // A preset the kernels cannot run (12-bit DAC codes are not exact fp16 operands): CPU
        // under auto, an error naming the field under cuda.
        let mut preset = TilePreset::resolve("aihwkit-default").unwrap();
        assert!(auto.gpu_for(&preset).unwrap().is_some());
        preset.periphery.dac.as_mut().unwrap().bits = 12;
        assert!(auto.gpu_for(&preset).unwrap().is_none());
        let cuda = Execution::resolve(BackendRequest::Cuda).unwrap();
        let err = cuda.gpu_for(&preset).unwrap_err().to_string();
        assert!(err.contains("periphery.dac.bits"), "{err}");
    }
}

//! The programmed and drifted expert state of a whole model on the GPU, observed through the
//! routed experts of a MoE layer (`LayerProbe`): drift on the GPU against drift on the CPU and
//! upload, programming on the GPU against the CPU's, and the transient and streamed residencies
//! against the resident one.

use crate::common;
use crate::support::{gpu, routing, sorted_row_diffs, test_matrix};
use aimc::backend::cuda::gemm::Precision;
use aimc::backend::cuda::CudaDevice;
use aimc::tile::TilePreset;
use ndarray::Array2;

/// Random top-k routed rows for one MoE layer of `cfg` (`routing`, `test_matrix(t, d, id, 1.0)`)
/// on the device, run through the routed experts of a [`GpuExperts`].
struct LayerProbe {
    assignments: Vec<aimc::model::Assignment>,
    x_dev: cudarc::driver::CudaSlice<f32>,
    t: usize,
    d: usize,
    e: usize,
}

impl LayerProbe {
    fn new(dev: &CudaDevice, cfg: &aimc::model::ModelConfig, t: usize, id: u32) -> Self {
        let (k, e, d) = (cfg.top_k, cfg.num_experts, cfg.hidden_size);
        let (experts_of, weights) = routing(t, k, e);
        let assignments = (0..t * k)
            .map(|p| aimc::model::Assignment {
                token: (p / k) as u32,
                expert: experts_of[p],
                weight: weights[p],
            })
            .collect();
        let x = test_matrix(t, d, id, 1.0);
        let x_dev = dev.upload(x.as_slice().unwrap()).unwrap();
        Self {
            assignments,
            x_dev,
            t,
            d,
            e,
        }
    }

    /// The routed experts of `layer` in `g` on the probe rows, MVM call `call`.
    fn run(
        &self,
        dev: &CudaDevice,
        g: &aimc::backend::cuda::experts::GpuExperts,
        layer: usize,
        call: u32,
    ) -> Array2<f32> {
        use aimc::backend::cuda::experts::SequenceKeys;
        let y = g
            .routed_on_device(
                layer,
                &self.x_dev,
                self.t,
                &self.assignments,
                self.e,
                SequenceKeys::single(call),
            )
            .unwrap()
            .expect("layer on the GPU");
        Array2::from_shape_vec((self.t, self.d), dev.download(&y).unwrap()).unwrap()
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_drift_matches_cpu_drift_and_upload() {
    use aimc::backend::cpu::AnalogExperts;
    use aimc::backend::cuda::experts::GpuExperts;
    use aimc::tile::DriftCompensation;
    let dev = gpu("drift on the GPU");
    let (model, _) = common::embedded_model_and_tokens(16);
    let cfg = &model.config;
    let t = 384;
    let probe = LayerProbe::new(&dev, cfg, t, 41);
    let layer = (0..cfg.num_layers).find(|&l| cfg.moe_layers[l]).unwrap();
    let (mut failures, mut worst_scale, mut worst_words) = (Vec::new(), 0.0f32, 0usize);
    let (mut scales, mut scales_off) = (0usize, 0usize);
    let mut cases = Vec::new();
    for name in ["standard-hwa", "pcm-3d-8tier"] {
        for gdc in [
            DriftCompensation::Global,
            DriftCompensation::GlobalPerColumn,
            DriftCompensation::GlobalExact,
            DriftCompensation::None,
        ] {
            let mut p = TilePreset::resolve(name).unwrap();
            p.drift_compensation = gdc;
            cases.push(p);
        }
    }
    for preset in cases {
        let mapping = common::default_mapping(&model, &preset);
        let seed = 5;
        let program = || AnalogExperts::program(&model, &mapping, &preset, seed).unwrap();
        let on_gpu = program();
        let mut g = GpuExperts::program(&dev, &on_gpu, &preset, Precision::AnalogF16).unwrap();
        let mut on_cpu = program();
        for t_s in [0.0, 30.0 * 86_400.0] {
            g.drift_to(t_s).unwrap();
            on_cpu.drift_to(t_s);
            let u =
                GpuExperts::upload(&dev, &on_cpu, &preset.periphery, Precision::AnalogF16).unwrap();
            let (y_gpu, y_cpu) = (probe.run(&dev, &g, layer, 9), probe.run(&dev, &u, layer, 9));
            // Where a difference comes from: the weights' operand words and the scales.
            let (lg, lu) = (g.layer(layer).unwrap(), u.layer(layer).unwrap());
            for (what, mg, mu) in [
                ("gate/up", &lg.gate_up, &lu.gate_up),
                ("down", &lg.down, &lu.down),
            ] {
                let (wg, wu) = (mg.weight_bits(&dev).unwrap(), mu.weight_bits(&dev).unwrap());
                let w_diff = wg.iter().zip(&wu).filter(|(a, b)| a != b).count();
                let (sg, su) = (mg.col_scale(&dev).unwrap(), mu.col_scale(&dev).unwrap());
                let rel: Vec<f32> = sg
                    .iter()
                    .zip(&su)
                    .map(|(a, b)| ((a - b) / b).abs())
                    .collect();
                let s_rel = rel.iter().copied().fold(0.0f32, f32::max);
                let s_off = rel.iter().filter(|&&r| r > 1e-6).count();
                println!(
                    "  {what}: {w_diff} of {} weight words differ; {s_off} of {} scales differ by > 1e-6 \
                     (max rel. diff {s_rel:.2e})",
                    wg.len(),
                    sg.len()
                );
                worst_scale = worst_scale.max(s_rel);
                scales_off += s_off;
                scales += sg.len();
                worst_words += w_diff;
            }
            let per_token = sorted_row_diffs(&y_gpu, &y_cpu);
            let off = per_token.iter().filter(|&&r| r > 1e-2).count();
            println!(
                "{} GDC {:?}, t = {t_s} s: GPU drift vs CPU drift + upload, per-token rel. diff median {:.2e}, \
                 max {:.2e}, {off}/{t} tokens > 1e-2",
                preset.name,
                preset.drift_compensation,
                per_token[t / 2],
                per_token[t - 1]
            );
            if per_token[t / 2] > 1e-5 || off * 20 > t {
                failures.push(format!(
                    "{} {:?} t = {t_s}: median {:.2e}, {off} tokens",
                    preset.name,
                    preset.drift_compensation,
                    per_token[t / 2]
                ));
            }
        }
    }
    // Drift and read noise agree to the ulp (programming_and_drift_match_the_cpu: powf rounds
    // differently in a few weights, ≤ 15 of 10⁶ fp16 words here); the GDC means are f64 sums on
    // both sides, so α agrees except where a readout output's ADC code flipped (0.007 %).
    // α moves where a readout output's ADC code flipped (≈ 1e-4 of codes): a per-column α by
    // up to one step over its 256 outputs (~2e-3), a crossbar's by ~1e-7. A wrong readout or
    // mean would move every scale (the f32 sequential mean did: ~1e-4 on all of them).
    println!(
        "weight words differing {worst_words}; scales differing by > 1e-6: {scales_off} of {scales} \
         (max {worst_scale:.2e})"
    );
    assert!(worst_words * 10_000 <= 1_572_864 * 16, "{worst_words}");
    assert!(scales_off * 50 <= scales, "{scales_off} of {scales}");
    assert!(worst_scale <= 5e-3, "{worst_scale}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The programmed state recomputed per drift point (`Residency::Transient`, what a model too
/// large for a resident state runs), also from digital weights uploaded per use
/// (`Residency::Streamed`), gives the resident path's programmed state, operands and scales
/// bit for bit (and so the layer outputs, up to the order of the atomic
/// scatter-add), from a layout (no CPU programming), across a reseed and two drift times.
#[test]
#[ignore = "needs a CUDA GPU"]
fn transient_and_streamed_state_is_bit_identical_to_resident() {
    use aimc::backend::cpu::AnalogExperts;
    use aimc::backend::cuda::experts::GpuExperts;
    use aimc::backend::cuda::programmed::Residency;
    use aimc::tile::DriftCompensation;
    let dev = gpu("programmed state per drift point");
    let (model, _) = common::embedded_model_and_tokens(16);
    let cfg = &model.config;
    let t = 256;
    let probe = LayerProbe::new(&dev, cfg, t, 47);
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&l| cfg.moe_layers[l]).collect();
    for (name, gdc) in [
        ("pcm-3d-8tier", DriftCompensation::Global),
        ("standard-hwa", DriftCompensation::GlobalPerColumn),
        ("pcm-3d-8tier", DriftCompensation::GlobalExact),
    ] {
        let mut preset = TilePreset::resolve(name).unwrap();
        preset.drift_compensation = gdc;
        let mapping = common::default_mapping(&model, &preset);
        let layout =
            AnalogExperts::layout(&model, &mapping, &preset, preset.device.build(), 11).unwrap();
        let build = |r| {
            GpuExperts::program_with(&dev, &layout, &preset, Precision::AnalogF16, Some(r)).unwrap()
        };
        let mut all = Residency::ALL.map(build);
        assert_eq!(
            all.each_ref().map(|g| g.residency()),
            Residency::ALL.map(Some)
        );
        for seed in [11, 23] {
            for g in &mut all {
                g.reprogram(seed).unwrap();
            }
            let (res, others) = all.split_first_mut().expect("three residencies");
            let l0 = moe_layers[0];
            for other in others.iter() {
                assert_eq!(
                    res.programmed_state(l0).unwrap().unwrap(),
                    other.programmed_state(l0).unwrap().unwrap(),
                    "{name} {gdc:?} seed {seed} {:?}: programmed state",
                    other.residency()
                );
            }
            for t_s in [0.0, 86_400.0 * 365.0] {
                res.drift_to(t_s).unwrap();
                for other in others.iter_mut() {
                    other.drift_to(t_s).unwrap();
                }
                for &l in &moe_layers {
                    let ya = probe.run(&dev, res, l, 5);
                    assert!(ya.iter().all(|v| v.is_finite()));
                    let top = ya.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for other in others.iter() {
                        let (a, b) = (res.layer(l).unwrap(), other.layer(l).unwrap());
                        for (ma, mb) in [(&a.gate_up, &b.gate_up), (&a.down, &b.down)] {
                            assert_eq!(
                                ma.weight_bits(&dev).unwrap(),
                                mb.weight_bits(&dev).unwrap()
                            );
                            assert_eq!(ma.col_scale(&dev).unwrap(), mb.col_scale(&dev).unwrap());
                        }
                        // Equal operands give equal products; the weighted scatter-add of the
                        // k experts of a token is a float atomicAdd, whose order varies run to
                        // run: ≤ k rounding steps of the largest output.
                        let yb = probe.run(&dev, other, l, 5);
                        let diff = ya
                            .iter()
                            .zip(&yb)
                            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        let bound = cfg.top_k as f32 * f32::EPSILON * top;
                        assert!(
                            diff <= bound,
                            "{name} {gdc:?} seed {seed} t {t_s} layer {l} {:?}: max |Δy| {diff:e} > {bound:e}",
                            other.residency()
                        );
                    }
                }
            }
        }
        println!(
            "{name} {gdc:?}: transient and streamed programmed state = resident (state, operands, scales; \
             outputs within the scatter-add reordering; {} MoE layers, 2 seeds × 2 times)",
            moe_layers.len()
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_programming_matches_cpu_programming() {
    use aimc::backend::cpu::AnalogExperts;
    use aimc::backend::cuda::experts::GpuExperts;
    use aimc::backend::cuda::programmed::cpu_programmed_state;
    use aimc::tile::DriftCompensation;
    let dev = gpu("programming on the GPU");
    let (model, _) = common::embedded_model_and_tokens(16);
    let cfg = &model.config;
    let t = 256;
    let probe = LayerProbe::new(&dev, cfg, t, 43);
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&l| cfg.moe_layers[l]).collect();
    let mut failures = Vec::new();
    let (mut ref_off, mut refs, mut worst_ref) = (0usize, 0usize, 0.0f32);
    for (name, gdc) in [
        ("standard-hwa", DriftCompensation::Global),
        ("pcm-3d-8tier", DriftCompensation::GlobalPerColumn),
        ("standard-hwa", DriftCompensation::GlobalExact),
        ("pcm-3d-8tier", DriftCompensation::None),
    ] {
        let mut preset = TilePreset::resolve(name).unwrap();
        preset.drift_compensation = gdc;
        let mapping = common::default_mapping(&model, &preset);
        let (first_seed, seed) = (11, 23);
        let first = AnalogExperts::program(&model, &mapping, &preset, first_seed).unwrap();
        let mut g = GpuExperts::program(&dev, &first, &preset, Precision::AnalogF16).unwrap();
        g.reprogram(seed).unwrap();
        assert_eq!(g.seed(), seed);
        let mut on_cpu = AnalogExperts::program(&model, &mapping, &preset, seed).unwrap();
        // The programmed state: W̃_prog and the scales as the CPU's to the ulp (no powf in
        // programming), ν to a few ulps (logf), the GDC reference where no readout ADC code flipped.
        for &l in &moe_layers {
            let (got, exp) = (
                g.programmed_state(l).unwrap().unwrap(),
                cpu_programmed_state(&on_cpu, l).unwrap().unwrap(),
            );
            for (what, a, b) in [("gate/up", &got[0], &exp[0]), ("down", &got[1], &exp[1])] {
                let max_rel = |x: &[f32], y: &[f32]| {
                    let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
                    x.iter()
                        .zip(y)
                        .map(|(p, q)| (p - q).abs() / scale)
                        .fold(0.0f32, f32::max)
                };
                let (dw, dnu, ds) = (
                    max_rel(&a.0, &b.0),
                    max_rel(&a.1, &b.1),
                    max_rel(&a.2, &b.2),
                );
                let rel: Vec<f32> =
                    a.3.iter()
                        .zip(&b.3)
                        .map(|(p, q)| ((p - q) / q).abs())
                        .collect();
                let off = rel.iter().filter(|&&r| r > 1e-6).count();
                worst_ref = rel.iter().copied().fold(worst_ref, f32::max);
                ref_off += off;
                refs += rel.len();
                if l == moe_layers[0] {
                    println!(
                        "{name} {gdc:?} layer {l} {what}: W̃_prog {dw:.1e}, ν {dnu:.1e}, scales {ds:.1e} \
                         (max rel. to the largest); GDC references off by > 1e-6: {off} of {}",
                        rel.len()
                    );
                }
                if dw > 1e-6 || dnu > 1e-5 || ds > 1e-6 {
                    failures.push(format!(
                        "{name} {gdc:?} layer {l} {what}: {dw:.1e} {dnu:.1e} {ds:.1e}"
                    ));
                }
            }
        }
        // The same layer outputs after drift as the CPU-programmed crossbars drifted on the
        // CPU and uploaded.
        for t_s in [0.0, 30.0 * 86_400.0] {
            g.drift_to(t_s).unwrap();
            on_cpu.drift_to(t_s);
            let want =
                GpuExperts::upload(&dev, &on_cpu, &preset.periphery, Precision::AnalogF16).unwrap();
            let (y_g, y_w) = (
                probe.run(&dev, &g, moe_layers[0], 4),
                probe.run(&dev, &want, moe_layers[0], 4),
            );
            let per_token = sorted_row_diffs(&y_g, &y_w);
            let off = per_token.iter().filter(|&&r| r > 1e-2).count();
            println!(
                "{name} {gdc:?} t = {t_s} s: reprogrammed vs CPU-programmed layer, per-token median {:.2e}, {off}/{t} > 1e-2",
                per_token[t / 2]
            );
            if per_token[t / 2] > 1e-5 || off * 20 > t {
                failures.push(format!(
                    "{name} {gdc:?} t = {t_s}: median {:.2e}, {off} tokens",
                    per_token[t / 2]
                ));
            }
        }
    }
    // A wrong seed, key or target moves every weight by ~the programming noise (≫ 1e-6).
    println!("GDC references off by > 1e-6: {ref_off} of {refs} (max {worst_ref:.2e})");
    assert!(ref_off * 50 <= refs, "{ref_off} of {refs}");
    assert!(worst_ref <= 5e-3, "{worst_ref}");
    assert!(failures.is_empty(), "{failures:#?}");
}

//! The device primitives the backend builds on, each against its host counterpart: opening a
//! device (and the error when there is none), the staged host-to-device upload, the Philox
//! streams (bit-identical to the CPU's), and programming and drifting one crossbar block.

use crate::support::{gpu, test_matrix};
use aimc::backend::cuda::program::GpuProgrammedBlock;
use aimc::backend::cuda::{rng as gpu_rng, CudaDevice, CudaError};
use aimc::rng::{Purpose, Stream};
use aimc::tile::{Crossbar, TilePreset};

/// The staged upload (pinned double buffer) writes the concatenation of its parts exactly,
/// across chunk boundaries that fall inside parts, at an offset, with empty parts; and is an
/// error, not a panic, past the end of the buffer.
#[test]
#[ignore = "needs a CUDA GPU"]
fn staged_upload_writes_the_parts_exactly() {
    let dev = gpu("staged upload");
    let stage = 16usize << 20; // device.rs STAGE_ELEMS
    let sizes = [5, stage + 3, 0, 2 * stage - 1, 7, stage / 2];
    let parts: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(p, &n)| (0..n).map(|i| (p * 1_000_003 + i) as f32).collect())
        .collect();
    let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
    let total: usize = sizes.iter().sum();
    let offset = 11;
    let mut dst = dev.zeros::<f32>(offset + total + 4).unwrap();
    let clock = std::time::Instant::now();
    dev.upload_staged(&refs, &mut dst, offset).unwrap();
    let back = dev.download(&dst).unwrap();
    let secs = clock.elapsed().as_secs_f64();
    let want: Vec<f32> = std::iter::repeat_n(0.0, offset)
        .chain(parts.iter().flatten().copied())
        .chain(std::iter::repeat_n(0.0, 4))
        .collect();
    let differ = back.iter().zip(&want).filter(|(a, b)| a != b).count();
    println!(
        "staged upload of {total} f32 in {} parts: {differ} differ; {:.1} GB/s (first use, pinned buffers allocated)",
        sizes.len(),
        4.0 * total as f64 / secs / 1e9
    );
    assert_eq!(differ, 0);
    // Again, timed without the allocation; and past the end is an error.
    let clock = std::time::Instant::now();
    dev.upload_staged(&refs, &mut dst, offset).unwrap();
    dev.synchronize().unwrap();
    println!(
        "staged upload again: {:.1} GB/s",
        4.0 * total as f64 / clock.elapsed().as_secs_f64() / 1e9
    );
    assert!(dev.upload_staged(&refs, &mut dst, offset + 5).is_err());
}

#[test]
fn missing_gpu_is_a_clear_error_not_a_panic() {
    match CudaDevice::open(0) {
        Ok(d) => println!("GPU present: {}", d.name()),
        Err(e) => {
            assert!(
                matches!(
                    e,
                    CudaError::NoDriver | CudaError::NoNvrtc | CudaError::NoDevice { .. }
                ),
                "{e}"
            );
            assert!(CudaDevice::discover().is_none());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn philox_uniforms_and_normals_bit_identical() {
    let dev = gpu("philox");
    // Start just below call 2^32 so the high call bits (word 3) are exercised too.
    let start = (1u64 << 34) - 4096 + 1;
    let n = 1 << 20;
    let (seed, tid, mvm) = (0x1234_5678_9abc_def0u64, 77u32, 5u32);
    let stream = Stream::new(seed, Purpose::OutputNoise, tid);
    let u = dev
        .download(
            &gpu_rng::fill_uniform(&dev, seed, Purpose::OutputNoise, tid, start, n, mvm).unwrap(),
        )
        .unwrap();
    for (i, v) in u.iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            stream.uniform(start + i as u64, mvm).to_bits(),
            "uniform {i}"
        );
    }
    // The normals of every purpose's stream (the table transform of each word), at attempts 0
    // and 3.
    for purpose in [
        Purpose::ProgramNoise,
        Purpose::DriftExponent,
        Purpose::ReadNoise,
        Purpose::OutputNoise,
        Purpose::ShortTermWeightNoise,
        Purpose::TestData,
    ] {
        for attempt in [0u8, 3] {
            let stream = Stream::new(seed, purpose, tid);
            let z = dev
                .download(
                    &gpu_rng::fill_normal(&dev, seed, purpose, tid, start, n, mvm, attempt)
                        .unwrap(),
                )
                .unwrap();
            let mut cpu = vec![0.0f32; n];
            stream.fill_normal(start, mvm, attempt, &mut cpu);
            let differ = z
                .iter()
                .zip(&cpu)
                .filter(|(g, c)| g.to_bits() != c.to_bits())
                .count();
            println!(
                "philox {purpose:?} attempt {attempt}: {n} normals, {differ} not bit-identical"
            );
            for (i, (g, c)) in z.iter().zip(&cpu).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    c.to_bits(),
                    "{purpose:?} normal {i}: gpu {g:e}, cpu {c:e}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn programming_and_drift_match_the_cpu() {
    let dev = gpu("program");
    let preset = TilePreset::resolve("standard-hwa").unwrap();
    let w = test_matrix(128, 256, 1, 0.05);
    let (seed, tid) = (7u64, 31u32);
    let mut xbar = Crossbar::program(w.view(), &preset, seed, tid).unwrap();
    let mut target = w.clone();
    for (mut row, s) in target.rows_mut().into_iter().zip(xbar.map_scale()) {
        row.mapv_inplace(|x| x / s);
    }
    let block =
        GpuProgrammedBlock::program(&dev, &preset.device, target.as_slice().unwrap(), seed, tid)
            .unwrap();
    let prog = dev.download(&block.w_prog).unwrap();
    let bound = |w: &[f32]| 1e-5 * w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let cpu_prog = xbar.programmed_weights().to_owned();
    let d_prog = max_diff(&prog, cpu_prog.as_slice().unwrap());
    let rel = (block.g_scale_us - xbar.conductance_scale_us()).abs() / xbar.conductance_scale_us();
    for t in [3600.0, 86400.0 * 365.0] {
        xbar.drift_to(t);
        let drifted = dev.download(&block.drift_to(&dev, t).unwrap()).unwrap();
        let cpu = xbar.weights().to_owned();
        // W̃ is binary16 on both backends (rounded once after drift). Before rounding the two
        // agree to ~1e-7 relative (ν differs by powf/logf), so an element differs only where
        // that straddles a rounding boundary: by one binary16 step (≤ 2⁻¹⁰ relative), rarely.
        let to16 = aimc::tile::operand::to_binary16;
        assert!(drifted.iter().all(|&v| to16(v) == v), "GPU W̃ not binary16");
        let (mut differ, mut worst) = (0usize, 0.0f32);
        for (g, c) in drifted.iter().zip(cpu.iter()) {
            if g != c {
                differ += 1;
                let step = 2f32.powi(-10) * g.abs().max(c.abs()) + 2f32.powi(-24);
                worst = worst.max((g - c).abs() / step);
            }
        }
        println!(
            "program: t = {t} s: {differ} of {} binary16 W̃ differ, by at most {worst:.2} step",
            drifted.len()
        );
        assert!(
            worst <= 1.0 && differ * 1000 <= drifted.len(),
            "drift at {t} s"
        );
    }
    println!(
        "program: max |ΔW̃_prog| = {d_prog:.3e} (bound 1e-5·max|W̃| = {:.3e}); conductance scale rel. diff {rel:.2e}",
        bound(cpu_prog.as_slice().unwrap())
    );
    assert!(d_prog <= bound(cpu_prog.as_slice().unwrap()));
    assert!(rel <= 1e-6);
}

//! Same seed ⇒ bit-identical results across runs and rayon thread counts (docs/model.md §6).
use aimc::tile::{AnalogMatrix, TilePreset};
use ndarray::Array2;

fn run(preset: &TilePreset, seed: u64) -> Vec<u32> {
    let w = Array2::from_shape_fn((300, 700), |(i, j)| {
        ((i * 37 + j * 11) % 101) as f32 / 50.0 - 1.0
    });
    let x = Array2::from_shape_fn((130, 700), |(b, j)| {
        ((b * 7 + j * 3) % 29) as f32 / 14.0 - 1.0
    });
    let mut m = AnalogMatrix::program(w.view(), preset, seed, 3).unwrap();
    m.drift_to(86_400.0);
    let y = m.mvm(x.view(), 7);
    y.iter().map(|v| v.to_bits()).collect()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn bit_identical_across_runs_and_thread_counts() {
    for name in ["standard-hwa", "aihwkit-default", "hermes", "reram-cmo"] {
        let preset = TilePreset::builtin(name).unwrap();
        let one = in_pool(1, || run(&preset, 11));
        let two = in_pool(2, || run(&preset, 11));
        let again = in_pool(2, || run(&preset, 11));
        assert_eq!(one, two, "{name}: 1 vs 2 threads");
        assert_eq!(two, again, "{name}: two runs");
        let other = in_pool(2, || run(&preset, 12));
        assert_ne!(
            one, other,
            "{name}: a different seed must change the result"
        );
    }
}

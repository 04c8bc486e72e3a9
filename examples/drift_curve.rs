//! One 512×512 crossbar, no model: relative MVM error against the ideal product over drift time, for two presets.
//!
//! `cargo run --release --example drift_curve`
use aimc::tile::{Crossbar, TilePreset};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn main() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let w = Array2::from_shape_fn((512, 512), |_| rng.sample::<f32, _>(StandardNormal) * 0.1);
    let x = Array2::from_shape_fn((256, 512), |_| rng.random_range(-1.0f32..1.0));
    let times = [0.0, 60.0, 3600.0, 86_400.0, 2_592_000.0, 31_536_000.0];
    println!("{:>12} {:>16} {:>16}", "t [s]", "aihwkit-default", "hermes");
    let mut crossbars = Vec::new();
    for name in ["aihwkit-default", "hermes"] {
        let preset = TilePreset::builtin(name)?;
        // HERMES tiles are 256×256: use the top-left corner so both presets see one crossbar.
        let (r, c) = (preset.stack.rows.min(512), preset.stack.cols.min(512));
        let block = w.slice(ndarray::s![..c, ..r]).to_owned();
        crossbars.push((Crossbar::program(block.view(), &preset, 7, 0)?, r, c));
    }
    for t in times {
        let mut errs = Vec::new();
        for (xbar, r, c) in &mut crossbars {
            xbar.drift_to(t);
            let xs = x.slice(ndarray::s![.., ..*r]);
            let y = xbar.mvm(xs, 0);
            let want = xs.dot(&w.slice(ndarray::s![..*c, ..*r]).t());
            let err: f32 = (&y - &want).iter().map(|v| v * v).sum::<f32>().sqrt();
            let n: f32 = want.iter().map(|v| v * v).sum::<f32>().sqrt();
            errs.push(err / n);
        }
        println!("{t:>12} {:>16.4} {:>16.4}", errs[0], errs[1]);
    }
    Ok(())
}

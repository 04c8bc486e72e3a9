//! The CPU throughput benchmark of the digital model, run by hand (timings are no test):
//! `RAYON_NUM_THREADS=2 CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test --test model_bench -- --ignored --nocapture`
//! prints the markdown tables recorded in `reports/bench/*-model-cpu.md`. It measures the trained
//! `kjv-moe` checkpoint when `$AIMC_KJV_MOE` names it, and always a random model of the reference
//! size of the throughput target ([`SyntheticSpec::REFERENCE`]).
use aimc::eval::bench::{model_bench, synthetic_olmoe, SyntheticSpec};
use aimc::model::Model;

#[test]
#[ignore = "benchmark: run by hand, see the file header"]
fn model_cpu_benchmark() {
    let (seq_len, batch, reps) = (512, 4, 9);
    let synthetic = synthetic_olmoe(&SyntheticSpec::REFERENCE, 1);
    let desc = "random OLMoE-style, hidden 256, 4 layers, 16 experts × 128, top-4, vocab 4096";
    println!("{}", model_bench(&synthetic, desc, seq_len, batch, reps));
    if let Some(dir) = std::env::var_os("AIMC_KJV_MOE") {
        let model = Model::load(std::path::Path::new(&dir)).unwrap();
        println!(
            "{}",
            model_bench(
                &model,
                "kjv-moe (trained, bf16 → f32)",
                seq_len,
                batch,
                reps
            )
        );
    }
}

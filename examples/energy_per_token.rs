//! Energy, latency and throughput per token on the default costed preset (`aimc-3d`, the paper's system: every
//! linear layer on analog tiers) beside the H100 roofline, with the resource that binds each batch: the embedded
//! model (routing trace from its own router) and an OLMoE-1B-7B-sized configuration (shapes only, synthetic routing
//! trace — no weights are allocated).
//!
//! It calls the same library functions with the same defaults as the CLI, so its numbers equal those of
//! `aimc energy --batch 1,64` and `aimc energy --shape olmoe1b7b --batch 1,64`.
//!
//! `cargo run --release --example energy_per_token`
use aimc::energy::{
    estimate, map_shape, paper_mapping, EnergyOptions, GpuPreset, ModelShape, Projections,
};
use aimc::mapping::{MappingOptions, RoutingTrace};
use aimc::model::{embedded, RouterKind};
use aimc::tile::TilePreset;

fn main() -> anyhow::Result<()> {
    let preset = TilePreset::builtin("aimc-3d")?;
    let gpu = GpuPreset::resolve("h100")?;
    let opts = EnergyOptions {
        batches: vec![1, 64],
        ..Default::default()
    };
    let mapping_opts = paper_mapping(MappingOptions::default(), Projections::Analog);
    let model = embedded::load()?;
    let mut tokens = model.tokenizer()?.encode(embedded::default_text()?)?;
    tokens.truncate(1024);
    let embedded_case = (
        ModelShape::from_model("embedded", &model),
        RoutingTrace::collect(&model, &tokens, 512, RouterKind::default())?,
    );
    let olmoe = ModelShape::olmoe_1b_7b();
    let olmoe_case = (olmoe.clone(), olmoe.synthetic_trace(1024, 7));
    for (shape, trace) in [embedded_case, olmoe_case] {
        let no_weights = |_| None;
        let mapping = map_shape(&preset, &shape, &mapping_opts, &no_weights, &trace)?;
        let r = estimate(&preset, &gpu, &shape, &mapping, &trace, &opts)?;
        println!(
            "{} on {} ({}; {} + {} stacks):",
            shape.name, r.preset, r.system, r.stacks_used, r.projection_stacks
        );
        for ((a, g), b) in r.decode.iter().zip(&r.gpu_decode).zip(&opts.batches) {
            println!(
                "  decode batch {b:>2}: {:>10.3} µJ/token, {:>9.1} µs/token, {:>9.0} tokens/s | {}: {:>10.3} µJ/token, {:>9.0} tokens/s | bound by {}",
                a.energy.total() * 1e6,
                a.latency_per_token_s * 1e6,
                a.tokens_per_s,
                r.gpu,
                g.energy_per_token_j * 1e6,
                g.tokens_per_s,
                a.bottleneck.description
            );
        }
    }
    Ok(())
}

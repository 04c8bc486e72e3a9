//! The scaling study's headline property on a small family: on a fixed 3D chip, MoE energy and throughput per token
//! stay nearly flat as experts are added, while the dense model of the same total size gets costlier.
use aimc::energy::scaling::{run, ScalingConfig};
use aimc::energy::{EnergyOptions, GpuPreset, Projections};
use aimc::tile::TilePreset;

#[test]
fn moe_scales_better_than_dense_on_a_fixed_3d_chip() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let gpu = GpuPreset::resolve("h100").unwrap();
    let config = ScalingConfig {
        hidden: 512,
        layers: 2,
        intermediate: 512,
        top_k: 2,
        experts: vec![4, 16],
        stacks: 64,
        trace_tokens: 64,
        seed: 3,
    };
    let opts = EnergyOptions {
        batches: vec![1],
        context: 64,
        prefill_tokens: 16,
        decode_steps: 8,
        projections: Projections::Analog,
    };
    let p = run(&preset, &gpu, &config, &opts).unwrap();
    let get = |family: &str, e: usize| {
        p.iter()
            .find(|x| x.family == family && x.experts == e)
            .unwrap()
    };
    let (d4, d16, m4, m16) = (
        get("dense", 4),
        get("dense", 16),
        get("moe", 4),
        get("moe", 16),
    );
    // Same total size per point (the MoE adds its routers: 2 layers × 512 × 16), equal active parameters
    // across MoE points up to the routers.
    assert_eq!(d16.total_params + 2 * 512 * 16, m16.total_params);
    assert_eq!(
        m4.active_params - 2 * 512 * 4,
        m16.active_params - 2 * 512 * 16
    );
    // The bigger models need more tiers on the fixed chip.
    assert!(d16.tiers_per_stack > d4.tiers_per_stack && m16.tiers_per_stack > m4.tiers_per_stack);
    // Analog energy: dense grows with its (active = total) size; MoE keeps its active experts, so only the
    // (constant) projections and LM head and the same number of expert blocks are read per token. Exact block
    // counts: per token dense 4× runs 2·(3·4 + 4) + 63 = 95 full blocks, dense 16× 2·(3·16 + 4) + 63 = 167.
    let ratio = d16.analog_energy_per_token_j / d4.analog_energy_per_token_j;
    assert!((ratio - 167.0 / 95.0).abs() < 0.05, "dense ratio {ratio}");
    let moe_ratio = m16.analog_energy_per_token_j / m4.analog_energy_per_token_j;
    assert!((moe_ratio - 1.0).abs() < 0.05, "MoE ratio {moe_ratio}");
    // Throughput: MoE loses less than dense.
    let dense_drop = d4.tokens_per_s / d16.tokens_per_s;
    let moe_drop = m4.tokens_per_s / m16.tokens_per_s;
    assert!(
        moe_drop < dense_drop,
        "MoE drop {moe_drop}, dense drop {dense_drop}"
    );
}

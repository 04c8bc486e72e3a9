//! Which expert weights the GPU roofline reads: by default the union the batch chose, or (`expert_weights_read:
//! all`) every expert each step, the whole model fetched per step.
use aimc::energy::gpu::{estimate, ExpertReads, ExpertWeightsRead};
use aimc::energy::{GpuPreset, ModelShape};

#[test]
fn reading_every_expert_makes_a_step_read_the_whole_model_whatever_the_routing() {
    // d = 512, 2 layers, 16 experts of width 256, top-2.
    let shape = ModelShape::synthetic("moe", 512, 2, 16, 2, 256);
    let trace = shape.synthetic_trace(64, 3);
    let mut all = GpuPreset::resolve("a100").unwrap();
    all.expert_weights_read = Some(ExpertWeightsRead {
        value: ExpertReads::All,
        source: "test".into(),
    });
    let used = GpuPreset::resolve("a100").unwrap();
    let ctx = 32;
    let bkv = all.bytes_per_kv_value.value;
    let kv_per_seq = ctx as f64 * (shape.kv_values_per_token * shape.num_layers) as f64 * bkv;
    let (a1, a8) = (
        estimate(&all, &shape, &trace, 1, ctx, false),
        estimate(&all, &shape, &trace, 8, ctx, false),
    );
    // Every expert is read at any batch: only the KV cache grows with the batch.
    let grow = a8.bytes_per_step - a1.bytes_per_step;
    assert!((grow - 7.0 * kv_per_seq).abs() <= 1e-9 * grow, "{grow}");
    // Batch 1 reads 2 of 16 experts per layer by default; all 16 when told: 14 experts × 3 matrices × d × I more.
    let u1 = estimate(&used, &shape, &trace, 1, ctx, false);
    let extra = (2 * 14 * 3 * 512 * 256) as f64 * all.bytes_per_weight.value;
    let diff = a1.bytes_per_step - u1.bytes_per_step;
    assert!((diff - extra).abs() <= 1e-9 * extra, "{diff} vs {extra}");
    assert!(a1.tokens_per_s < u1.tokens_per_s);
}

#[test]
fn an_expert_reads_setting_without_a_source_is_an_error_naming_the_field() {
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("../tiles/gpu/a100.json")).unwrap();
    v["expert_weights_read"] = serde_json::json!({ "value": "all", "source": " " });
    let e = GpuPreset::from_json_str(&v.to_string(), "a100-all.json").unwrap_err();
    assert!(e.to_string().contains("expert_weights_read.source"), "{e}");
    v["expert_weights_read"] = serde_json::json!({ "value": "all", "source": "test" });
    let p = GpuPreset::from_json_str(&v.to_string(), "a100-all.json").unwrap();
    assert_eq!(p.expert_reads(), ExpertReads::All);
}

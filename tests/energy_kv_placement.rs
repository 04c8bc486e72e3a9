//! Where the KV cache lives: pinned off chip (`cost.memory.kv_cache`, as IBM 3D-SiM's `kv_cache_latency` loads it
//! from its 5.332 GB/s DRAM) every cached byte streams from off-chip memory; by capacity it stays in SRAM. Under the
//! DRAM reading the A100 roofline beats the chip on a small dense model, the shape Büchel et al. (2025) report.
use aimc::energy::{
    gpu, map_shape, paper_mapping, EnergyModel, GpuPreset, KvCacheLevel, KvCachePlacement,
    ModelShape, PhaseCost, Projections, Scenario,
};
use aimc::mapping::MappingOptions;
use aimc::tile::TilePreset;

const CONTEXT: usize = 64;

fn dense() -> ModelShape {
    // d = 512, 2 layers, one MLP of width 2048 (a small dense model).
    ModelShape::synthetic("small-dense", 512, 2, 0, 1, 2048)
}

fn preset(level: Option<KvCacheLevel>) -> TilePreset {
    let mut p = TilePreset::builtin("buchel2025").unwrap();
    p.cost.as_mut().unwrap().memory.kv_cache = level.map(|level| KvCachePlacement {
        level,
        source: "test".into(),
    });
    p
}

fn decode(p: &TilePreset, shape: &ModelShape, batch: usize) -> PhaseCost {
    let trace = shape.synthetic_trace(64, 5);
    let opts = paper_mapping(MappingOptions::default(), Projections::Analog);
    let mapping = map_shape(p, shape, &opts, &|_| None, &trace).unwrap();
    EnergyModel::new(
        p.cost.as_ref().unwrap(),
        &mapping,
        shape,
        Projections::Analog,
    )
    .run(
        &trace,
        Scenario::Decode {
            batch,
            context: CONTEXT,
        },
        4,
    )
    .unwrap()
}

#[test]
fn a_kv_cache_pinned_off_chip_streams_every_cached_byte_from_off_chip_memory() {
    let shape = dense();
    let pinned = preset(Some(KvCacheLevel::OffChip));
    let c = pinned.cost.as_ref().unwrap();
    let kv_bytes_per_position =
        (shape.kv_values_per_token * shape.num_layers) as f64 * c.digital.bytes_per_kv_value.value;
    let batch = 4;
    let p = decode(&pinned, &shape, batch);
    // Placement: the whole cache (batch × (context + 1) positions) off chip, none in the 1 TB scratchpad.
    assert_eq!(p.placement.on_chip_kv_bytes, 0.0);
    assert_eq!(
        p.placement.off_chip_kv_bytes,
        (batch * (CONTEXT + 1)) as f64 * kv_bytes_per_position
    );
    // Traffic per step: every sequence reads its `context` cached positions and writes one, all off chip.
    let per_step = (batch * (CONTEXT + 1)) as f64 * kv_bytes_per_position;
    let t = &p.traffic_per_step;
    assert!((t.off_chip_kv_bytes - per_step).abs() <= 1e-9 * per_step);
    assert_eq!(t.on_chip_kv_bytes, 0.0);
    // Off-chip memory is busy for exactly bytes / bandwidth and binds the step.
    let bw = c.memory.off_chip.bandwidth_bytes_per_s.value;
    let busy = p.busy_per_step.off_chip_memory_s;
    assert!((busy - per_step / bw).abs() <= 1e-9 * busy, "{busy}");
    assert_eq!(p.bottleneck.resource, "off_chip_memory");
    // By capacity the same cache stays in the scratchpad and off-chip memory carries no KV byte.
    let free = decode(&preset(None), &shape, batch);
    assert_eq!(free.traffic_per_step.off_chip_kv_bytes, 0.0);
    assert_eq!(free.placement.off_chip_kv_bytes, 0.0);
}

#[test]
fn one_tokens_step_grows_by_exactly_its_kv_reads_and_writes_at_dram_bandwidth() {
    let shape = dense();
    let pinned = preset(Some(KvCacheLevel::OffChip));
    let bw = pinned
        .cost
        .as_ref()
        .unwrap()
        .memory
        .off_chip
        .bandwidth_bytes_per_s
        .value;
    let (off, free) = (decode(&pinned, &shape, 1), decode(&preset(None), &shape, 1));
    // One token is its chain: per layer it reads `context` positions and writes one (1 B per value here).
    let kv = (shape.num_layers * (CONTEXT + 1) * shape.kv_values_per_token) as f64;
    let extra = off.step_time_s - free.step_time_s;
    assert!(
        (extra - kv / bw).abs() <= 1e-9 * extra,
        "extra {extra} s vs {} s",
        kv / bw
    );
}

#[test]
fn with_the_kv_cache_in_dram_the_a100_is_faster_on_a_small_dense_model() {
    let shape = dense();
    let a100 = GpuPreset::resolve("a100").unwrap();
    let trace = shape.synthetic_trace(64, 5);
    let g = gpu::estimate(&a100, &shape, &trace, 1, CONTEXT, false);
    let off = decode(&preset(Some(KvCacheLevel::OffChip)), &shape, 1);
    let free = decode(&preset(None), &shape, 1);
    // The free scratchpad (3D-SiM's public attention stub) puts the chip ahead; its own DRAM puts the A100 ahead.
    assert!(free.tokens_per_s > g.tokens_per_s, "{free:?} vs {g:?}");
    assert!(off.tokens_per_s < g.tokens_per_s, "{off:?} vs {g:?}");
}

#[test]
fn a_kv_cache_placement_without_a_source_is_an_error_naming_the_field() {
    let mut p = preset(Some(KvCacheLevel::OffChip));
    p.cost
        .as_mut()
        .unwrap()
        .memory
        .kv_cache
        .as_mut()
        .unwrap()
        .source = " ".into();
    let e = p.cost.as_ref().unwrap().validate().unwrap_err();
    assert_eq!(e.field, "cost.memory.kv_cache.source");
}

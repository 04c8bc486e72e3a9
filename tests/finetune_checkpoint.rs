//! Fine-tune → write → load on the embedded model: the written checkpoint holds the trained
//! experts rounded to its dtype (bf16) and every other expert unchanged.
use aimc::finetune::calib::{record, EMBEDDED_CALIB_TEXT};
use aimc::finetune::noisy::CpuObjective;
use aimc::finetune::{finetune_layer, FinetuneConfig};
use aimc::model::write::{write_checkpoint_from, ExpertUpdates};
use aimc::model::{embedded, Ffn, Model, RouterKind};
use aimc::tile::TilePreset;

fn experts(model: &Model, layer: usize) -> &[aimc::model::common::SwiGlu] {
    match &model.layers[layer].ffn {
        Ffn::Moe(m) => &m.experts,
        Ffn::Dense(_) => panic!("layer {layer} is dense"),
    }
}

#[test]
fn finetuned_checkpoint_loads_with_the_trained_experts() {
    let original = embedded::load().unwrap();
    let mut tokens = original
        .tokenizer()
        .unwrap()
        .encode(EMBEDDED_CALIB_TEXT)
        .unwrap();
    tokens.truncate(128);
    let calib = record(&original, &tokens, 64, RouterKind::default()).unwrap();
    assert_eq!(calib.len(), original.config.num_layers);
    let preset = TilePreset::builtin("pcm-3d-8tier").unwrap();
    let objective = CpuObjective::new(&preset, Some(86400.0));
    let cfg = FinetuneConfig {
        steps: 2,
        lr: 1e-3,
        seed: 1,
        batch_tokens: 64,
        drift_s: Some(86400.0),
    };
    let layer = 1;
    let mut trained = experts(&original, layer).to_vec();
    let rec = finetune_layer(&calib[layer], &mut trained, &objective, &cfg, &|_| {}).unwrap();
    assert!(rec.loss_before > 0.0 && rec.loss_after.is_finite());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned");
    let mut updates = ExpertUpdates::default();
    updates.layers.insert(layer, trained.clone());
    write_checkpoint_from(&embedded::source(), &out, &updates).unwrap();
    let loaded = Model::load(&out).unwrap();
    let round = |v: f32| half::bf16::from_f32(v).to_f32();
    let mut changed = 0usize;
    for (got, (want, before)) in experts(&loaded, layer)
        .iter()
        .zip(trained.iter().zip(experts(&original, layer)))
    {
        for (g, (w, b)) in got.gate_up.iter().chain(got.down.iter()).zip(
            want.gate_up
                .iter()
                .chain(want.down.iter())
                .zip(before.gate_up.iter().chain(before.down.iter())),
        ) {
            assert_eq!(g.to_bits(), round(*w).to_bits());
            changed += usize::from(g != b);
        }
    }
    assert!(changed > 1000, "only {changed} weights changed");
    for l in (0..original.config.num_layers).filter(|&l| l != layer) {
        for (a, b) in experts(&loaded, l).iter().zip(experts(&original, l)) {
            assert_eq!(a.gate_up, b.gate_up);
            assert_eq!(a.down, b.down);
        }
    }
}

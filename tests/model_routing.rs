//! Routing records, router variants and the pluggable expert backend on the parity fixtures.
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use aimc::model::{ExpertLinear, ExpertSlot, ForwardOptions, MatrixId, Model, RouterKind};
use ndarray::{Array2, ArrayView2};

fn load(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parity")
            .join(name),
    )
    .unwrap()
}

const IDS: [u32; 15] = [0, 17, 100, 42, 5, 99, 23, 64, 1, 77, 31, 8, 50, 100, 3];

fn routed(model: &Model, router: RouterKind) -> Vec<aimc::model::LayerRouting> {
    let opts = ForwardOptions {
        router,
        record_routing: true,
        ..Default::default()
    };
    model.forward(&IDS, &opts).unwrap().routing
}

#[test]
fn checkpoint_routing_has_top_k_per_token_and_the_family_weight_rule() {
    // Mixtral renormalises (weights sum to 1), OLMoE does not (sum < 1), DeepSeek-V2 scales by 1.5
    // and skips its first (dense) layer.
    for (name, layers, sum_rule) in [
        ("mixtral", vec![0, 1], Some(1.0)),
        ("olmoe", vec![0, 1], None),
        ("deepseek_v2", vec![1, 2], None),
    ] {
        let model = load(name);
        let routing = routed(&model, RouterKind::CheckpointDefault);
        assert_eq!(
            routing.iter().map(|r| r.layer).collect::<Vec<_>>(),
            layers,
            "{name}"
        );
        for r in &routing {
            assert_eq!(
                r.assignments.len(),
                IDS.len() * model.config.top_k,
                "{name}"
            );
            for t in 0..IDS.len() as u32 {
                let sum: f32 = r
                    .assignments
                    .iter()
                    .filter(|a| a.token == t)
                    .map(|a| a.weight)
                    .sum();
                match sum_rule {
                    Some(s) => assert!((sum - s).abs() < 1e-5, "{name}: {sum}"),
                    None => assert!(
                        sum > 0.0 && sum < model.config.router.scaling,
                        "{name}: {sum}"
                    ),
                }
            }
        }
    }
}

#[test]
fn relu_and_adaptive_routers_vary_the_expert_count() {
    let model = load("olmoe");
    let relu = routed(&model, RouterKind::Relu);
    let per_token: BTreeSet<usize> = (0..IDS.len() as u32)
        .map(|t| relu[0].assignments.iter().filter(|a| a.token == t).count())
        .collect();
    assert!(
        per_token.len() > 1,
        "ReLU routing should give varying k: {per_token:?}"
    );
    assert!(relu
        .iter()
        .flat_map(|r| &r.assignments)
        .all(|a| a.weight > 0.0));
    // Threshold 1 keeps only each token's best expert.
    let one = routed(&model, RouterKind::AdaptiveK { threshold: 1.0 });
    assert!(one.iter().all(|r| r.assignments.len() == IDS.len()));
}

/// Digital products, recording which matrices were used.
struct Recording<'a> {
    model: &'a Model,
    seen: Mutex<BTreeSet<MatrixId>>,
}

impl ExpertLinear for Recording<'_> {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.seen.lock().unwrap().insert(id);
        self.model.linear(id, x)
    }
}

#[test]
fn expert_backend_sees_every_used_ffn_matrix_and_nothing_else() {
    let model = load("qwen2_moe");
    let backend = Recording {
        model: &model,
        seen: Mutex::new(BTreeSet::new()),
    };
    let opts = ForwardOptions {
        experts: Some(&backend),
        record_routing: true,
        ..Default::default()
    };
    let out = model.forward(&IDS, &opts).unwrap();
    let digital = model.forward(&IDS, &ForwardOptions::default()).unwrap();
    assert_eq!(out.logits, digital.logits);
    let all: BTreeSet<MatrixId> = model.matrices().map(|(id, _)| id).collect();
    // 2 layers × (6 routed + 1 shared) × 3 projections.
    assert_eq!(all.len(), 2 * 7 * 3);
    let seen = backend.seen.into_inner().unwrap();
    assert!(seen.is_subset(&all));
    let used_experts: BTreeSet<(usize, ExpertSlot)> = out
        .routing
        .iter()
        .flat_map(|r| {
            r.assignments
                .iter()
                .map(|a| (r.layer, ExpertSlot::Routed(a.expert as usize)))
        })
        .chain((0..2).map(|l| (l, ExpertSlot::Shared(0))))
        .collect();
    let seen_experts: BTreeSet<(usize, ExpertSlot)> =
        seen.iter().map(|m| (m.layer, m.slot)).collect();
    assert_eq!(seen_experts, used_experts);
}

#[test]
fn matrices_are_pytorch_out_by_in() {
    let model = load("deepseek_v2");
    for (id, m) in model.matrices() {
        let (h, i) = match id.slot {
            ExpertSlot::DenseMlp => (48, 72),
            ExpertSlot::Shared(_) => (48, 20),
            ExpertSlot::Routed(_) => (48, 20),
        };
        let want = match id.proj {
            aimc::model::Proj::Down => [h, i],
            _ => [i, h],
        };
        assert_eq!(m.shape(), want, "{id:?}");
    }
    assert_eq!(model.matrices().count(), 3 + 2 * (6 + 1) * 3);
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let model = load("olmoe");
    let e = model
        .forward(&[3, 101], &ForwardOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("101"));
}

#[test]
fn info_cli_reports_parameter_split() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/olmoe");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(["info", "--json", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // meta.json of the fixture: 75408 parameters; 2 layers × 8 experts × 3 × 20 × 48 routed.
    assert_eq!(v["params"]["total"], 75408);
    assert_eq!(v["params"]["experts"], 2 * 8 * 3 * 20 * 48);
    assert_eq!(v["params"]["router"], 2 * 8 * 48);
}

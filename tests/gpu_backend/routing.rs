//! Token routing on the device: the router's top-k (`route_top_k`) against the CPU router, and
//! the stable sort of the (token, expert) pairs into the per-expert row tiles that the grouped
//! GEMMs read.

use crate::support::{gpu, route_host, routing, test_matrix, tokens_of};
use aimc::backend::cuda::gemm::TILE_ROWS;
use aimc::backend::cuda::CudaDevice;

#[test]
#[ignore = "needs a CUDA GPU"]
fn routing_sort_is_stable_and_exact() {
    let dev = gpu("routing");
    // 24,000 pairs over 64 experts: 24 slices of the sort, the last ragged; 48,000 over 300
    // experts: more experts than threads per block and more slices (47) than a warp scans at
    // once. All experts, then the even ones only (empty experts between full ones).
    for (t, k, e) in [(3000, 8, 64), (8000, 6, 300)] {
        routing_case(&dev, t, k, e);
    }
}

fn routing_case(dev: &CudaDevice, t: usize, k: usize, e: usize) {
    let (all, weights) = routing(t, k, e);
    let even: Vec<u32> = all.iter().map(|&c| c & !1).collect();
    for experts in [all, even] {
        let r = route_host(dev, &experts, &weights, t, k, e);
        let offsets = dev.download(&r.offsets).unwrap();
        let tile_offsets = dev.download(&r.tile_offsets).unwrap();
        let tokens = dev.download(&r.sorted_token).unwrap();
        let pairs = dev.download(&r.sorted_pair).unwrap();
        let w = dev.download(&r.sorted_weight).unwrap();
        let mut expect_pairs: Vec<u32> = (0..(t * k) as u32).collect();
        expect_pairs.sort_by_key(|&p| experts[p as usize]); // stable
        assert_eq!(pairs, expect_pairs);
        for (i, &p) in pairs.iter().enumerate() {
            assert_eq!(tokens[i] as usize, p as usize / k);
            assert_eq!(w[i], weights[p as usize]);
        }
        let mut tiles = 0;
        for ex in 0..e {
            let n = tokens_of(&experts, k, ex as u32).len();
            assert_eq!((offsets[ex + 1] - offsets[ex]) as usize, n);
            assert_eq!(tile_offsets[ex] as usize, tiles);
            tiles += n.div_ceil(TILE_ROWS);
        }
        assert_eq!(tile_offsets[e] as usize, tiles);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_router_matches_the_cpu_router() {
    use aimc::backend::cuda::model::route_top_k;
    use aimc::model::{GroupLimit, RouterKind, RouterRule};
    let dev = gpu("device router");
    let (t, e) = (1000, 64);
    let mut logits = test_matrix(t, e, 77, 2.0);
    // Exact ties: equal logits must go to the lower expert on both sides.
    for r in 0..t / 10 {
        let v = logits[[r, 3]];
        logits[[r, 40]] = v;
        logits[[r, 9]] = v;
    }
    let logits_dev = dev.upload(logits.as_slice().unwrap()).unwrap();
    let rule = |top_k, renormalize, scaling, group_limit| RouterRule {
        top_k,
        renormalize,
        scaling,
        group_limit,
    };
    let groups = Some(GroupLimit {
        n_group: 8,
        topk_group: 3,
    });
    let cases = [
        (RouterKind::CheckpointDefault, rule(8, false, 1.0, None)),
        (RouterKind::CheckpointDefault, rule(6, true, 1.0, None)),
        (RouterKind::CheckpointDefault, rule(6, false, 2.5, groups)),
        (
            RouterKind::SoftmaxTopK {
                k: 2,
                renormalize: true,
            },
            rule(8, false, 1.0, None),
        ),
        (RouterKind::SigmoidTopK { k: 4 }, rule(8, false, 1.5, None)),
    ];
    for (kind, r) in cases {
        let want = kind.route(logits.view(), &r);
        let k = want.len() / t;
        let (eop, wop) = route_top_k(&dev, &logits_dev, t, e, k, &kind, &r).unwrap();
        let (got_e, got_w) = (dev.download(&eop).unwrap(), dev.download(&wop).unwrap());
        let mut worst = 0.0f32;
        for (p, a) in want.iter().enumerate() {
            assert_eq!(got_e[p], a.expert, "{kind:?} {r:?}: pair {p}");
            worst = worst.max((got_w[p] - a.weight).abs() / a.weight.abs().max(1e-30));
        }
        println!(
            "device router {kind:?} (k = {k}): experts identical, weights rel. diff ≤ {worst:.1e}"
        );
        assert!(worst <= 1e-5, "{kind:?}: weight rel. diff {worst}");
    }
    // Variable-k rules are refused (they route on the CPU).
    assert!(route_top_k(
        &dev,
        &logits_dev,
        t,
        e,
        2,
        &RouterKind::Relu,
        &rule(2, false, 1.0, None)
    )
    .is_err());
}

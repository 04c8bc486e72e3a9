"""Cross-check of aimc's `3dsim` preset against IBM's 3D-SiM (github IBM/3D-CiM-LLM-Inference-Simulator).

Runs the real simulator (torch.fx tracing on the `meta` device, CPU only) on a few decoder-only configurations, dense
and MoE, and runs `aimc energy --preset 3dsim` on the same shapes; prints a Markdown table of latency and energy per
generated token from both, and writes the raw numbers to JSON.

    python tools/3dsim_crosscheck.py --sim /path/to/3D-SiM/src --aimc target/release/aimc --out reports/bench/3dsim

`--sim` is the `src/` folder of a checkout of 3D-SiM (it is not vendored here). Needs torch (any recent version,
CPU is enough), numpy, tqdm, matplotlib and pydot, as 3D-SiM itself does.

3D-SiM with `kv_caching=False` recomputes the whole sequence for every new token; aimc always keeps a KV cache, so
for that configuration aimc's number is the sum of prefills of length 1, 2, …, target−1 (one per generated token).

    python tools/3dsim_crosscheck.py --sim /path/to/3D-SiM/src --timeline --out reports/bench/3dsim

`--timeline` instead runs the MoE configurations of TIMELINE (8 or 64 experts, 4 or 12 layers) with every scheduled
op recorded (start, duration), writes one decode layer's op sequence per configuration to `timeline.json`, and sets
3D-SiM's time per token beside aimc's (blocks spread) with and without the router on the token's path (a copy of the
preset whose digital matmul, used only by the router, is made instantaneous).
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = [
    # name, layers, d_model, d_ff, vocab, experts (0 = dense), k, kv_caching, batch, start, target, tiles, tiers
    dict(name="README example (dense, no KV cache)", layers=3, d=512, ff=2048, vocab=1024, experts=0, k=0,
         kv=False, bsz=1, start=1, target=12, tiles=100, tiers=1024),
    dict(name="test_kv_caching (dense, KV cache)", layers=3, d=512, ff=2048, vocab=1024, experts=0, k=0,
         kv=True, bsz=1, start=1, target=12, tiles=100, tiers=1024),
    dict(name="MoE 8 experts top-2 (KV cache)", layers=4, d=512, ff=2048, vocab=1024, experts=8, k=2,
         kv=True, bsz=1, start=1, target=9, tiles=100, tiers=1024),
    dict(name="larger MoE: 12 layers, 64 experts top-2, vocab 32000 (KV cache)", layers=12, d=512, ff=2048,
         vocab=32000, experts=64, k=2, kv=True, bsz=1, start=1, target=9, tiles=100, tiers=1024),
    dict(name="test_mapping_decoder_only shape: d 1024, 10 layers, 64 experts top-1 (KV cache)", layers=10,
         d=1024, ff=4096, vocab=50000, experts=64, k=1, kv=True, bsz=1, start=1, target=5, tiles=96, tiers=257),
    dict(name="dense, 3 sequences in flight (KV cache)", layers=3, d=512, ff=2048, vocab=1024, experts=0, k=0,
         kv=True, bsz=3, start=1, target=9, tiles=100, tiers=1024),
]


TIMELINE = [
    dict(name=f"MoE {e} experts top-2, {l} layers, vocab {v} (KV cache)", layers=l, d=512, ff=2048, vocab=v,
         experts=e, k=2, kv=True, bsz=1, start=1, target=9, tiles=100, tiers=1024)
    for (e, l, v) in [(8, 4, 1024), (64, 4, 1024), (8, 12, 1024), (64, 12, 1024), (64, 12, 32000)]
]


def op_kind(name):
    """3D-SiM node name without its unique suffix: `tier_linear`, `communication`, `digital_add`, `_mha`, …"""
    for k in ("tier_linear", "communication", "digital_add", "digital_relu", "layer_norm", "_mha", "multinomial"):
        if k in name:
            return k.strip("_")
    return name


def run_3dsim(cfg, events=None):
    from threedsim.accelerator import Accelerator, AcceleratorConfig
    from threedsim.inference import fast_trace_decoder, schedule_execution
    from threedsim.mapping import Mapper, MapStrategy, Strategy
    from threedsim.models import DecoderOnlyTransformer
    from threedsim.modules import TransformerDecoderLayer
    from threedsim.modules.base import assign_acc, fill_name_fields, make_traceable, make_use_linear
    import torch

    torch.manual_seed(0)
    config = AcceleratorConfig(tiles=cfg["tiles"], tiers=cfg["tiers"], tier_shape=(512, 512),
                               kv_caching=cfg["kv"])
    acc = Accelerator(config, device="meta")
    model_kwargs = dict(
        num_layers=cfg["layers"],
        decoder_layer_kwargs={"d_model": cfg["d"], "nhead": 8, "dim_feedforward": cfg["ff"]},
        embedding_layer_kwargs={"vocab_size": cfg["vocab"], "embedding_dim": cfg["d"],
                                "max_seq_length": cfg["target"]},
        device="meta",
    )
    if cfg["experts"]:
        model_kwargs["moe_kwargs"] = {"frequency": 1, "num_experts": cfg["experts"], "k": cfg["k"]}
    model = DecoderOnlyTransformer(TransformerDecoderLayer, **model_kwargs)
    assign_acc(model, acc)
    Mapper(accelerator=acc, model=model,
           map_strategy=MapStrategy(strategy=Strategy.GREEDY_IN_ORDER, split_ffn=True,
                                    stack_embedding=True)).map_network()
    fill_name_fields(model)
    make_traceable(model, is_traceable=True)
    make_use_linear(model, use_linear=True)
    traced = fast_trace_decoder(model, start_len=cfg["start"], target_len=cfg["target"], bsz=cfg["bsz"])
    t0 = time.time()
    plot = events is not None
    if plot:
        # Record every finished op (3D-SiM's own event hook, called only when plotting; its plots are skipped).
        from threedsim.inference import scheduler
        scheduler._add_event = lambda _list, node, now: events.append(
            (node.name, now - getattr(node, "latency", 0), getattr(node, "latency", 0)))
        scheduler.plot_event_pipeline = lambda **_: None
        scheduler.plot_memory_trace = lambda *_a, **_k: None
    ns, _mem, _peak, nj, _flops, e_bd, l_bd = schedule_execution(
        traced.graph, accelerator=model.accelerator, copy_and_cleanup_graph=False, communication=True,
        save_memory=False, save_peak_memory=False, plot=plot, plot_dir=tempfile.gettempdir() if plot else None)
    tokens = cfg["bsz"] * (cfg["target"] - cfg["start"])
    return dict(execution_ns=ns, energy_nj=nj, tokens=tokens, seconds=time.time() - t0,
                ns_per_token=ns / tokens, nj_per_token=nj / tokens,
                energy_breakdown_nj=json.loads(json.dumps(e_bd)))


def aimc_shape(cfg):
    d = cfg["d"]
    moe = cfg["experts"] > 0
    return {
        "name": cfg["name"],
        "hidden_size": d,
        "num_layers": cfg["layers"],
        "vocab_size": cfg["vocab"],
        "attention_params_per_layer": 4 * d * d,
        "attention_flops_per_position": 2 * 8 * 2 * (d // 8),
        "num_heads": 8,
        "kv_values_per_token": 2 * d,
        "num_experts": max(cfg["experts"], 1),
        "top_k": cfg["k"] if moe else 1,
        "moe_intermediate_size": cfg["ff"] if moe else 0,
        "dense_intermediate_size": 0 if moe else cfg["ff"],
        "shared_intermediate_size": 0,
        "moe_layers": [moe] * cfg["layers"],
        "gated_ffn": False,
    }


def spread_preset(tmp):
    """The `3dsim` preset with one tier per stack: aimc's mapping then gives every 512×512 block its own stack, as
    3D-SiM's greedy-in-order mapping does while blocks are fewer than its tiles (round-robin over tiles)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "tiles", "3dsim.json")) as f:
        p = json.load(f)
    p["name"] = "3dsim-spread"
    p["stack"]["tiers_per_stack"] = 1
    path = os.path.join(tmp, "3dsim-spread.json")
    with open(path, "w") as f:
        json.dump(p, f)
    return path


def run_aimc(aimc, cfg, tmp, preset="3dsim"):
    shape_path = os.path.join(tmp, "shape.json")
    with open(shape_path, "w") as f:
        json.dump(aimc_shape(cfg), f)

    def one(batch, context, prefill):
        out = os.path.join(tmp, "out")
        cmd = [aimc, "energy", "--shape-file", shape_path, "--preset", preset, "--batch", str(batch),
               "--context", str(context), "--prefill", str(prefill), "--steps", "64",
               "--trace-tokens", "256", "--out", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "energy.json")) as f:
            return json.load(f), " ".join(cmd[1:])

    if cfg["kv"]:
        # Every generated token is one decode step at the mean context of the run.
        ctx = (cfg["start"] + cfg["target"] - 1) // 2
        r, cmd = one(cfg["bsz"], ctx, 1)
        d = r["decode"][0]
        # 3D-SiM's time per token is its run time over all tokens of all sequences.
        return dict(ns_per_token=d["step_time_s"] * 1e9 / cfg["bsz"], step_ns=d["step_time_s"] * 1e9, nj_per_token=d["energy"]["total_j"] * 1e9,
                    bottleneck=d["bottleneck"]["description"], command=cmd,
                    components_nj={k: v * 1e9 for k, v in d["energy"]["components"].items()})
    # No KV cache: token s is a prefill of s tokens (the whole sequence so far).
    ns = nj = 0.0
    comps = {}
    cmd = ""
    for s in range(cfg["start"], cfg["target"]):
        r, cmd = one(1, 0, s)
        p = r["prefill"]
        ns += p["step_time_s"] * 1e9
        nj += p["energy"]["total_j"] * 1e9 * s
        for k, v in p["energy"]["components"].items():
            comps[k] = comps.get(k, 0.0) + v * 1e9 * s
    n = cfg["target"] - cfg["start"]
    return dict(ns_per_token=ns / n, nj_per_token=nj / n, bottleneck="prefill of the whole sequence per token",
                command=cmd.replace(f"--prefill {cfg['target'] - 1}", "--prefill 1..%d" % (cfg["target"] - 1)),
                components_nj={k: v / n for k, v in comps.items()})


def router_free_preset(tmp):
    """The blocks-spread preset with the router off the token's path: aimc's digital matmul (used only by the MoE
    router when projections are analog) made instantaneous. A diagnostic, not a preset to cost with."""
    with open(spread_preset(tmp)) as f:
        p = json.load(f)
    p["name"] = "3dsim-spread-router-free"
    p["cost"]["digital"]["matmul"]["ops_per_s"]["value"] = 1e30
    path = os.path.join(tmp, "3dsim-spread-router-free.json")
    with open(path, "w") as f:
        json.dump(p, f)
    return path


def one_layer(events, period):
    """Ops of one decode layer in the middle of the run: from a LayerNorm start to the next one but one."""
    ev = sorted(events, key=lambda e: (e[1], e[0]))
    mid = ev[len(ev) // 2][1]
    norms = [e[1] for e in ev if "layer_norm" in e[0] and e[1] >= mid]
    t0 = norms[0]
    t1 = next((t for t in norms if t >= t0 + 0.9 * period), t0 + period)
    groups = {}
    for name, start, lat in ev:
        if t0 <= start < t1:
            key = (start - t0, lat, op_kind(name))
            groups[key] = groups.get(key, 0) + 1
    return [dict(start_ns=k[0], ns=k[1], op=k[2], count=c) for k, c in sorted(groups.items())]


def timeline(args):
    rows = []
    for cfg in TIMELINE:
        events = []
        with contextlib.redirect_stdout(sys.stderr):
            sim = run_3dsim(cfg, events)
        with tempfile.TemporaryDirectory() as tmp:
            spread = run_aimc(args.aimc, cfg, tmp, preset=spread_preset(tmp))
            free = run_aimc(args.aimc, cfg, tmp, preset=router_free_preset(tmp))
        per_layer = sim["ns_per_token"] / cfg["layers"]
        rows.append(dict(config=cfg, threedsim_ns_per_token=sim["ns_per_token"],
                         aimc_spread_ns_per_token=spread["ns_per_token"],
                         aimc_router_off_path_ns_per_token=free["ns_per_token"],
                         threedsim_one_decode_layer=one_layer(events, per_layer)))
    with open(os.path.join(args.out, "timeline.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| configuration | 3D-SiM ns/token | aimc, blocks spread | Δ | aimc, router off the path | Δ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b, c = (r["threedsim_ns_per_token"], r["aimc_spread_ns_per_token"],
                   r["aimc_router_off_path_ns_per_token"])
        print(f"| {r['config']['name']} | {a:.0f} | {b:.0f} | {b / a - 1:+.1%} | {c:.0f} | {c / a - 1:+.1%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", required=True, help="src/ folder of a 3D-SiM checkout")
    ap.add_argument("--aimc", default="target/release/aimc")
    ap.add_argument("--out", default="reports/bench/3dsim")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    ap.add_argument("--timeline", action="store_true", help="record 3D-SiM's op timeline of the MoE configurations")
    args = ap.parse_args()
    sys.path.insert(0, args.sim)
    os.makedirs(args.out, exist_ok=True)
    if args.timeline:
        timeline(args)
        return
    rows = []
    for i, cfg in enumerate(CONFIGS):
        if args.only and i not in args.only:
            continue
        with contextlib.redirect_stdout(sys.stderr):
            sim = run_3dsim(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_aimc(args.aimc, cfg, tmp)
            spread = run_aimc(args.aimc, cfg, tmp, preset=spread_preset(tmp))
        rows.append(dict(config=cfg, threedsim=sim, aimc=ours, aimc_spread=spread))
        print(f"{cfg['name']}: 3D-SiM {sim['ns_per_token']:.0f} ns/token {sim['nj_per_token']:.0f} nJ/token "
              f"({sim['seconds']:.0f} s); aimc {ours['ns_per_token']:.0f} ns/token {ours['nj_per_token']:.0f} "
              f"nJ/token; aimc spread {spread['ns_per_token']:.0f} ns/token", file=sys.stderr)
    with open(os.path.join(args.out, "crosscheck.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| configuration | 3D-SiM ns/token | aimc, blocks spread | Δ | aimc, expert-per-tier | Δ "
          "| 3D-SiM nJ/token | aimc, blocks spread | Δ | aimc, expert-per-tier | Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, c = r["threedsim"], r["aimc_spread"], r["aimc"]
        d = lambda x, y: f"{x / y - 1:+.1%}"
        print(f"| {r['config']['name']} | {a['ns_per_token']:.0f} | {b['ns_per_token']:.0f} | "
              f"{d(b['ns_per_token'], a['ns_per_token'])} | {c['ns_per_token']:.0f} | "
              f"{d(c['ns_per_token'], a['ns_per_token'])} | {a['nj_per_token']:.0f} | {b['nj_per_token']:.0f} | "
              f"{d(b['nj_per_token'], a['nj_per_token'])} | {c['nj_per_token']:.0f} | "
              f"{d(c['nj_per_token'], a['nj_per_token'])} |")


if __name__ == "__main__":
    main()

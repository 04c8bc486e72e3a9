#!/usr/bin/env python3
"""Make tiny MoE parity fixtures with PyTorch + transformers (issue 3).

For each family a tiny, randomly initialised float32 checkpoint with odd sizes, a fixed token sequence and the
reference logits of transformers' own forward (CPU, float32, eager attention, no TF32):

    <out>/<name>/config.json
    <out>/<name>/model.safetensors        save_pretrained(safe_serialization=True), f32
    <out>/<name>/reference.safetensors    input_ids int64 [1,S], logits f32 [1,S,V], logits_f64 f64 [1,S,V]
    <out>/<name>/meta.json                tensor names/shapes, layout, flags, router margins
    <out>/README.md                       summary

Usage: python3 tools/make_parity_fixtures.py --out DIR
Needs torch + transformers (made with torch 2.11, transformers 5.17). Runs on CPU; takes seconds.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VOCAB = 101
INPUT_IDS = [0, 17, 100, 42, 5, 99, 23, 64, 1, 77, 31, 8, 50, 100, 3]  # S = 15, includes 0 and V-1


def rope(theta):
    return {"rope_type": "default", "rope_theta": float(theta)}


def family_specs():
    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attention_dropout=0.0,
    )
    return {
        "mixtral": (
            "MixtralConfig",
            "MixtralForCausalLM",
            dict(
                common,
                hidden_size=48,
                intermediate_size=36,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=6,
                num_experts_per_tok=2,
                rms_norm_eps=1e-5,
                rope_parameters=rope(1e6),
                sliding_window=None,
            ),
        ),
        "olmoe": (
            "OlmoeConfig",
            "OlmoeForCausalLM",
            dict(
                common,
                hidden_size=48,
                intermediate_size=20,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                num_experts=8,
                num_experts_per_tok=3,
                norm_topk_prob=False,
                clip_qkv=None,
                rms_norm_eps=1e-5,
                rope_parameters=rope(10000),
            ),
        ),
        "olmoe_clipqkv": (
            "OlmoeConfig",
            "OlmoeForCausalLM",
            dict(
                common,
                hidden_size=40,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                clip_qkv=1.2,
                rms_norm_eps=1e-5,
                rope_parameters=rope(10000),
            ),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            dict(
                common,
                hidden_size=48,
                intermediate_size=60,
                moe_intermediate_size=20,
                shared_expert_intermediate_size=36,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                qkv_bias=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                use_sliding_window=False,
                rms_norm_eps=1e-6,
                rope_parameters=rope(1e6),
            ),
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(
                common,
                hidden_size=40,
                intermediate_size=60,
                moe_intermediate_size=24,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,  # != hidden/heads = 10, as in real Qwen3-MoE checkpoints
                num_experts=8,
                num_experts_per_tok=3,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                use_sliding_window=False,
                attention_bias=False,
                rms_norm_eps=1e-6,
                rope_parameters=rope(1e6),
            ),
        ),
        "deepseek_v2": (
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            dict(
                common,
                hidden_size=48,
                intermediate_size=72,  # dense layers (first_k_dense_replace)
                moe_intermediate_size=20,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                q_lora_rank=None,  # V2-Lite
                kv_lora_rank=24,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=10,
                n_routed_experts=6,
                n_shared_experts=1,
                num_experts_per_tok=2,
                first_k_dense_replace=1,
                routed_scaling_factor=1.5,
                topk_method="greedy",
                norm_topk_prob=False,
                n_group=None,
                topk_group=None,
                rms_norm_eps=1e-6,
                rope_parameters=rope(10000),
            ),
        ),
        "deepseek_v2_qlora": (
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            dict(
                common,
                hidden_size=48,
                intermediate_size=72,
                moe_intermediate_size=20,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                q_lora_rank=28,
                kv_lora_rank=24,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=10,
                n_routed_experts=8,
                n_shared_experts=2,
                num_experts_per_tok=3,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                topk_method="greedy",
                norm_topk_prob=False,
                n_group=None,
                topk_group=None,
                rms_norm_eps=1e-6,
                rope_parameters=rope(10000),
            ),
        ),
    }


def reinit(model, seed, router_std=0.35, std=0.1):
    """Deterministic init, independent of transformers' _init_weights: large enough that logits and routing vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(1.0 * torch.randn(p.shape, generator=g))
            elif re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", name):
                p.copy_(router_std * torch.randn(p.shape, generator=g))
            elif name.endswith("shared_expert_gate.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def router_hooks(model, store):
    hooks = []
    for name, m in model.named_modules():
        if re.search(r"\.(mlp|block_sparse_moe)\.gate$", name):

            def hook(mod, inp, out, name=name):
                logits = out[0] if isinstance(out, tuple) else out
                store.append((name, logits.detach().double().clone()))

            hooks.append(m.register_forward_hook(hook))
    return hooks


def topk_margin(store, k):
    """Smallest gap (in softmax probability) between the k-th and (k+1)-th expert over all tokens and layers."""
    worst = float("inf")
    chosen = []
    for name, logits in store:
        probs = torch.softmax(logits.float().double(), dim=-1)
        s, idx = torch.sort(probs, dim=-1, descending=True)
        gap = (s[:, k - 1] - s[:, k]).min().item()
        worst = min(worst, gap)
        chosen.append(sorted(set(tuple(sorted(r)) for r in idx[:, :k].tolist())))
    distinct = min(len(c) for c in chosen)
    return worst, distinct


def tensor_table(path):
    out = {}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            out[k] = [list(t.get_shape()), str(t.get_dtype())]
    return dict(sorted(out.items()))


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rewrite_expert_layout(sd, cfg):
    """Fused <-> per-expert. Returns (new_state_dict, description)."""
    new = {}
    desc = None
    fused = [k for k in sd if k.endswith("experts.gate_up_proj")]
    if fused:
        inter = cfg.intermediate_size if cfg.model_type == "olmoe" else cfg.moe_intermediate_size
        for k, v in sd.items():
            if k.endswith("experts.gate_up_proj"):
                pre = k[: -len("gate_up_proj")]
                E, two_i, H = v.shape
                assert two_i == 2 * inter
                for e in range(E):
                    new[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                    new[f"{pre}{e}.up_proj.weight"] = v[e, inter:].contiguous()
            elif k.endswith("experts.down_proj"):
                pre = k[: -len("down_proj")]
                for e in range(v.shape[0]):
                    new[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
            else:
                new[k] = v
        desc = "fused -> per-expert"
    else:
        per = {}
        for k, v in sd.items():
            m = re.match(r"(.*experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", k)
            if m:
                per.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
            else:
                new[k] = v
        for pre, experts in per.items():
            E = len(experts)
            new[pre + "gate_up_proj"] = torch.stack(
                [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in range(E)]
            ).contiguous()
            new[pre + "down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(E)]).contiguous()
        desc = "per-expert -> fused"
    return new, desc


def layout_of(names):
    if any(n.endswith("experts.gate_up_proj") for n in names):
        return "fused 3-D: experts.gate_up_proj [E, 2I, H] (gate rows first, then up), experts.down_proj [E, H, I]"
    if any(re.search(r"experts\.\d+\.w1\.weight$", n) for n in names):
        return "per-expert Mixtral: experts.E.w1 (gate) / w3 (up) [I, H], experts.E.w2 (down) [H, I]"
    if any(re.search(r"experts\.\d+\.gate_proj\.weight$", n) for n in names):
        return "per-expert: experts.E.{gate,up}_proj.weight [I, H], experts.E.down_proj.weight [H, I]"
    return "none (no routed experts)"


def make_one(name, spec, out, seed):
    cfg_cls, model_cls, kw = spec
    C = getattr(transformers, cfg_cls)
    M = getattr(transformers, model_cls)
    cfg = C(**kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # 5.17 defaults to "grouped_mm"; eager is the plain per-expert loop
    k = cfg.num_experts_per_tok
    ids = torch.tensor([INPUT_IDS], dtype=torch.int64)
    # pick the first seed whose routing is far from ties (so a 1e-4 logit tolerance can't flip a top-k choice)
    for attempt in range(50):
        s = seed + 1000 * attempt
        torch.manual_seed(s)
        model = M(cfg).eval()
        reinit(model, s)
        store = []
        hooks = router_hooks(model, store)
        logits = forward(model, ids)
        for h in hooks:
            h.remove()
        margin, distinct = topk_margin(store, k)
        if margin > 2e-3 and distinct >= 3:
            break
    else:
        raise RuntimeError(f"{name}: no seed with a clear top-k margin")
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))

    # reload what was written and check it reproduces the logits (tests the on-disk layout, not the in-memory one)
    re_model = M.from_pretrained(d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    logits2 = forward(re_model, ids)
    reload_diff = (logits2 - logits).abs().max().item()
    assert reload_diff == 0.0, (name, reload_diff)
    m64 = M.from_pretrained(d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float64).eval()
    logits64 = forward(m64, ids)
    f64_diff = (logits64 - logits.double()).abs().max().item()

    save_file(
        {"input_ids": ids.contiguous(), "logits": logits.float().contiguous(), "logits_f64": logits64.contiguous()},
        os.path.join(d, "reference.safetensors"),
    )
    table = tensor_table(os.path.join(d, "model.safetensors"))
    cfg_json = json.load(open(os.path.join(d, "config.json")))
    meta = dict(
        name=name,
        seed=s,
        architectures=cfg_json.get("architectures"),
        model_type=cfg_json.get("model_type"),
        n_params=sum(p.numel() for p in model.parameters()),
        input_ids=INPUT_IDS,
        logits_shape=list(logits.shape),
        logits_absmax=logits.abs().max().item(),
        logits_std=logits.std().item(),
        argmax=logits[0].argmax(-1).tolist(),
        min_topk_prob_gap=margin,
        min_distinct_expert_sets_per_layer=distinct,
        reload_max_abs_diff=reload_diff,
        f32_vs_f64_max_abs_diff=f64_diff,
        expert_layout=layout_of(table),
        tensors=table,
        file_bytes=os.path.getsize(os.path.join(d, "model.safetensors")),
    )
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"), indent=1)
    print(
        f"{name}: params={meta['n_params']} seed={s} margin={margin:.4f} distinct={distinct} "
        f"|logits|max={meta['logits_absmax']:.3f} std={meta['logits_std']:.3f} f64diff={f64_diff:.2e} "
        f"layout={meta['expert_layout'][:40]} bytes={meta['file_bytes']}",
        flush=True,
    )
    return model, cfg, logits, logits64, meta


def make_other_layout(src_name, dst_name, out, M, cfg, logits, logits64):
    src = os.path.join(out, src_name)
    dst = os.path.join(out, dst_name)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        md = f.metadata()
    new, desc = rewrite_expert_layout(sd, cfg)
    save_file(new, os.path.join(dst, "model.safetensors"), metadata=md)
    shutil.copy(os.path.join(src, "config.json"), dst)
    shutil.copy(os.path.join(src, "reference.safetensors"), dst)
    # transformers must load the rewritten layout too and give the same logits
    m = M.from_pretrained(dst, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor([INPUT_IDS], dtype=torch.int64)
    diff = (forward(m, ids) - logits).abs().max().item()
    table = tensor_table(os.path.join(dst, "model.safetensors"))
    meta = json.load(open(os.path.join(src, "meta.json")))
    meta.update(
        name=dst_name,
        rewritten_from=src_name,
        rewrite=desc,
        transformers_reload_max_abs_diff=diff,
        expert_layout=layout_of(table),
        tensors=table,
        file_bytes=os.path.getsize(os.path.join(dst, "model.safetensors")),
    )
    json.dump(meta, open(os.path.join(dst, "meta.json"), "w"), indent=1)
    print(f"{dst_name}: {desc}; transformers reload diff {diff:.2e}; layout={meta['expert_layout'][:40]}", flush=True)
    assert diff < 1e-5, diff
    return meta


FLAGS = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "topk_method",
    "routed_scaling_factor",
    "n_shared_experts",
    "first_k_dense_replace",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "qkv_bias",
    "attention_bias",
    "clip_qkv",
    "decoder_sparse_step",
    "mlp_only_layers",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
    "dtype",
    "torch_dtype",
]


def write_readme(out, metas):
    L = []
    L.append("# Parity fixtures (issue 3)\n")
    L.append(
        f"Made by `tools/make_parity_fixtures.py` with transformers {transformers.__version__}, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}. Each fixture is a tiny randomly initialised "
        "float32 checkpoint (`config.json`, `model.safetensors` written by `save_pretrained(safe_serialization=True)`), "
        "and `reference.safetensors` with `input_ids` (int64 [1,S]), `logits` (f32 [1,S,V], transformers forward on CPU "
        "in float32, eager attention, no cache, no attention mask => causal) and `logits_f64` (the same checkpoint run "
        "in float64, for judging how much of a difference is f32 noise). `meta.json` lists every tensor with its shape, "
        "the seed, and the router margin.\n"
    )
    L.append(f"Input ids (S={len(INPUT_IDS)}, vocab {VOCAB}): `{INPUT_IDS}`.\n")
    L.append(
        "Weights are re-initialised after construction (norm weights 1+0.1·N, biases 0.05·N, embeddings N(0,1), "
        "routers 0.35·N, shared-expert gate 0.3·N, all other matrices 0.1·N), and the seed is advanced until the "
        "smallest gap between the k-th and (k+1)-th softmax router probability over all tokens and layers is > 2e-3 "
        "(so a 1e-4-accurate forward cannot pick a different expert) and every MoE layer uses ≥ 3 distinct expert "
        "sets.\n"
    )
    L.append("| fixture | model_type | params | layers | experts/top-k | expert layout on disk | min top-k gap | max |logit| | f32 vs f64 | bytes |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in metas:
        cfg = json.load(open(os.path.join(out, m["name"], "config.json")))
        E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
        L.append(
            f"| `{m['name']}` | {m['model_type']} | {m['n_params']} | {cfg['num_hidden_layers']} | "
            f"{E}/{cfg['num_experts_per_tok']} | {m['expert_layout']} | {m['min_topk_prob_gap']:.4f} | "
            f"{m['logits_absmax']:.3f} | {m['f32_vs_f64_max_abs_diff']:.1e} | {m['file_bytes']} |"
        )
    L.append("")
    for m in metas:
        cfg = json.load(open(os.path.join(out, m["name"], "config.json")))
        L.append(f"## `{m['name']}`\n")
        if m.get("rewritten_from"):
            L.append(
                f"Same weights and reference as `{m['rewritten_from']}`, expert tensors rewritten ({m['rewrite']}); "
                f"transformers loads it and reproduces the logits (max diff {m['transformers_reload_max_abs_diff']:.1e}).\n"
            )
        flags = {k: cfg[k] for k in FLAGS if k in cfg}
        L.append("Config flags that matter: `" + json.dumps(flags) + "`\n")
        L.append("Tensors (layer 0 and globals; other layers alike):\n")
        L.append("```")
        for k, (shape, dt) in m["tensors"].items():
            if re.search(r"layers\.(\d+)\.", k) and not re.search(r"layers\.0\.", k):
                # show layer 1 only where it differs in kind (first_k_dense_replace)
                if not (re.search(r"layers\.1\.", k) and "deepseek" in m["model_type"]):
                    continue
            if re.search(r"experts\.([1-9]\d*)\.", k):
                continue
            L.append(f"{k} {shape} {dt}")
        L.append("```\n")
    L.append(NOTES)
    open(os.path.join(out, "README.md"), "w").write("\n".join(L))


NOTES = """## Notes for the Rust forward (read from transformers 5.17's modeling code)

- Routed experts are stored *in memory* as fused 3-D parameters `experts.gate_up_proj` [E, 2I, H] and
  `experts.down_proj` [E, H, I] in every family here; `gate, up = (x @ gate_up_proj[e].T).chunk(2)`, i.e. the first
  I rows are the gate. But `save_pretrained` in 5.17 reverses its load-time conversion and *writes the Hub's
  per-expert layout* (see the table: `experts.E.{gate,up,down}_proj.weight`; Mixtral `block_sparse_moe.experts.E.w1/w3/w2`).
  `olmoe_fused` is the olmoe checkpoint rewritten by this script in the fused layout; transformers 5.17 loads both.
- 5.17 computes the routed experts with `experts_implementation="grouped_mm"` by default (torch._grouped_mm);
  the references here use `"eager"` (the per-expert loop). Both are f32; the fused path is not bit-identical.
- config.json in 5.x writes RoPE as `rope_parameters: {rope_type, rope_theta}` (no top-level `rope_theta`; older
  Hub configs have `rope_theta` + `rope_scaling`: accept both). DeepSeek-V2's config.json has `head_dim` =
  qk_rope_head_dim and `qk_head_dim` = nope + rope (written by 5.x); don't use `head_dim` as the attention head size there.
  Mixtral writes `head_dim: null` (=> hidden/heads).
- Mixtral: router softmax (f32) -> top-k -> always renormalised (no `norm_topk_prob` field).
- OLMoE: `q_norm` is an RMSNorm over the whole projected q (size num_heads*head_dim), `k_norm` over the whole k
  (num_kv_heads*head_dim), applied before the head split and before RoPE; then `clip_qkv` clamps q, k, v (after the
  norms) when set (`olmoe_clipqkv`). softmax -> top-k, renormalised only if `norm_topk_prob`.
- Qwen2-MoE: q/k/v have biases (`qkv_bias`), o_proj none; out = routed + sigmoid(shared_expert_gate·x) * shared_expert(x);
  softmax -> top-k -> renorm iff `norm_topk_prob`.
- Qwen3-MoE: per-head q_norm/k_norm (RMSNorm over head_dim, weight [head_dim]) before RoPE; `head_dim` from config
  (16 here, not hidden/heads); `norm_topk_prob` true.
- RoPE (Mixtral/OLMoE/Qwen): rotate_half convention (pairs i and i+d/2), inv_freq = theta^(-2i/d), theta from
  `rope_parameters.rope_theta`.
- DeepSeek-V2: RoPE is the *interleaved* (complex, pairs 2i and 2i+1) convention over the last `qk_rope_head_dim`
  dims of q and of the shared k_pe, rope dim = qk_rope_head_dim; softmax scale = (qk_nope_head_dim +
  qk_rope_head_dim)^-0.5 (yarn mscale only with rope_type yarn). `kv_a_proj_with_mqa` gives [kv_lora_rank |
  qk_rope_head_dim]; `kv_a_layernorm` (and `q_a_layernorm` when q_lora_rank is set) are RMSNorms with eps 1e-6
  fixed in code (not config.rms_norm_eps); `kv_b_proj` output per head is [qk_nope | v]. Router: softmax in f32 ->
  greedy top-k (no renorm in code, `norm_topk_prob` unused) -> weights * `routed_scaling_factor`; shared experts
  (one MLP of width moe_intermediate_size*n_shared_experts) added unweighted. Layers < `first_k_dense_replace` use a
  dense MLP of `intermediate_size`.
- All RMSNorms: x * rsqrt(mean(x^2) + eps) * weight, computed in f32.
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    os.makedirs(a.out, exist_ok=True)
    print(f"transformers {transformers.__version__} torch {torch.__version__}", flush=True)
    metas = []
    specs = family_specs()
    failures = []
    for i, (name, spec) in enumerate(specs.items()):
        try:
            model, cfg, logits, logits64, meta = make_one(name, spec, a.out, a.seed + i)
            metas.append(meta)
            if name == "olmoe":
                # the same weights in the other expert layout: 5.17 writes per-expert tensors, so this is the fused one
                M = getattr(transformers, spec[1])
                other = "olmoe_fused" if meta["expert_layout"].startswith("per-expert") else "olmoe_per_expert"
                metas.append(make_other_layout("olmoe", other, a.out, M, cfg, logits, logits64))
        except Exception as e:  # keep going: one family failing must not lose the others
            import traceback

            traceback.print_exc()
            failures.append((name, repr(e)))
    write_readme(a.out, metas)
    for m in metas:
        assert m["file_bytes"] < 1_000_000, (m["name"], m["file_bytes"])
    if failures:
        print("FAILED:", failures, flush=True)
        sys.exit(1)
    print("all fixtures written", flush=True)


if __name__ == "__main__":
    main()

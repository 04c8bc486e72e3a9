#!/usr/bin/env python3
"""Write a randomly initialised OLMoE checkpoint of OLMoE-1B-7B's shape (issue 5, streaming).

The real OLMoE-1B-7B cannot be downloaded on the GPU machine (no internet). Timing and memory
of `aimc eval --backend cuda` on a model of that size do not depend on the weights' values, so
this writes one with OLMoE-1B-7B's layer shapes (16 layers, d = 2048, 16 heads, 64 routed
experts of 2048 → 1024 → 2048, top-8, q/k norms) and the embedded model's tokenizer, so the
default eval text scores with it (vocabulary 4,096 instead of 50,304: 0.4 % of the weights).

    <out>/config.json                      OlmoeForCausalLM, bf16
    <out>/model-000NN-of-000MM.safetensors one shard per decoder layer (+ embeddings and head)
    <out>/model.safetensors.index.json
    <out>/tokenizer.json                   copied from models/kjv-moe

Matrices are N(0, 0.02²) in bf16 (transformers' initializer_range), norms are 1. 6.9 B weights,
13.8 GB on disk. Usage: python3 tools/make_olmoe_size_checkpoint.py --out DIR [--layers 16]
Needs torch and safetensors; about a minute on 16 cores.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = os.path.join(HERE, "..", "models", "kjv-moe")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with open(os.path.join(EMBEDDED, "config.json")) as f:
        cfg = json.load(f)
    d, n, e, v = 2048, 1024, 64, cfg["vocab_size"]
    cfg.update(
        hidden_size=d,
        intermediate_size=n,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=e,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    def mat(rows, cols):
        return (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)

    def ones(k):
        return torch.ones(k, dtype=torch.bfloat16)

    shards = args.layers + 1
    weight_map = {}

    def write(i, tensors):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(args.out, name), metadata={"format": "pt"})
        for k in tensors:
            weight_map[k] = name

    write(0, {
        "model.embed_tokens.weight": mat(v, d),
        "lm_head.weight": mat(v, d),
        "model.norm.weight": ones(d),
    })
    for l in range(args.layers):
        p = f"model.layers.{l}."
        t = {
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
            p + "self_attn.q_norm.weight": ones(d),
            p + "self_attn.k_norm.weight": ones(d),
            p + "mlp.gate.weight": mat(e, d),
        }
        for proj in ("q", "k", "v", "o"):
            t[p + f"self_attn.{proj}_proj.weight"] = mat(d, d)
        for x in range(e):
            q = p + f"mlp.experts.{x}."
            t[q + "gate_proj.weight"] = mat(n, d)
            t[q + "up_proj.weight"] = mat(n, d)
            t[q + "down_proj.weight"] = mat(d, n)
        write(l + 1, t)
        print(f"layer {l} written", flush=True)

    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in set(weight_map.values()))
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shutil.copy(os.path.join(EMBEDDED, "tokenizer.json"), args.out)
    print(f"{args.out}: {args.layers} layers, {total / 1e9:.1f} GB")


if __name__ == "__main__":
    main()

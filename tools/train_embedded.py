#!/usr/bin/env python3
"""Train aimc's embedded default model: a small OLMoE-format MoE LM on the King James Bible (issue 3).

Inputs (made by tools/prep_corpus.py): --data DIR with train.txt, val.txt, kjv-heldout.txt, tokenizer.json.
Output (--out DIR): an HF checkpoint that transformers' OlmoeForCausalLM and aimc load:
    config.json, model-0000N-of-0000M.safetensors (bf16, every shard <= 15 MB, >= 2 shards),
    model.safetensors.index.json, tokenizer.json, training.json,
    reference.safetensors (input_ids int64 [1,64] from the held-out text, logits f32 [1,64,V]: CPU, float32
    forward of the saved bf16 weights, eager attention, eager experts)

    python3 tools/train_embedded.py --data .dev/kjv --out /tmp/kjv-moe            # GPU, ~2 min on an H100
    python3 tools/train_embedded.py --data .dev/kjv --out /tmp/x --smoke          # CPU logic check, seconds

Validation protocol (also used for kjv-heldout.txt): the split's text is tokenized as one stream (no special
tokens), cut into consecutive non-overlapping windows of --eval-len (512) tokens (the last partial window dropped);
in each window every token after the first is predicted from the ones before it inside the window; perplexity =
exp(mean NLL over all predicted tokens). Forward in float32 of the bf16-rounded weights.
Unigram baseline: token frequencies of the training stream with add-one smoothing over the whole vocabulary,
perplexity over the same predicted tokens of the validation split.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import OlmoeConfig, OlmoeForCausalLM


def log(*a):
    print(*a, flush=True)


def encode(tok, path):
    text = open(path, encoding="utf-8").read()
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def windows(stream, n):
    m = (len(stream) // n) * n
    return stream[:m].view(-1, n)


@torch.no_grad()
def eval_nll(model, stream, n, device, batch=16, dtype=torch.float32, autocast=False):
    """Sum of NLL and count of predicted tokens over non-overlapping windows of n tokens."""
    model.eval()
    W = windows(stream, n)
    tot, cnt = 0.0, 0
    for i in range(0, len(W), batch):
        x = W[i : i + batch].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
        logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += nll.item()
        cnt += x[:, 1:].numel()
    return tot, cnt


def unigram_ppl(train, val, vocab, n):
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    W = windows(val, n)
    tgt = W[:, 1:].reshape(-1)
    return math.exp(-logp[tgt].mean().item()), tgt.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--max-shard", default="10MB")
    ap.add_argument("--max-train-seconds", type=float, default=330.0,
                    help="if the first 20 steps project past this, lower --steps (the cosine schedule follows)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to check the logic")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.batch, a.seq, a.eval_every, a.warmup = 6, 2, 64, 3, 2
        a.hidden, a.layers, a.experts, a.inter = 64, 2, 8, 32

    t_start = time.time()
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    log(f"torch {torch.__version__} transformers {transformers.__version__} device {device}"
        + (f" {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    tok = Tokenizer.from_file(os.path.join(a.data, "tokenizer.json"))
    V = tok.get_vocab_size()
    eot = tok.token_to_id("<|endoftext|>")
    train = encode(tok, os.path.join(a.data, "train.txt"))
    val = encode(tok, os.path.join(a.data, "val.txt"))
    held = encode(tok, os.path.join(a.data, "kjv-heldout.txt"))
    if a.smoke:
        val = val[: 4 * a.eval_len + 1]
        held = held[: 2 * a.eval_len + 1]
    log(f"vocab {V} train tokens {len(train)} val tokens {len(val)} heldout-excerpt tokens {len(held)}")

    cfg = OlmoeConfig(
        vocab_size=V,
        hidden_size=a.hidden,
        intermediate_size=a.inter,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        hidden_act="silu",
        max_position_embeddings=1024,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        num_experts=a.experts,
        num_experts_per_tok=a.topk,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=a.aux_coef,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=eot,
    )
    cfg._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    model = OlmoeForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    groups = {"embeddings": 0, "lm_head": 0, "attention": 0, "router": 0, "experts": 0, "norms": 0}
    for n, p in model.named_parameters():
        if "embed_tokens" in n:
            groups["embeddings"] += p.numel()
        elif n.startswith("lm_head"):
            groups["lm_head"] += p.numel()
        elif "mlp.gate." in n:
            groups["router"] += p.numel()
        elif "experts" in n:
            groups["experts"] += p.numel()
        elif "norm" in n:
            groups["norms"] += p.numel()
        else:
            groups["attention"] += p.numel()
    log(f"params {n_params} {groups} experts_impl={cfg._experts_implementation_internal if hasattr(cfg, '_experts_implementation_internal') else '?'}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        p = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(a.seed)
    train_dev = train.to(device)
    hist = []
    best = (float("inf"), -1, None)
    t_train = time.time()
    tokens_seen = 0
    last_loss = float("nan")
    step = -1
    while step + 1 < a.steps:
        step += 1
        model.train()
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        starts = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=g).to(device)
        idx = starts[:, None] + torch.arange(a.seq + 1, device=device)[None, :]
        xb = train_dev[idx]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=xb[:, :-1], labels=xb[:, :-1], output_router_logits=True, use_cache=False)
        # labels=input_ids: transformers shifts internally (predicts token t+1 from <= t)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += a.batch * a.seq
        if step == 19:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t_train) / 20
            if per * a.steps > a.max_train_seconds:
                new_steps = max(a.warmup + 100, int(a.max_train_seconds / per))
                log(f"{per*1000:.0f} ms/step: lowering steps {a.steps} -> {new_steps}")
                a.steps = new_steps
            else:
                log(f"{per*1000:.0f} ms/step, projected {per*a.steps:.0f}s")
        if step % 20 == 0 or step == a.steps - 1:
            last_loss = loss.item()
            aux = out.aux_loss.item() if out.aux_loss is not None else float("nan")
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            tot, cnt = eval_nll(model, val, a.eval_len, device, autocast=device.type == "cuda")
            vl = tot / cnt
            el = time.time() - t_train
            hist.append(dict(step=step + 1, train_loss=round(last_loss, 4), aux_loss=round(aux, 4),
                             val_loss_bf16autocast=round(vl, 4), lr=lr_at(step), seconds=round(el, 1)))
            log(f"step {step+1} train {last_loss:.4f} (incl. aux {a.aux_coef}*{aux:.3f}) val {vl:.4f} "
                f"ppl {math.exp(vl):.2f} lr {lr_at(step):.2e} {el:.0f}s")
            if vl < best[0]:
                best = (vl, step + 1, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t_train
    log(f"training done in {train_seconds:.1f}s; best val (autocast) {best[0]:.4f} at step {best[1]}")
    model.load_state_dict(best[2])

    # bf16-rounded weights, evaluated in float32
    # round the parameters only: Module.to(bf16) would also round the RoPE inv_freq buffer
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model.eval()
    model.config._attn_implementation = "eager"
    tot, cnt = eval_nll(model, val, a.eval_len, device)
    val_loss = tot / cnt
    htot, hcnt = eval_nll(model, held, a.eval_len, device)
    uni_ppl, uni_cnt = unigram_ppl(train, val, V, a.eval_len)
    uni_held, _ = unigram_ppl(train, held, V, a.eval_len)
    log(f"val (f32 forward of bf16 weights): loss {val_loss:.4f} ppl {math.exp(val_loss):.3f} over {cnt} tokens; "
        f"heldout excerpt ppl {math.exp(htot / hcnt):.3f} over {hcnt}; unigram val ppl {uni_ppl:.2f} heldout {uni_held:.2f}")

    # sample
    prompt = "And God said,"
    ids = torch.tensor([tok.encode(prompt).ids], device=device)
    with torch.no_grad():
        for _ in range(40):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    sample = tok.decode(ids[0].tolist())
    log("greedy sample:", repr(sample))

    # save bf16, sharded
    os.makedirs(a.out, exist_ok=True)
    for f in os.listdir(a.out):
        os.remove(os.path.join(a.out, f))
    import copy

    save_model = copy.deepcopy(model).to("cpu").to(torch.bfloat16)
    save_model.config.output_router_logits = False
    save_model.save_pretrained(a.out, safe_serialization=True, max_shard_size=a.max_shard)
    for f in os.listdir(a.out):
        if f not in ("config.json",) and not f.endswith(".safetensors") and not f.endswith(".index.json"):
            os.remove(os.path.join(a.out, f))
    tok.save(os.path.join(a.out, "tokenizer.json"))
    shards = sorted(f for f in os.listdir(a.out) if f.endswith(".safetensors"))
    sizes = {f: os.path.getsize(os.path.join(a.out, f)) for f in shards}
    log("shards", sizes)
    layout = set()
    dtypes = set()
    for f in shards:
        with safe_open(os.path.join(a.out, f), "pt") as fh:
            for k in fh.keys():
                dtypes.add(str(fh.get_slice(k).get_dtype()))
                if "experts" in k:
                    layout.add(k.split("experts.")[1].split(".", 1)[-1] if k.split("experts.")[1][0].isdigit()
                               else k.split("experts.")[1])
    log("expert tensors:", sorted(layout), "dtypes", dtypes)
    if not a.smoke:
        assert len(shards) >= 2 and all(s <= 15_000_000 for s in sizes.values()), sizes
        assert sum(sizes.values()) <= 24_000_000, sizes

    # reference: CPU, float32 forward of the saved bf16 weights, eager attention and experts
    ref_ids = held[:64].view(1, 64).clone()
    m = OlmoeForCausalLM.from_pretrained(a.out, dtype=torch.float32, attn_implementation="eager",
                                         experts_implementation="eager").eval()
    with torch.no_grad():
        ref_logits = m(input_ids=ref_ids, use_cache=False).logits.float().contiguous()
    save_file({"input_ids": ref_ids.contiguous(), "logits": ref_logits}, os.path.join(a.out, "reference.safetensors"))
    # the reloaded checkpoint must reproduce the in-memory model
    with torch.no_grad():
        mem = model.to("cpu")
        d = (mem(input_ids=ref_ids, use_cache=False).logits - ref_logits).abs().max().item()
    log(f"reference logits: max|l|={ref_logits.abs().max().item():.3f}; reload vs in-memory max diff {d:.2e}")
    ref_nll = F.cross_entropy(ref_logits[0, :-1], ref_ids[0, 1:]).item()

    info = dict(
        model_type="olmoe",
        architecture=dict(hidden=a.hidden, layers=a.layers, heads=a.heads, head_dim=a.hidden // a.heads,
                          experts=a.experts, expert_intermediate=a.inter, top_k=a.topk, vocab=V,
                          max_position=1024, rope_theta=10000.0, norm_topk_prob=False, tie_word_embeddings=False),
        parameters=n_params,
        parameter_groups=groups,
        checkpoint_bytes=sum(sizes.values()),
        shards=sizes,
        checkpoint_dtype="bfloat16",
        expert_tensor_layout=("per-expert: model.layers.N.mlp.experts.E.{gate,up}_proj.weight [I,H], "
                              "experts.E.down_proj.weight [H,I] (save_pretrained in transformers 5.17 writes the Hub "
                              "layout although the model holds fused experts.gate_up_proj/down_proj in memory)"
                              if layout == {"down_proj.weight", "gate_proj.weight", "up_proj.weight"}
                              else sorted(layout)),
        steps=a.steps,
        best_step=best[1],
        batch=a.batch,
        seq_len=a.seq,
        tokens_seen=tokens_seen,
        epochs=tokens_seen / len(train),
        optimizer=dict(name="AdamW", lr=a.lr, betas=[0.9, 0.95], weight_decay=a.wd, warmup=a.warmup,
                       schedule="cosine", min_lr_frac=a.min_lr_frac, grad_clip=1.0),
        router_aux_loss_coef=a.aux_coef,
        precision="bf16 autocast, f32 master weights",
        train_wall_seconds=round(train_seconds, 1),
        total_wall_seconds=round(time.time() - t_start, 1),
        final_train_loss=last_loss,
        val_loss=val_loss,
        val_ppl=math.exp(val_loss),
        val_tokens_scored=cnt,
        heldout_excerpt_ppl=math.exp(htot / hcnt),
        heldout_excerpt_tokens_scored=hcnt,
        unigram_val_ppl=uni_ppl,
        unigram_heldout_excerpt_ppl=uni_held,
        eval_protocol=f"non-overlapping {a.eval_len}-token windows of the tokenized split (one stream, no special "
                      "tokens), each token after the first in a window predicted from the window's earlier tokens; "
                      "f32 forward of the bf16-rounded weights; unigram = add-one smoothed training-token frequencies, "
                      "same predicted tokens",
        checkpoint_selection="lowest validation loss (bf16 autocast) over evaluations every "
                             f"{a.eval_every} steps",
        reference=dict(input_ids="first 64 tokens of kjv-heldout.txt", nll=ref_nll,
                       reload_vs_memory_max_abs_diff=d),
        corpus="King James Bible, Debian bible-kjv-text 4.38 (public domain); chapters with 0-based index % 20 == 19 held out",
        train_tokens=len(train),
        val_tokens=len(val),
        tokenizer=dict(kind="byte-level BPE (tokenizers)", vocab=V, special=["<|endoftext|>"], eot_id=eot),
        sample=dict(prompt=prompt, greedy=sample),
        history=hist,
        seed=a.seed,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      tokenizers=__import__("tokenizers").__version__, python=sys.version.split()[0]),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    )
    json.dump(info, open(os.path.join(a.out, "training.json"), "w"), indent=1)
    log(json.dumps({k: v for k, v in info.items() if k not in ("history",)}, indent=1))


if __name__ == "__main__":
    main()

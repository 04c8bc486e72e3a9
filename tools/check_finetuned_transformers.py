#!/usr/bin/env python3
"""Check that a checkpoint written by aimc (e.g. `aimc finetune --out DIR`) loads in HuggingFace
transformers and that its digital logits there match aimc's.

Runs beside PyTorch and transformers (CPU torch is enough). One command:

    python3 tools/check_finetuned_transformers.py --model DIR [--aimc PATH] [--tokens 128] [--bound 1e-4]

or, where no aimc binary is at hand, with aimc's logits made elsewhere by
`aimc eval --digital --model DIR --tokens 128 --seq-len 128 --logits-out FILE` (tools/interop_prepare.sh
packs both for the GPU machine):

    python3 tools/check_finetuned_transformers.py --model DIR --logits FILE

1. `aimc eval --digital --model DIR --logits-out FILE` tokenises the start of the evaluation text
   with the checkpoint's tokenizer and writes the input ids and aimc's digital f32 logits of one
   window (`input_ids` int64 [1, S], `logits` f32 [1, S, V], the layout of tests/fixtures/parity).
2. transformers loads DIR with AutoModelForCausalLM in float32 (eager attention and experts, as the
   parity fixtures were made); any missing, unexpected or mismatched tensor is a failure.
3. The same ids through transformers on the CPU; PASS when max |logit difference| <= --bound
   (1e-4, the bound of tests/model_parity.rs and tests/model_embedded.rs), else FAIL.

Prints one line per step and a final `PASS` or `FAIL` line; exits 0 on PASS, 1 on FAIL, 2 on a
usage or environment error.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile


def find_aimc(given):
    if given:
        return given
    for cand in ("target/release/aimc", ".dev/aimc", shutil.which("aimc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory written by aimc")
    ap.add_argument("--aimc", help="aimc binary (default: target/release/aimc, .dev/aimc, or on PATH)")
    ap.add_argument("--logits", help="aimc's logits already written by `aimc eval --digital --logits-out` "
                    "(then no aimc binary is run)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens of the window compared (default 128)")
    ap.add_argument("--text", help="text to tokenise (default: aimc's embedded held-out text)")
    ap.add_argument("--bound", type=float, default=1e-4, help="max |logit difference| accepted (default 1e-4)")
    args = ap.parse_args()

    if not os.path.isdir(args.model):
        print(f"error: --model {args.model}: not a directory", file=sys.stderr)
        return 2
    aimc = None if args.logits else find_aimc(args.aimc)
    if args.logits and not os.path.isfile(args.logits):
        print(f"error: --logits {args.logits}: no such file", file=sys.stderr)
        return 2
    if aimc is None and not args.logits:
        print("error: no aimc binary (build it with `cargo build --release` or pass --aimc PATH)", file=sys.stderr)
        return 2
    if args.tokens < 2:
        print(f"error: --tokens {args.tokens}: at least 2", file=sys.stderr)
        return 2

    import torch
    import transformers
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        out = args.logits or os.path.join(tmp, "aimc-logits.safetensors")
        if not args.logits:
            cmd = [aimc, "eval", "--digital", "--json", "--model", args.model, "--tokens", str(args.tokens),
                   "--seq-len", str(args.tokens), "--logits-out", out]
            if args.text:
                cmd += ["--text", args.text]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"FAIL: aimc could not evaluate {args.model}:\n{run.stderr.strip()}")
                return 1
        got = load_file(out)
        ids, aimc_logits = got["input_ids"], got["logits"]
        print(f"aimc: {ids.shape[1]} tokens, logits {tuple(aimc_logits.shape)} ({aimc or out})")

        kw = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                args.model, experts_implementation="eager", **kw)
        except TypeError:
            # transformers before 5 has no experts_implementation (its experts are a plain loop).
            model, info = transformers.AutoModelForCausalLM.from_pretrained(args.model, **kw)
        model.eval()
        problems = {k: v for k, v in info.items() if v and k in
                    ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
        print(f"transformers {transformers.__version__}, torch {torch.__version__}: loaded "
              f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        if problems:
            for k, v in problems.items():
                print(f"  {k}: {list(v)[:8]}{' …' if len(v) > 8 else ''}")
            print("FAIL: transformers did not load every tensor of the checkpoint as written")
            return 1
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
        if ref.shape != aimc_logits.shape:
            print(f"FAIL: logits shape {tuple(ref.shape)} in transformers, {tuple(aimc_logits.shape)} in aimc")
            return 1
        diff = (ref - aimc_logits).abs()
        worst = diff.max().item()
        at = divmod(int(diff.argmax().item()), ref.shape[2])
        agree = (ref.argmax(-1) == aimc_logits.argmax(-1)).float().mean().item()
        print(f"max |logit - transformers| = {worst:.3e} at (position {at[0]}, token {at[1]}); "
              f"max |logit| = {ref.abs().max().item():.2f}; top-1 agreement {agree:.4f}")
        if worst <= args.bound:
            print(f"PASS: {args.model} loads in transformers and its logits match aimc's within {args.bound:g}")
            return 0
        print(f"FAIL: max |logit difference| {worst:.3e} > bound {args.bound:g}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

#!/bin/bash
# Packs what tools/check_finetuned_transformers.py needs on the GPU machine (which has torch and
# transformers but no Rust) into the git-ignored .dev/interop.tar.xz: the checkpoint DIR written by
# aimc and aimc's digital logits of its first 128 held-out tokens, made here. Usage:
#   bash tools/interop_prepare.sh DIR
# then one device call with `carry: [".dev/interop.tar.xz"]` and the command it prints.
set -eu
dir=${1:?usage: bash tools/interop_prepare.sh CHECKPOINT_DIR}
cd "$(dirname "$0")/.."
[ -d "$dir" ] || { echo "error: $dir: not a directory" >&2; exit 2; }
cargo build --release
rm -rf .dev/interop && mkdir -p .dev/interop
cp -rL "$dir" .dev/interop/checkpoint
target/release/aimc eval --digital --json --model .dev/interop/checkpoint --tokens 128 --seq-len 128 \
  --logits-out .dev/interop/aimc-logits.safetensors >/dev/null
# The device call takes 64 MiB with the tracked tree (~34 MB); bf16 weights compress little.
tar -C .dev -cf - interop | xz -T0 -6 > .dev/interop.tar.xz
du -h .dev/interop.tar.xz
echo 'device command (carry [".dev/interop.tar.xz"]):'
echo 'tar -C /tmp -xJf .dev/interop.tar.xz && python3 tools/check_finetuned_transformers.py --model /tmp/interop/checkpoint --logits /tmp/interop/aimc-logits.safetensors'

#!/bin/bash
# One GPU-machine call for issue 3: parity fixtures + embedded-model training (two configurations in parallel,
# the one with the lower validation perplexity is kept). Needs .dev/kjv from tools/prep_corpus.py (carry .dev).
# Results under $OUT (at most 8 files): log.txt, parity.tgz, kjv-moe.tar.NN (15 MB pieces), A.log, B.log, other-training.json
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=/tmp/work; rm -rf $W; mkdir -p $W
nvidia-smi -L
python3 -c "import torch,transformers,tokenizers,safetensors;print('torch',torch.__version__,'transformers',transformers.__version__,'tokenizers',tokenizers.__version__,'safetensors',safetensors.__version__,'cuda',torch.cuda.is_available())"

# the two trainings start first (GPU), the fixtures run meanwhile on the CPU
python3 tools/train_embedded.py --data .dev/kjv --out $W/A > $OUT/A.log 2>&1 &
PA=$!
python3 tools/train_embedded.py --data .dev/kjv --out $W/B --steps 3000 --batch 24 --lr 1.5e-3 > $OUT/B.log 2>&1 &
PB=$!

CUDA_VISIBLE_DEVICES= python3 tools/make_parity_fixtures.py --out $W/parity > $W/fx.log 2>&1
echo "fixtures rc=$?"
grep -v "Loading weights\|Writing model" $W/fx.log
(cd $W && tar czf $OUT/parity.tgz parity)

wait $PA; echo "A rc=$?"
wait $PB; echo "B rc=$?"
grep -v "Loading weights\|Writing model" $OUT/A.log | grep -v '^ \|^{\|^}' | tail -40
grep -v "Loading weights\|Writing model" $OUT/B.log | grep -v '^ \|^{\|^}' | tail -40
best=$(python3 - <<'E'
import json
r = {}
for k in "AB":
    try:
        r[k] = json.load(open(f"/tmp/work/{k}/training.json"))["val_ppl"]
    except Exception as e:
        print("no", k, e, file=__import__("sys").stderr)
print(min(r, key=r.get) if r else "none")
E
)
echo "best=$best"
if [ "$best" != none ]; then
  other=$([ "$best" = A ] && echo B || echo A)
  [ -f $W/$other/training.json ] && cp $W/$other/training.json $OUT/other-training.json
  rm -rf $W/kjv-moe; cp -r $W/$best $W/kjv-moe
  ls -la $W/kjv-moe
  (cd $W && tar cf - kjv-moe | split -b 15000000 -d - $OUT/kjv-moe.tar.)
fi
ls -la $OUT

#!/bin/bash
# SASS opcode mix and hottest instructions of one grouped-GEMM launch (default: the first
# analog gate/up GEMM of the OLMoE shape on the Lightning feature set; KERNEL, SKIP, PRESET
# override), into $OUT/opcodes.txt. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
export AIMC_NVRTC_LINEINFO=1
timeout 250 ncu --clock-control none --section SourceCounters --export "$OUT/k" -f \
  -k "regex:${KERNEL:-^moe_gemm\$}" --launch-skip ${SKIP:-46} -c 1 \
  $B/aimc bench --suite gpu --shapes olmoe --repeats 20 --gpu-preset ${PRESET:-$BASIC} > "$OUT/ncu.log" 2>&1
echo "ncu rc=$?"
ncu --import "$OUT/k.ncu-rep" --page source --csv --print-source sass > "$OUT/sass.csv" 2> "$OUT/sass.err"
echo "import rc=$? $(wc -l < "$OUT/sass.csv") lines"
python3 - "$OUT/sass.csv" > "$OUT/opcodes.txt" <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
h0 = next(i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r))
head, rows = rows[h0], rows[h0:]
print("columns:", head[:12])
src = next(i for i, h in enumerate(head) if h.strip().lower() == "source")
ex = next(i for i, h in enumerate(head) if "Instructions Executed" in h and "Predicated" not in h)
total = 0
by_op = collections.Counter()
lines = []
for r in rows[1:]:
    try:
        n = float(r[ex].replace(",", ""))
    except (ValueError, IndexError):
        continue
    text = r[src].strip()
    toks = text.split()
    op = toks[1] if toks and toks[0].startswith("@") and len(toks) > 1 else (toks[0] if toks else "?")
    by_op[op.split(".")[0]] += n
    total += n
    lines.append((n, r[0], text))
print(f"total warp instructions {total:.4g}")
for op, n in by_op.most_common(40):
    print(f"{op:12s} {n:14.4g} {100*n/total:6.2f} %")
print("hottest instructions:")
for n, addr, text in sorted(lines, reverse=True)[:60]:
    print(f"{n:12.4g} {addr} {text[:90]}")
PY
head -120 "$OUT/opcodes.txt"
gzip -f "$OUT/sass.csv"; rm -f "$OUT/k.ncu-rep"

#!/usr/bin/env bash
# The end-to-end speed check on one lent GPU (H100/H200, torch 2.11 / triton 3.6; no pip install
# there, no deepspeed/xformers/DALI needed): bench/throughput.py (reference vs fast paths, ViT-B/16,
# batch 256, bf16, synthetic data; ~2-3 min with the fast path's compilation) then bench/profile.py
# (reference and fast, ~1-2 min). JSON, logs and the two Chrome traces go to $OUT (6 files); the two
# tables are printed last.
#
#   bash bench/device_speed.sh                 # on the device (the run tool sets $OUT)
#   bash bench/device_speed.sh --small         # the same plumbing on a CPU, in seconds
# Extra arguments go to both benchmarks.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# setup.py installs kernels/ as moca_fast.kernels; without an install, assemble that package from links.
SITE=$(mktemp -d)
mkdir "$SITE/moca_fast"
for entry in moca_fast/*; do ln -s "$PWD/$entry" "$SITE/moca_fast/"; done
ln -s "$PWD/kernels" "$SITE/moca_fast/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'EOF'
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
EOF

timeout 330 python3 bench/throughput.py --out "$OUT/throughput.json" "$@" > "$OUT/throughput.log" 2>&1
throughput_rc=$?
timeout 200 python3 bench/profile.py --out "$OUT/profile.json" --trace-dir "$OUT" "$@" > "$OUT/profile.log" 2>&1
profile_rc=$?
rm -rf "$SITE"

echo "== bench/profile.py (exit $profile_rc; log $OUT/profile.log) =="
tail -n 16 "$OUT/profile.log"
echo "== bench/throughput.py (exit $throughput_rc; log $OUT/throughput.log) =="
tail -n 12 "$OUT/throughput.log"
exit $(( throughput_rc != 0 || profile_rc != 0 ))

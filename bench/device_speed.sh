#!/usr/bin/env bash
# The end-to-end speed check on one lent GPU (H100/H200, torch 2.11 / triton 3.6; no pip install
# there): bench/throughput.py (reference, fast, trainer_fast, trainer_fast_recompute of bench/steps.py, ViT-B/16,
# batch 256, bf16, synthetic data; ~3-4 min with the fast paths' compilation) then bench/profile.py
# (reference and fast, ~1-2 min).
# The trainer variants need deepspeed there: run bash bench/device_wheels.sh here first and carry .whl
# (without it they report "unavailable" and the rest runs). JSON, logs and the two Chrome traces go to
# $OUT (6 files); the two tables are printed last.
#
#   bash bench/device_speed.sh                 # on the device (the run tool sets $OUT), timeout_s 540
#   bash bench/device_speed.sh --small         # the same plumbing on a CPU, in a minute
# Extra arguments go to both benchmarks (a --variants there wins over the default list here).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

source bench/device_env.sh

python3 - <<'EOF'
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
EOF

timeout 330 python3 bench/throughput.py --variants reference,fast,trainer_fast,trainer_fast_recompute --out "$OUT/throughput.json" "$@" > "$OUT/throughput.log" 2>&1
throughput_rc=$?
timeout 180 python3 bench/profile.py --out "$OUT/profile.json" --trace-dir "$OUT" "$@" > "$OUT/profile.log" 2>&1
profile_rc=$?
rm -rf "$DEVICE_SITE"

echo "== bench/profile.py (exit $profile_rc; log $OUT/profile.log) =="
tail -n 16 "$OUT/profile.log"
echo "== bench/throughput.py (exit $throughput_rc; log $OUT/throughput.log) =="
tail -n 12 "$OUT/throughput.log"
exit $(( throughput_rc != 0 || profile_rc != 0 ))

#!/usr/bin/env bash
# The end-to-end speed check on one lent GPU (H100/H200, torch 2.11 / triton 3.6; no pip install there):
# bench/throughput.py at ViT-B/16, batch 256, bf16, synthetic data, then bench/profile.py. With deepspeed
# importable (bash bench/device_wheels.sh here first, then carry .whl) they time what users run: the
# official-equivalent reference step against the trainer's own step with impl=fast (trainer_fast) and with
# activation_memory_budget=0.8 (trainer_fast_recompute), and profile reference and trainer_fast. Without
# deepspeed they fall back to the benches' own fast step. ~3-4 min for throughput (each compiled variant
# compiles its blocks), ~1-2 min for the profile (inductor's cache on disk serves it). JSON, logs and the
# two Chrome traces go to $OUT; the two tables are printed last.
#
#   bash bench/device_speed.sh                 # on the device (the run tool sets $OUT), timeout_s 540
#   bash bench/device_speed.sh --small         # the same plumbing on a CPU, in a minute
# Extra arguments go to both benchmarks (a --variants there wins over the lists here).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

source bench/device_env.sh

python3 - <<'PY'
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
PY
if python3 -c "import deepspeed" > /dev/null 2>&1; then
    throughput_variants=reference,trainer_fast,trainer_fast_recompute
    profile_variants=reference,trainer_fast
else
    echo "deepspeed does not import: timing the benches' own fast step instead of the trainer's"
    throughput_variants=reference,fast
    profile_variants=reference,fast
fi

timeout 330 python3 bench/throughput.py --variants "$throughput_variants" --out "$OUT/throughput.json" "$@" \
    > "$OUT/throughput.log" 2>&1
throughput_rc=$?
timeout 180 python3 bench/profile.py --variants "$profile_variants" --out "$OUT/profile.json" --trace-dir "$OUT" "$@" \
    > "$OUT/profile.log" 2>&1
profile_rc=$?
rm -rf "$DEVICE_SITE"

echo "== bench/profile.py (exit $profile_rc; log $OUT/profile.log) =="
tail -n 16 "$OUT/profile.log"
echo "== bench/throughput.py (exit $throughput_rc; log $OUT/throughput.log) =="
tail -n 12 "$OUT/throughput.log"
exit $(( throughput_rc != 0 || profile_rc != 0 ))

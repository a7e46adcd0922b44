#!/usr/bin/env bash
# Device check of the fused loss kernels (issue 4, item 7), for the lent H100/H200 (torch 2.11, triton 3.6,
# project not installed, nothing to download). From the repository root:
#     bash bench/device_kernels.sh          # `run` tool: timeout_s 300 leaves room for one rerun
#     bash bench/device_kernels.sh --small  # rehearsal of the whole script on the CPU (interpreter)
# 1. versions and GPU; 2. bench/kernels.py at ViT-B/16, batch 256, bf16 autocast: correctness first (fused vs
# fp32 eager: exact fp32 at batch 16, then bf16 at full size), then eager vs torch.compile(reference) vs fused,
# forward and forward+backward, median ms and peak extra MiB. The table is printed last; JSON under $OUT.
# Budget < 4 min: ~16 Triton kernel builds and 4 inductor graphs dominate; rows are written as they finish,
# the issue's target case (assign+dense) first, so a run cut short still reports it.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-225}
mkdir -p "$OUT"

source bench/device_env.sh

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: failed"
python3 - <<'EOF'
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", gpu)
for name in ("triton", "yaml", "numpy"):
    try:
        module = __import__(name)
        print(name, "ok", getattr(module, "__version__", ""))
    except Exception as e:
        print(name, "missing/failed:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
import moca_fast.kernels.soft_ce, moca_fast.kernels.codebook_assign  # noqa: E401
print("moca_fast.kernels ok")
EOF

echo "== bench/kernels.py $*"
timeout "$BUDGET_S" python3 bench/kernels.py "$@" --out "$OUT/kernels.json" 2>"$OUT/kernels_stderr.log"
status=$?
if [ "$status" -ne 0 ]; then
    echo "bench/kernels.py exited with $status (124: over the ${BUDGET_S}s budget); last stderr lines:"
    tail -n 25 "$OUT/kernels_stderr.log"
    exit "$status"
fi

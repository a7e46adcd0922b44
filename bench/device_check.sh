#!/usr/bin/env bash
# The whole device check on one lent GPU (H100/H200; torch 2.11, triton 3.6, nothing to download, the
# project not installed), at most 6 minutes with its set-up. Also `python -m bench device-check [...]`.
#     bash bench/device_check.sh --wheels  # HERE first (a machine with PyPI): fills .whl/ with deepspeed
#     bash bench/device_check.sh           # on the device: the run tool's command, carry [".whl"],
#                                          # timeout_s 420 (15 device minutes then allow a rerun)
#     bash bench/device_check.sh --small   # the same check as a CPU dry run (tiny sizes, Triton interpreter)
#
# The report, in this order (only the output's tail comes back, so it is printed at the end):
#   1. environment: torch, GPU, where moca_fast was imported from, each optional piece (deepspeed from the
#      carried wheels, xformers, DALI, apex, nvJPEG through torchvision, triton): ok / missing / failed: why;
#   2. every fused op against its PyTorch reference on the GPU, then 3. kernel timings: eager,
#      torch.compile(reference) and fused, peak extra memory, floors (bench/kernels.py);
#   4. the training step, ViT-B/16, batch 256, bf16 (bench/throughput.py): the official-equivalent
#      reference step, and the trainer's own DeepSpeed step with impl=reference and impl=fast, each with
#      ZeRO stage 2 and stage 0: img/s, MFU against the matmul ceiling measured in the run, peak memory, host
#      syncs in one more step (torch.cuda's sync debug mode + torch.cuda.synchronize calls); trainer_fast and
#      trainer_fast_zero0 are then timed again with the DeepSpeed defaults the trainer turns off put back
#      (moca_fast/train/host_syncs.py; 2 + 10 more steps each, "x DS dflt");
#   then one summary table of every stage. JSON and each stage's full log go to $OUT.
# The stages run in order of value, each under its own time limit so one hang cannot take the rest: the
# environment, then the training step (the issue's targets; without deepspeed it times the benches' own
# fast step instead), then the kernels (whose JSON is rewritten after each row, as throughput's after each
# variant, so a stage cut short still reports what it finished).
# Limits in seconds (overridable; they sum to the 6 minutes, what each stage really takes on a GPU is not
# measured yet): the wheels' install 30 (assemble_site), ENV_S 30, the deepspeed probe PROBE_S 20, STEP_S 180,
# KERNELS_S 100. Within the training step the variants run most valuable first, too.
set -uo pipefail
cd "$(dirname "$0")/.."

collect_wheels() {  # --wheels, HERE: the wheels the lent GPU machine lacks for the trainer variants
    # (../shared/DEVICE.md): deepspeed, built from its sdist, and its requirements missing there, for CPython
    # 3.12 manylinux, at the versions installed here (pydantic pins pydantic-core exactly). About 5 MB, in the
    # git-ignored .whl/; assemble_site unpacks them on the device.
    set -e
    rm -rf .whl
    mkdir .whl
    version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
    python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
    local pinned=() package
    for package in pydantic pydantic-core annotated-types typing-inspection hjson; do
        pinned+=("$package==$(version "$package")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pinned[@]}"
    ls -l .whl
    du -sh .whl
}

assemble_site() {  # the package as the device can import it; exports PYTHONPATH and DEVICE_SITE
    # The lent GPU machine has torch and triton but not this project, and cannot download: the package is
    # assembled in a scratch folder (setup.py's layout: kernels/ is moca_fast.kernels; pip install would try
    # to resolve torch), and the wheels carried in .whl/ are unpacked beside it. Python run from the
    # repository root must not see the root first on sys.path (`python3 -`, `python3 -c` put the working
    # directory there), or the repository's moca_fast, without its kernels, shadows the assembled copy: run
    # scripts by path, with `python3 -P` where that matters.
    DEVICE_SITE=$(mktemp -d)
    cp -r moca_fast "$DEVICE_SITE/moca_fast"
    rm -rf "$DEVICE_SITE/moca_fast/kernels"
    cp -r kernels "$DEVICE_SITE/moca_fast/kernels"
    if compgen -G ".whl/*.whl" > /dev/null; then
        timeout 30 python3 -P -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$DEVICE_SITE" .whl/*.whl \
            && echo "carried wheels: installed $(ls .whl | tr '\n' ' ')" \
            || echo "carried wheels: install failed (the trainer variants will report deepspeed missing)"
    else
        echo "carried wheels: none (.whl/ absent: the trainer variants will report deepspeed missing)"
    fi
    export PYTHONPATH="$DEVICE_SITE${PYTHONPATH:+:$PYTHONPATH}"
    export DEVICE_SITE
}

SMALL=()
case "${1:-}" in
    --wheels) collect_wheels; exit ;;
    --small) SMALL=(--small) ;;
    "") ;;
    *) echo "bench/device_check.sh: unknown argument '$1' (expected --wheels, --small or nothing)" >&2; exit 2 ;;
esac
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ENV_S=${ENV_S:-30} STEP_S=${STEP_S:-180} KERNELS_S=${KERNELS_S:-100} PROBE_S=${PROBE_S:-20}
: > "$OUT/stages.tsv"

stage() {  # name limit_s log command...: runs command under its limit, records name, exit status and seconds
    local name=$1 limit=$2 log=$3 start=$SECONDS
    shift 3
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >> "$OUT/stages.tsv"
    return $status
}

start=$SECONDS
assemble_site > "$OUT/setup.log" 2>&1
printf 'setup\t0\t%s\t-\n' "$((SECONDS - start))" >> "$OUT/stages.tsv"

stage environment "$ENV_S" "$OUT/env.log" python3 -P bench/device_report.py env --out "$OUT/env.json"
if timeout "$PROBE_S" python3 -P -c "import deepspeed" > /dev/null 2>&1; then
    variants=reference,trainer_fast,trainer_fast_zero0,trainer,trainer_zero0
else
    variants=reference,fast
fi
STEPS=()
if [ ${#SMALL[@]} -gt 0 ]; then STEPS=(--steps 1); fi  # the dry run: one timed step (interpreted kernels are slow)
stage training_step "$STEP_S" "$OUT/throughput.log" \
    python3 bench/throughput.py "${SMALL[@]}" "${STEPS[@]}" --variants "$variants" --out "$OUT/throughput.json"
stage kernels "$KERNELS_S" "$OUT/kernels.log" python3 bench/kernels.py "${SMALL[@]}" --out "$OUT/kernels.json"
rm -rf "$DEVICE_SITE"

echo "== 1. environment ($(tail -n 1 "$OUT/setup.log"))"
cat "$OUT/env.log"
echo "== 2-3. fused ops vs reference, kernel timings: bench/kernels.py (log $OUT/kernels.log)"
grep -v -e '^\[' -e '^wrote ' "$OUT/kernels.log" | tail -n 40
echo "== 4. training step: bench/throughput.py --variants $variants (log $OUT/throughput.log)"
grep -v -e '^wrote ' "$OUT/throughput.log" | tail -n 14
python3 -P bench/device_report.py summary "$OUT"
! cut -f2 "$OUT/stages.tsv" | grep -qv '^0$'

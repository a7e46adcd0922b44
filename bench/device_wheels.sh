#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a device run: fills .whl/ (git-ignored) with the wheels the lent GPU
# machine lacks for the trainer variants of bench/throughput.py (../shared/DEVICE.md): deepspeed, built from
# its sdist, and its requirements missing there, for CPython 3.12 manylinux, at the versions installed here
# (pydantic pins pydantic-core exactly). About 5 MB. Then pass carry: [".whl"] to the run tool;
# bench/device_env.sh unpacks them on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
pinned=()
for package in pydantic pydantic-core annotated-types typing-inspection hjson; do
    pinned+=("$package==$(version "$package")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pinned[@]}"
ls -l .whl
du -sh .whl

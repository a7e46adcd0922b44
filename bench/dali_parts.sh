#!/usr/bin/env bash
# DALI on the lent GPU machine, whose runs receive at most 64 MiB: its wheels (about 250 MB with nvImageCodec,
# nvCOMP and nvJPEG) go in parts over consecutive runs on one warm machine (../shared/DEVICE.md: ignored files
# sent by a run stay there for the next run on the same warm machine). Three sub-commands:
#   bash bench/dali_parts.sh pack        HERE (a machine with PyPI): downloads the wheels for CPython 3.12
#                                        manylinux at the versions installed here (or takes DALI_WHEELS_FROM, a
#                                        folder of wheels), tars them, splits the tar into PART_SIZE (56M) parts,
#                                        one per folder .dali/p<k>/, writes .dali/p0/MANIFEST (sha256 of each
#                                        part and of the tar) and prints the exact sequence of runs;
#   bash bench/dali_parts.sh check K     ON THE DEVICE, runs 0..N-2: part K arrived whole (sha256);
#   bash bench/dali_parts.sh join        ON THE DEVICE, the last run: every part whole, joined, the wheels
#                                        unpacked into .whl/, where bench/device_check.sh installs them (set
#                                        WHEELS_S=150: the DALI wheels take longer than deepspeed's to unpack).
# A missing or damaged part is one line naming it and exit status 2; the runs to resend are the parts named.
# 56M parts: one part plus .whl/'s deepspeed wheels (5 MB) stay under the 64 MiB of one run.
set -euo pipefail
cd "$(dirname "$0")/.."
DALI_DIR=${DALI_DIR:-.dali}
WHL_DIR=${WHL_DIR:-.whl}
PACKAGES=(nvidia-dali-cuda130 nvidia-libnvcomp-cu13 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
          nvidia-nvtiff-cu13 nvtx optree libcst astunparse gast makefun six)

fail() { echo "dali_parts: $*" >&2; exit 2; }
manifest() { [ -f "$DALI_DIR/p0/MANIFEST" ] || fail "$DALI_DIR/p0/MANIFEST missing: part 0 never arrived, resend run 0"
             cat "$DALI_DIR/p0/MANIFEST"; }
parts() { manifest | awk '$1 == "parts" { print $2 }'; }
check_part() {  # k: part k is there and whole
    local k=$1 expected
    expected=$(manifest | awk -v k="$k" '$1 == "part" && $2 == k { print $3 }')
    [ -n "$expected" ] || fail "part $k is not in the manifest ($(parts) parts)"
    [ -f "$DALI_DIR/p$k/part" ] || fail "part $k missing ($DALI_DIR/p$k/part): resend run $k"
    [ "$(sha256sum < "$DALI_DIR/p$k/part" | cut -d' ' -f1)" = "$expected" ] \
        || fail "part $k damaged ($DALI_DIR/p$k/part, sha256 differs): resend run $k"
}

pack() {
    local tar count
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT  # global: the trap runs after pack returns
    if [ -n "${DALI_WHEELS_FROM:-}" ]; then
        cp "$DALI_WHEELS_FROM"/*.whl "$wheels"/
    else
        local pinned=()
        for package in "${PACKAGES[@]}"; do
            pinned+=("$package==$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" \
                     "$package")")
        done
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$wheels" "${pinned[@]}"
    fi
    rm -rf "$DALI_DIR"
    mkdir -p "$DALI_DIR"
    tar=$DALI_DIR/wheels.tar
    tar -cf "$tar" -C "$wheels" .
    split -b "${PART_SIZE:-56M}" -d -a 3 "$tar" "$DALI_DIR/part."
    count=$(ls "$DALI_DIR"/part.* | wc -l)
    {
        echo "parts $count"
        echo "tar $(sha256sum < "$tar" | cut -d' ' -f1)"
        for k in $(seq 0 $((count - 1))); do
            echo "part $k $(sha256sum < "$DALI_DIR/part.$(printf %03d "$k")" | cut -d' ' -f1)"
        done
    } > "$DALI_DIR/MANIFEST"
    for k in $(seq 0 $((count - 1))); do
        mkdir -p "$DALI_DIR/p$k"
        mv "$DALI_DIR/part.$(printf %03d "$k")" "$DALI_DIR/p$k/part"
    done
    mv "$DALI_DIR/MANIFEST" "$DALI_DIR/p0/MANIFEST"
    rm "$tar"
    echo "$count parts of at most ${PART_SIZE:-56M} in $DALI_DIR/ ($(du -sh "$DALI_DIR" | cut -f1)); wheels:"
    ls "$wheels"
    echo "the runs, back to back on one warm machine (each within the ~30 s it stays warm):"
    for k in $(seq 0 $((count - 2))); do
        echo "  run $k: carry [\"$DALI_DIR/p$k\"], command: bash bench/dali_parts.sh check $k"
    done
    echo "  run $((count - 1)): carry [\"$DALI_DIR/p$((count - 1))\", \"$WHL_DIR\"], command:" \
         "bash bench/dali_parts.sh join && WHEELS_S=150 bash bench/device_check.sh"
}

join() {
    local count
    count=$(parts)
    for k in $(seq 0 $((count - 1))); do check_part "$k"; done
    local tar
    tar=$(mktemp)
    for k in $(seq 0 $((count - 1))); do cat "$DALI_DIR/p$k/part"; done > "$tar"
    [ "$(sha256sum < "$tar" | cut -d' ' -f1)" = "$(manifest | awk '$1 == "tar" { print $2 }')" ] \
        || { rm -f "$tar"; fail "the joined parts differ from the packed tar"; }
    mkdir -p "$WHL_DIR"
    tar -xf "$tar" -C "$WHL_DIR"
    rm -f "$tar"
    echo "DALI wheels joined from $count parts into $WHL_DIR/: $(cd "$WHL_DIR" && ls -- *.whl | tr '\n' ' ')"
}

case "${1:-}" in
    pack) pack ;;
    check) [ -n "${2:-}" ] || fail "usage: check K"; check_part "$2"; echo "part $2 of $(parts): ok" ;;
    join) join ;;
    *) fail "usage: bench/dali_parts.sh pack | check K | join" ;;
esac

# Sourced by bench/device_check.sh from the repository root.
# The lent GPU machine has torch and triton but not this project, and cannot download: the package is
# assembled in a scratch folder (setup.py's layout: kernels/ is moca_fast.kernels; pip install would try to
# resolve torch), and the wheels carried in .whl/ (bench/device_wheels.sh: deepspeed and what it needs
# there; DALI's, joined by bench/dali_parts.sh, with WHEELS_S=150) are unpacked beside it. Exports PYTHONPATH and DEVICE_SITE (the scratch folder).
# Python run from the repository root must not see the root first on sys.path (`python3 -`, `python3 -c`
# put the working directory there), or the repository's moca_fast, without its kernels, shadows the
# assembled copy: run scripts by path, with `python3 -P` where that matters.
DEVICE_SITE=$(mktemp -d)
cp -r moca_fast "$DEVICE_SITE/moca_fast"
rm -rf "$DEVICE_SITE/moca_fast/kernels"
cp -r kernels "$DEVICE_SITE/moca_fast/kernels"
if compgen -G ".whl/*.whl" > /dev/null; then
    timeout "${WHEELS_S:-30}" python3 -P -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DEVICE_SITE" \
        .whl/*.whl \
        && echo "carried wheels: installed $(ls .whl | tr '\n' ' ')" \
        || echo "carried wheels: install failed (the trainer variants will report deepspeed missing)"
else
    echo "carried wheels: none (.whl/ absent: the trainer variants will report deepspeed missing)"
fi
export PYTHONPATH="$DEVICE_SITE${PYTHONPATH:+:$PYTHONPATH}"
export DEVICE_SITE

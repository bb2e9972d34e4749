#!/usr/bin/env bash
# GPU figures at real model sizes in one command that fits 8 minutes of an H100 (benchmarks/gpu_check.py says
# what it measures). Usage, from the repository root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]     # on a CUDA machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run                   # anywhere: the CPU at tiny widths
#
# The device machine's image has PyTorch but not diffusers, cache-dit or importlib_metadata (its transformers,
# huggingface_hub, safetensors, tokenizers, numpy, tqdm, Pillow, regex and requests meet diffusers' and
# invardiff's requirements: KINDS.md's package list), and it reaches no package index. Prepare those three as
# wheels here, once, in the repository root (6.7 MB; .whl/ is git-ignored and must not be committed):
#
#   rm -rf .whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata==10.2.0
#
# The project itself runs from the checkout's src/, which travels with the working tree (31 MiB). A project wheel
# (`python3 -m pip wheel --no-deps --no-build-isolation . -w .whl`) would carry the bundled models' weights a second
# time: 28.6 MB more, 68 MB in all, over the device tool's 64 MiB; if one is in .whl/ anyway, it is used.
# Then call the device tool with carry [".whl"], command `bash benchmarks/gpu_check.sh $OUT` and timeout_s 480; the
# results come back as $OUT/gpu-check.{json,md} and gpu-check.log, to be copied to benchmarks/results/.
# Where diffusers is missing, the wheels in .whl/ are installed into /tmp/site, first on PYTHONPATH.
set -o pipefail
start=$SECONDS
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]}
shift
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2

export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import diffusers" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: diffusers is not installed and .whl/ holds no wheels; prepare them as this script's" \
            "header says and carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -c "import invardiff, diffusers; print('invardiff from', invardiff.__file__, 'diffusers', diffusers.__version__)" \
    || exit 2

# The sections' budget: 450 s of the 480 s call, less what setting up took; ~20 s remain for the exit.
budget=$(( ${GPU_CHECK_SECONDS:-450} - (SECONDS - start) ))
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$out" --budget-s "$budget" "$@" 2>&1 | tee "$out/gpu-check.log"

#!/usr/bin/env bash
# Fetch, here (where the package index is reachable), the wheels benchmarks/gpu_check.sh needs
# on a lent GPU machine that has no network: the packages this project uses that its image
# lacks (docs: /work/.library/device/KINDS.md lists what it has: torch 2.11, transformers,
# peft, pytest, scikit-image, pillow, ...; Python 3.12). gpu_check.sh installs ./.whl/*.whl
# with --no-index --no-deps into /tmp/site; the device tool carries `.whl` when asked to:
#
#   bash benchmarks/prepare_gpu_wheels.sh          # -> ./.whl (ignored by git; ~6 MB)
#   device run: carry [".whl"], command "bash benchmarks/gpu_check.sh"
#
# For stage zero_cpu (issue 5's CPU time goal, DeepSpeed ZeRO-3 under torchrun on the host's CPU
# cores): deepspeed (an sdist on the index: built here into a pure-Python wheel with DS_BUILD_OPS=0,
# no ops compiled), megatron-core, and what the image lacks of their needs (pydantic and its
# parts, hjson, a typing_extensions new enough for that pydantic).
# Not carried: flash-attn (built against the machine's torch and CUDA; the stages use it when it
# is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=.whl
mkdir -p "$OUT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# pure-Python: any platform
$PY -m pip download -q --no-deps --only-binary=:all: -d "$OUT" \
  "diffusers==0.42.1" "webdataset==1.0.2" "braceexpand==0.1.7"
# compiled: CPython 3.12 on x86_64 Linux (the image's python3)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "simplejpeg==1.9.0"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux_2_24_x86_64 -d "$OUT" "megatron-core==0.16.1" "pydantic==2.14.4" \
  "pydantic_core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing_extensions==4.16.0" \
  "hjson==3.1.0"
[[ -f "$OUT/deepspeed-0.19.8-py3-none-any.whl" ]] || \
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==0.19.8"  # needs torch here
ls -l "$OUT"
du -sh "$OUT"

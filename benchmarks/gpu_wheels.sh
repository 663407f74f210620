#!/usr/bin/env bash
# Run where PyPI is reachable: the wheels (Python 3.12, x86-64 Linux) of what hiresctl needs and
# a GPU machine's PyTorch image lacks, into .whl/ (ignored by git). A GPU machine with no
# package index then installs them with benchmarks/gpu_check.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# versions pinned to what this checkout's environment resolved, so both machines run the same
pinned() { python3 -m pip list --format=freeze 2>/dev/null | grep -i -E "^${1//-/[-_]}==" | head -1; }
for name in zarr numcodecs donfig google-crc32c imagecodecs "dask" partd locket albumentations \
    albucore simsimd stringzilla pydantic pydantic-core annotated-types typing-inspection \
    pycocotools openslide-python openslide-bin; do
  spec="$(pinned "$name" || true)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${spec:-$name}" \
    || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$name"
done
du -sh .whl

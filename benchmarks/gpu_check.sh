#!/usr/bin/env bash
# On a machine with a CUDA GPU, in under 8 minutes: the CUDA tests (pytest -m gpu), then the GPU
# rows G1 and G2 (benchmarks/gpu.py) and the machine limits C1 on the GPU (benchmarks/limits.py
# --device cuda), each written into BENCHMARKS.md with the GPU's name. Logs and the updated
# BENCHMARKS.md go to $OUT (or ./gpu-check/).
#
# Python: this checkout's environment (scripts/env.sh) where a package index is reachable; on a
# machine that has PyTorch but no index, its python3 with the wheels benchmarks/gpu_wheels.sh
# put in .whl/ (installed into /tmp/site, nothing else touched).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  # shellcheck source=scripts/env.sh
  source scripts/env.sh
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
status=0
echo "== CUDA tests"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log" || status=1
echo "== G1, G2"
timeout 240 python3 benchmarks/gpu.py --device cuda 2>&1 | tee "$out/gpu-rows.log" || status=1
echo "== C1 on the GPU"
timeout 120 python3 benchmarks/limits.py --device cuda --repeats 5 --skip-methods 2>&1 \
  | tee "$out/limits-gpu.log" || status=1
cp BENCHMARKS.md "$out/BENCHMARKS.md"
exit $status

#!/usr/bin/env bash
# The GPU tests (mamba-ssm kernels vs the PyTorch twin, the graphed loop, the full model) on this tree.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }; fi
echo "kernels ready at $(( $(date +%s) - T0 )) s"
timeout $(( ${LIMIT:-400} - ($(date +%s) - T0) )) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py \
  -k "not compiled" 2>&1 | tee $OUT/gpu_tests.log | tail -25
echo "total $(( $(date +%s) - T0 )) s"

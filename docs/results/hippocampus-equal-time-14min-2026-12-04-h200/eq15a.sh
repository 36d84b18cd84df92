#!/usr/bin/env bash
# Issue 18: Mamba-HoME small vs DynUNet (recipe fast), 15 minutes each, two seeds, four runs sharing one H200
# under MPS, started with setsid so they outlive this call (the next call waits for them: eq15b.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
if ! PYTHONPATH=/tmp/site python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }; fi
echo "kernels ready at $(el) s"
rm -rf /tmp/repo && mkdir -p /tmp/repo && cp -r engine experiments pyproject.toml .data /tmp/repo/
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog
nvidia-cuda-mps-control -d && echo "MPS on" || echo "MPS not started"
cd /tmp/repo && PYTHONPATH=/tmp/site:/tmp/repo setsid nohup python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus \
  --work /tmp/hw --out /tmp/r/out --minutes 15 --bf16 --skip-phase2 --recipe fast --seeds 0 1 --num-workers 3 --eval-tta \
  --train-option=--no-compile --configs mambahome-small dynunet-adamw > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-580} ]; do sleep 20; done
tail -3 /tmp/driver.log; for f in /tmp/r/out/logs/*.log; do echo "== $f"; tail -c 400 $f; echo; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# Issue 18's 15-minute equal-time pair: Mamba-HoME small and DynUNet (recipe fast), seeds 0 and 1, the four
# runs sharing one H200 under MPS for 15 minutes each. Call 1: kernels, then the runs started in their own
# process session (they outlive this call on a warm lease); call 2 (eq2.sh) waits and collects.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }; fi
echo "kernels ready at $(( $(date +%s) - T0 )) s"
mkdir -p /tmp/mps /tmp/mpslog /tmp/eq
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
nvidia-cuda-mps-control -d && echo "MPS on"
cp -r $R /tmp/eq/repo   # the runs outlive this call's tree
cd /tmp/eq/repo
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
setsid nohup python3 experiments/hippocampus.py --data /tmp/eq/repo/.data/hippocampus --work /tmp/eq/work \
  --out /tmp/eq/out --minutes 15 --bf16 --skip-phase2 --recipe fast --seeds 0 1 --num-workers 3 --eval-tta \
  --configs mambahome-small dynunet-adamw > /tmp/eq/driver.log 2>&1 < /dev/null &
echo "started at $(( $(date +%s) - T0 )) s"
while [ $(( $(date +%s) - T0 )) -lt 575 ]; do sleep 20; done
tail -3 /tmp/eq/out/logs/*.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
echo "call 1 ends at $(( $(date +%s) - T0 )) s"

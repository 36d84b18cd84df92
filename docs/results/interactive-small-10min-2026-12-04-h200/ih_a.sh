#!/usr/bin/env bash
# Issue 15: an automatic `small` parent alone (5.2 min), then the promptable `small` warm-started from it for
# 10 minutes alone, the robot on all 40 held-out cases, latency, and learning from corrections (2 min).
# Started with setsid so the chain outlives this call; ih_b.sh waits and packs on the same warm machine.
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
if ! PYTHONPATH=/tmp/site python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }; fi
echo "kernels ready at $(el) s"
rm -rf /tmp/repo /tmp/r /tmp/hippo /tmp/ih && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hippo --out /tmp/r/parent \
  --minutes 5.2 --bf16 --skip-phase2 --recipe fast --seeds 0 --num-workers 8 --eval-tta --configs mambahome-small
python3 experiments/interactive_hippocampus.py --shared /tmp/repo/.data --work /tmp/ih --out /tmp/r/ih \
  --init-checkpoint /tmp/hippo/runs/mambahome-small-s0/best.safetensors --minutes 10 --ft-minutes 2 \
  --patch 48 64 48 --batch-size 8 --device cuda --bf16 --num-workers 8 \
  --auto-checkpoint /tmp/hippo/runs/mambahome-small-s0/best.safetensors \
  --task-option simulation.p_near_prior=0.4 --task-option encoding.point_radius=2 --task-option simulation.max_rounds=5
echo CHAIN-DONE
EOC
cd /tmp/repo && PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; ls /tmp/r/parent/logs 2>/dev/null && tail -c 600 /tmp/r/parent/logs/*.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

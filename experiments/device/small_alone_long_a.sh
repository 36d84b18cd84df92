#!/usr/bin/env bash
# Issue 18: Mamba-HoME `small` alone on the H200 for 20 minutes (default recipe fast, compiled where it pays; EXTRA adds
# training options, e.g. EXTRA=--train-option=--augmentation=nnunet), seed 0, the same split as every earlier run; TTA evaluation. setsid: the run outlives this call; small_alone_long_b.sh waits
# and packs on the same warm machine.
# Needs, carried in the repository root: what prepare.sh needs (.whl/, .gpu/) and
# .data/hippocampus (the shared hippocampus set).
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hippo && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hippo --out /tmp/r/long \
  --minutes ${MINUTES:-20} --bf16 --skip-phase2 --recipe fast --seeds 0 --num-workers 8 --eval-tta --configs mambahome-small $EXTRA
echo CHAIN-DONE
EOC
cd /tmp/repo && EXTRA=${EXTRA:-} MINUTES=${MINUTES:-20} PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; ls /tmp/hippo/runs/*/ 2>/dev/null; tail -3 /tmp/hippo/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

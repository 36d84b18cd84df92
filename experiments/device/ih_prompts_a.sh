#!/usr/bin/env bash
# Issue 15: the promptable `small` model warm-started from an automatic parent trained on all 160 training cases
# (the better parent of 2026-12-06: --val-fraction 0, last checkpoint), then the robot on all 40 held-out cases with
# each first prompt (point, box, scribble; corrective clicks after it), latency, and learning from corrections.
# Each stage has the GPU to itself. setsid: the chain outlives this call; ih_prompts_b.sh (issued at once, same warm
# machine) waits and packs. Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus.
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hippo /tmp/ih && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hippo --out /tmp/r/parent \
  --minutes ${PARENT_MINUTES:-5.2} --bf16 --skip-phase2 --recipe fast --seeds 0 --num-workers 8 --configs mambahome-small-allcases
P=/tmp/hippo/runs/mambahome-small-allcases-s0/last.safetensors
python3 experiments/interactive_hippocampus.py --shared /tmp/repo/.data --work /tmp/ih --out /tmp/r/ih \
  --init-checkpoint $P --minutes ${IH_MINUTES:-8} --ft-minutes ${FT_MINUTES:-1} \
  --patch 48 64 48 --batch-size 8 --device cuda --bf16 --num-workers 8 --auto-checkpoint $P \
  --prompts point box scribble \
  --task-option simulation.p_near_prior=0.4 --task-option encoding.point_radius=2 --task-option simulation.max_rounds=5
echo CHAIN-DONE
EOC
cd /tmp/repo && PARENT_MINUTES=${PARENT_MINUTES:-5.2} IH_MINUTES=${IH_MINUTES:-8} FT_MINUTES=${FT_MINUTES:-1} \
  PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# Issue 18 lever: `small` alone for 5.2 minutes with --shift 0.125 (seed 0, the fixed split), to set beside the
# 2026-12-02 run of the same settings without it (0.8676).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R
mkdir -p $OUT /tmp/r
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > /tmp/r/build.log 2>&1 || { tail -30 /tmp/r/build.log; exit 1; }; fi
echo "kernels ready at $(el) s"
CFG=${CFG:-mambahome-small-shift}
timeout $(( 590 - $(el) )) python3 experiments/hippocampus.py --data $R/.data/hippocampus --work /tmp/hw --out /tmp/r/out \
  --minutes ${MIN:-5.2} --bf16 --skip-phase2 --recipe fast --seeds ${SEED:-0} --num-workers 8 --eval-tta --configs $CFG \
  > /tmp/r/driver.log 2>&1
echo "run rc $? at $(el) s"; tail -4 /tmp/r/driver.log; cat /tmp/r/out/tables.md 2>/dev/null | tail -8
for d in /tmp/hw/runs/*; do mkdir -p /tmp/r/$(basename $d); cp $d/train_eval.json $d/train_config.json $d/test_evaluation.csv $d/log.csv* $d/curves.png /tmp/r/$(basename $d)/ 2>/dev/null; done
cp /tmp/hw/split.json /tmp/r/ 2>/dev/null
(cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT; echo "total $(el) s"

#!/usr/bin/env bash
# Issue 18, same lease: does AdamW weight decay 0.05 (the recipes' 1e-5 barely acts) help `small`, which over-fits
# early? Four runs share one GPU at once for MINUTES (default 14, a quarter each): `small`, recipe `fast`, all 160
# training cases, last checkpoint, seeds 0 and 1, with weight decay 1e-5 and 0.05; each scored on the 40 held-out
# cases plain and with TTA + largest component. While they train, tests/test_gpu.py (not the compiled cases) runs
# on this tree in the foreground: it slows the four arms alike. ensemble_b.sh waits and packs (issue it at once,
# same warm machine). Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus. CONFIGS names the two arms
# (experiments/hippocampus.py configurations; ema_pair_a.sh runs it with others).
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hs && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hs --out /tmp/r/seeds \
  --minutes ${MINUTES} --bf16 --skip-phase2 --recipe fast --seeds 0 1 --num-workers 2 --eval-tta \
  --configs ${CONFIGS}
echo CHAIN-DONE
EOC
cd /tmp/repo && MINUTES=${MINUTES:-14} CONFIGS="${CONFIGS:-mambahome-small-allcases mambahome-small-allcases-wd}" PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
cd /tmp/repo && PYTHONPATH=/tmp/site:/tmp/repo timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not compiled" 2>&1 | tail -15
echo "tests done at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -2 /tmp/hs/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

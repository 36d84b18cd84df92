#!/usr/bin/env bash
# Issue 18: three Mamba-HoME `small` runs one after the other, each with the GPU to itself for MINUTES (default 5;
# with CONCURRENT=1 the three share the GPU at once for MINUTES),
# trained on all 160 training cases of the fixed split with seeds 0, 1, 2 (recipe `fast`, last checkpoint), then
# their ensemble (predict --checkpoint A B C: the mean of the probabilities) scored on the 40 held-out cases,
# plain and with TTA + largest component, beside each member (experiments/ensemble_eval.py). Three 5-minute
# members are 15 minutes of GPU time: the budget of the DynUNet 15-minute run. setsid: the chain outlives this
# call; alone_chain_b.sh-like waiting and packing is ensemble_b.sh (issued at once, same warm machine).
# Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus.
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hs && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
if [ -n "${CONCURRENT:-}" ]; then
  # the three share the GPU at once for MINUTES (a third each): one start-up and evaluation period, not three
  python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hs --out /tmp/r/seeds \
    --minutes ${MINUTES} --bf16 --skip-phase2 --recipe fast --seeds 0 1 2 --num-workers 4 --eval-tta \
    --configs mambahome-small-allcases
else
  for s in 0 1 2; do
    python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hs --out /tmp/r/seed$s \
      --minutes ${MINUTES} --bf16 --skip-phase2 --recipe fast --seeds $s --num-workers 8 --eval-tta \
      --configs mambahome-small-allcases
    echo RUN$s-DONE
  done
fi
python3 experiments/ensemble_eval.py --runs /tmp/hs/runs/mambahome-small-allcases-s0 \
  /tmp/hs/runs/mambahome-small-allcases-s1 /tmp/hs/runs/mambahome-small-allcases-s2 --test /tmp/hs/test \
  --out /tmp/r/ensemble --tta
echo CHAIN-DONE
EOC
cd /tmp/repo && CONCURRENT=${CONCURRENT:-} MINUTES=${MINUTES:-5} PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -2 /tmp/hs/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

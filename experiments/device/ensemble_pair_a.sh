#!/usr/bin/env bash
# Issue 18, same lease: three Mamba-HoME `small` and three MONAI DynUNet runs (seeds 0, 1, 2, recipe `fast`, all 160
# training cases of the fixed split, last checkpoint) share one GPU at once for MINUTES (default 16: a sixth each),
# then each family's ensemble (the mean of its three members' probabilities) is scored on the 40 held-out cases,
# plain and with TTA + largest component (experiments/ensemble_eval.py). Both families get the same share of the
# same GPU in the same run. setsid: the chain outlives this call; ensemble_b.sh waits and packs (issue it at
# once, same warm machine). Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus.
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hs && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hs --out /tmp/r/seeds \
  --minutes ${MINUTES} --bf16 --skip-phase2 --recipe fast --seeds 0 1 2 --num-workers 2 --eval-tta \
  --configs mambahome-small-allcases dynunet-allcases
for family in mambahome-small-allcases dynunet-allcases; do
  python3 experiments/ensemble_eval.py --runs /tmp/hs/runs/$family-s0 /tmp/hs/runs/$family-s1 \
    /tmp/hs/runs/$family-s2 --test /tmp/hs/test --out /tmp/r/ensemble-$family --tta
done
echo CHAIN-DONE
EOC
cd /tmp/repo && MINUTES=${MINUTES:-16} PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -2 /tmp/hs/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

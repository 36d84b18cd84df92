#!/usr/bin/env bash
# Issue 18: runs one after the other, each with the GPU to itself, 5.2 minutes each, seed 0, the same split as every
# earlier run, TTA evaluation: DynUNet with recipe `fast` (its better recipe in the shared runs; its alone run so far
# used nnU-Net's), then Mamba-HoME `small` trained on all 160 cases keeping the last checkpoint; then
# tests/test_gpu.py on this tree. setsid: the chain outlives this call; alone_chain_b.sh (issued at once, same warm
# machine) waits and packs. Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus.
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/hd /tmp/hs && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
H="python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --minutes ${MINUTES:-5.2} --bf16 --skip-phase2 --recipe fast --seeds 0 --num-workers 8 --eval-tta"
$H --work /tmp/hd --out /tmp/r/dynunet-fast --configs dynunet --recipe-for dynunet=fast
echo RUN1-DONE
$H --work /tmp/hs --out /tmp/r/small-allcases --configs mambahome-small-allcases
echo RUN2-DONE
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not compiled" 2>&1 | tail -15
echo CHAIN-DONE
EOC
cd /tmp/repo && MINUTES=${MINUTES:-5.2} PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -2 /tmp/h?/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# Issue 18: one configuration alone on the GPU for MINUTES (default 15), recipe `fast`, seed 0, the same split as
# every earlier run, TTA evaluation; then the mamba-ssm kernels are built and tests/test_gpu.py runs on this tree.
# CONFIG names an experiments/hippocampus.py configuration (default dynunet, with recipe `fast`: its better one);
# EXTRA adds options (default `--recipe-for dynunet=fast`; harmless for other networks). DynUNet needs no kernels, so they are built after the run, not during it (the build would take
# the loader's CPU cores). setsid: the chain outlives this call; alone_long_b.sh (issued at once, same warm machine)
# waits and packs. Needs, carried: .whl/, .gpu/ (prepare.sh) and .data/hippocampus.
# Mamba-HoME trains on the kernels: built first for it (prepare.sh), after the run for the CNNs
case "${CONFIG:-dynunet}" in mambahome*) KERNELS_FIRST=1 ;; *) KERNELS_FIRST= ;; esac
if [ -n "$KERNELS_FIRST" ]; then source experiments/device/prepare.sh; else NO_KERNELS=1 source experiments/device/prepare.sh; fi
rm -rf /tmp/repo /tmp/r /tmp/hl && mkdir -p /tmp/repo /tmp/r && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
python3 experiments/hippocampus.py --data /tmp/repo/.data/hippocampus --work /tmp/hl --out /tmp/r/long \
  --minutes ${MINUTES} --bf16 --skip-phase2 --recipe fast --seeds 0 --num-workers 8 --eval-tta --configs ${CONFIG} $EXTRA
echo RUN-DONE
python3 -c "import mamba_ssm" 2>/dev/null || bash .gpu/build-kernels.sh > /tmp/build.log 2>&1 || tail -30 /tmp/build.log
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
echo CHAIN-DONE
EOC
cd /tmp/repo && CONFIG=${CONFIG:-dynunet} EXTRA=${EXTRA:---recipe-for dynunet=fast} MINUTES=${MINUTES:-15} \
  PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:\|CHAIN-DONE" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -3 /tmp/hl/runs/*/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

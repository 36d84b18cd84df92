#!/usr/bin/env bash
# Issue 15: rebuild the bundled interactive model alone on the H200 (make_interactive_model.sh; the earlier
# build shared the GPU eight to nine ways and got 945 steps in 11 minutes), with larger phantoms so that some
# training objects exceed the 64 mm window. setsid: the build outlives this call; bundled_interactive_b.sh
# waits and packs on the same warm machine.
# Needs, carried in the repository root: what prepare.sh needs (.whl/, .gpu/) and
# .data/ (copies of the shared hippocampus, abdomen_ct_mr and spinal_cord_mri folders).
source experiments/device/prepare.sh
rm -rf /tmp/repo /tmp/r /tmp/biw && mkdir -p /tmp/repo /tmp/r/model && cp -r . /tmp/repo/
cat > /tmp/chain.sh <<'EOC'
set -x
cd /tmp/repo
DEVICE=cuda BF16=1 WORKERS=8 PYTHON=python3 SHARED=/tmp/repo/.data DEST=/tmp/r/model MINUTES=${MINUTES:-14} \
  PHANTOMS=${PHANTOMS:-24} PHANTOM_SHAPE="${PHANTOM_SHAPE:-144 144 112}" \
  bash napari_mambahome/models/make_interactive_model.sh /tmp/biw
echo CHAIN-DONE
EOC
cd /tmp/repo && PYTHONPATH=/tmp/site:/tmp/repo setsid nohup bash /tmp/chain.sh > /tmp/driver.log 2>&1 < /dev/null &
echo "launched at $(el) s"
while [ $(el) -lt ${STOP:-585} ]; do sleep 15; if grep -q "Traceback\|error:" /tmp/driver.log; then break; fi; done
tail -25 /tmp/driver.log; tail -3 /tmp/biw/run/log.csv 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# Waits for ih_prompts_a.sh's chain (same warm machine); packs what exists into $OUT when it ends or time runs out
# (call it again while the chain runs).
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while ! grep -q CHAIN-DONE /tmp/driver.log && [ $(el) -lt ${STOP:-560} ] && pgrep -f chain.sh >/dev/null; do sleep 10; done
tail -40 /tmp/driver.log
mkdir -p /tmp/r/parent-run && d=/tmp/hippo/runs/mambahome-small-allcases-s0 && cp $d/train_eval.json $d/train_config.json $d/test_evaluation*.csv $d/log.csv* $d/curves.png /tmp/r/parent-run/ 2>/dev/null
(cd /tmp/ih && tar cf - --exclude='*.safetensors' --exclude='./train' --exclude='./heldout' --exclude='./shift_test' --exclude='./shift_finetune*' .) | (mkdir -p /tmp/r/ih-work && cd /tmp/r/ih-work && tar xf -)
mkdir -p /tmp/r/ih-run && cp /tmp/ih/run_small/*.json /tmp/ih/run_small/log.csv* /tmp/ih/run_small/curves.png /tmp/r/ih-run/ 2>/dev/null
cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

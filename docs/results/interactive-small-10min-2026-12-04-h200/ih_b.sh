#!/usr/bin/env bash
# Waits for ih_a.sh's chain (same warm machine); packs what exists into $OUT when it ends or time runs out.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while ! grep -q CHAIN-DONE /tmp/driver.log && [ $(el) -lt ${STOP:-560} ] && pgrep -f chain.sh >/dev/null; do sleep 10; done
tail -40 /tmp/driver.log
mkdir -p /tmp/r/parent-run && d=/tmp/hippo/runs/mambahome-small-s0 && cp $d/train_eval.json $d/train_config.json $d/test_evaluation*.csv $d/log.csv* $d/curves.png /tmp/r/parent-run/ 2>/dev/null
for f in auto.json finetune.json finetune_config.json robot_small robot_small.json robot_bundled.json shift_after shift_after.json shift_before shift_before.json; do [ -e /tmp/ih/$f ] && cp -r /tmp/ih/$f /tmp/r/ih-work-$f; done
mkdir -p /tmp/r/ih-run && cp /tmp/ih/run_small/*.json /tmp/ih/run_small/log.csv* /tmp/ih/run_small/curves.png /tmp/r/ih-run/ 2>/dev/null
cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

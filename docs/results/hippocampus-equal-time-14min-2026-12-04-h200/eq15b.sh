#!/usr/bin/env bash
# Waits for eq15a.sh's runs (same warm machine), then packs the results into $OUT.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while [ ! -s /tmp/r/out/tables.md ] && [ $(el) -lt ${STOP:-570} ] && pgrep -f hippocampus.py >/dev/null; do sleep 10; done
tail -5 /tmp/driver.log; for f in /tmp/r/out/logs/*.log; do echo "== $f"; tail -c 300 $f; echo; done
if [ -s /tmp/r/out/tables.md ]; then
  cat /tmp/r/out/tables.md | head -12
  for d in /tmp/hw/runs/*; do mkdir -p /tmp/r/$(basename $d); cp $d/train_eval.json $d/train_config.json $d/test_evaluation*.csv $d/log.csv* $d/curves.png /tmp/r/$(basename $d)/ 2>/dev/null; done
  cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT
else echo "not finished at $(el) s"; fi

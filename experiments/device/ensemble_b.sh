#!/usr/bin/env bash
# Waits for the chain of ensemble_a.sh or ensemble_pair_a.sh (same warm machine); packs what exists into $OUT when it
# ends or time runs out
# (call it again while the chain runs).
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while ! grep -q "CHAIN-DONE\|Traceback" /tmp/driver.log && [ $(el) -lt ${STOP:-560} ] && pgrep -f chain.sh >/dev/null; do sleep 10; done
tail -40 /tmp/driver.log; tail -2 /tmp/hs/runs/*/log.csv 2>/dev/null
# the run folders but their weights: the per-case evaluation CSVs lie in subfolders
[ -d /tmp/hs/runs ] && mkdir -p /tmp/r/hs && (cd /tmp/hs/runs && tar cf - --exclude='*.safetensors' .) | (cd /tmp/r/hs && tar xf -)
cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

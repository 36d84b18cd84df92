#!/usr/bin/env bash
# Waits for small_alone_long_a.sh's run (same warm machine); packs what exists into $OUT when it ends or time runs out.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while ! grep -q CHAIN-DONE /tmp/driver.log && [ $(el) -lt ${STOP:-560} ] && pgrep -f chain.sh >/dev/null; do sleep 10; done
tail -30 /tmp/driver.log; tail -3 /tmp/hippo/runs/*/log.csv 2>/dev/null
# the whole run folder but its weights: the per-case evaluation CSVs lie in subfolders
mkdir -p /tmp/r && (cd /tmp/hippo/runs && tar cf - --exclude='*.safetensors' mambahome-small-s0) | (cd /tmp/r && tar xf -)
cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

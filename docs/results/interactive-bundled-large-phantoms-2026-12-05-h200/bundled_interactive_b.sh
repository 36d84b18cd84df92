#!/usr/bin/env bash
# Waits for bundled_interactive_a.sh's build (same warm machine); packs what exists into $OUT when it ends or
# time runs out.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while ! grep -q CHAIN-DONE /tmp/driver.log && [ $(el) -lt ${STOP:-560} ] && pgrep -f chain.sh >/dev/null; do sleep 10; done
tail -40 /tmp/driver.log; tail -3 /tmp/biw/run/log.csv 2>/dev/null
mkdir -p /tmp/r/run && cp /tmp/biw/run/*.json /tmp/biw/run/log.csv* /tmp/biw/run/curves.png /tmp/r/run/ 2>/dev/null
cp /tmp/biw/data/manifest.json /tmp/r/ 2>/dev/null; for e in /tmp/biw/eval_*; do [ -d "$e" ] && cp -r "$e" /tmp/r/; done
[ -f /tmp/r/model/interactive.safetensors ] || cp /tmp/biw/run/best.safetensors /tmp/r/model/ 2>/dev/null
cp /tmp/driver.log /tmp/r/; (cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

#!/usr/bin/env bash
# Waits for bundled_shares_a.sh's three builds (same warm machine); packs models, cards, evaluations and logs into
# $OUT when they end or time runs out.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
while [ $(grep -l CHAIN-DONE /tmp/bs/*.log 2>/dev/null | wc -l) -lt 3 ] && [ $(el) -lt ${STOP:-560} ] \
      && pgrep -f "/tmp/bs/" >/dev/null; do sleep 10; done
for name in uh wh wf; do
  echo "== $name"; tail -30 /tmp/bs/$name.log
  mkdir -p /tmp/r/$name/run && cp /tmp/bs/$name/run/*.json /tmp/bs/$name/run/log.csv* /tmp/r/$name/run/ 2>/dev/null
  cp /tmp/bs/$name/data/manifest.json /tmp/r/$name/ 2>/dev/null
  for e in /tmp/bs/$name/eval_*; do [ -d "$e" ] && cp -r "$e" /tmp/r/$name/; done
  [ -f /tmp/r/$name/interactive.safetensors ] || cp /tmp/bs/$name/run/best.safetensors /tmp/r/$name/ 2>/dev/null
  [ -d /tmp/bs/$name/data/abdomen_spleen_side ] && cp -rL /tmp/bs/$name/data/abdomen_spleen_side /tmp/r/$name/
  cp /tmp/bs/$name.log /tmp/r/
done
(cd /tmp && tar czf $OUT/r.tgz r); ls -la $OUT

#!/usr/bin/env bash
# Call 2 of the 15-minute pair: wait for the driver started by eq1.sh, then tar the results into $OUT.
T0=$(date +%s)
if [ ! -d /tmp/eq/out ]; then echo "FRESH MACHINE: the runs are gone"; exit 3; fi
while pgrep -f experiments/hippocampus.py > /dev/null && [ $(( $(date +%s) - T0 )) -lt 560 ]; do sleep 10; done
tail -5 /tmp/eq/out/logs/*.log; cat /tmp/eq/out/tables.md 2>/dev/null; tail -5 /tmp/eq/driver.log
pgrep -f experiments/hippocampus.py > /dev/null && echo "STILL RUNNING"
cd /tmp/eq && tar czf $OUT/r.tgz --exclude='*.safetensors' --exclude='*.nii.gz' --exclude='*.nii' out work/runs driver.log && ls -la $OUT
echo "call 2 ends at $(( $(date +%s) - T0 )) s"

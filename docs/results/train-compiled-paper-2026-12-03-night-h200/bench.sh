#!/usr/bin/env bash
# Issue 18's missing rows: compiled + graphed training step for `paper` (batch 2 and 8) and `small` batch 2, beside
# graphed, at the hippocampus patch. The three compilations warm Inductor's cache concurrently first (a few steps
# each), then each row is measured alone on the warm cache.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p $OUT/r
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > $OUT/r/build.log 2>&1 || { tail -30 $OUT/r/build.log; exit 1; }; fi
echo "kernels ready at $(el) s"
for nb in "mambahome:paper 8" "mambahome:paper 2" "mambahome:small 2"; do set -- $nb
  ( timeout 300 python3 benchmarks/bench_train_patch.py --networks $1 --batches $2 --modes compiled-graphed --repeats 3 \
      --out /tmp/warm-${1#*:}-$2.md > $OUT/r/warm-${1#*:}-$2.log 2>&1; echo "warm $1 b$2 rc $? at $(el) s" ) &
done
wait
grep -h "compiled" /tmp/warm-*.md | head
timeout $(( 560 - $(el) )) python3 benchmarks/bench_train_patch.py --networks mambahome:paper --batches 2 8 \
  --modes graphed compiled-graphed --repeats 40 --out $OUT/r/train-patch-compiled-paper.md > $OUT/r/bench_paper.log 2>&1
echo "paper rc $? at $(el) s"; tail -6 $OUT/r/train-patch-compiled-paper.md
if [ $(el) -lt 500 ]; then
timeout $(( 570 - $(el) )) python3 benchmarks/bench_train_patch.py --networks mambahome:small --batches 2 \
  --modes graphed compiled-graphed --repeats 40 --out $OUT/r/train-patch-compiled-small-b2.md > $OUT/r/bench_small.log 2>&1
echo "small rc $? at $(el) s"; tail -4 $OUT/r/train-patch-compiled-small-b2.md; fi
cd $OUT && tar czf r.tgz r && rm -rf r
echo "total $(el) s"

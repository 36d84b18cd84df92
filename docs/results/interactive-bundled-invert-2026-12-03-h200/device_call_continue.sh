#!/usr/bin/env bash
# Self-contained: kernels (if not cached), interactive data, then continue the bundled model from
# .devrun/cand/parent.safetensors alone on the GPU for $MIN minutes; best checkpoint + logs to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R
T0=$(date +%s)
W=/tmp/ia; mkdir -p $W
( [ -f $W/data/manifest.json ] || python3 experiments/interactive_data.py --shared $R/.data --out $W/data --phantoms 16 --val-fraction 0.1 > $OUT/data.log 2>&1 ) &
DP=$!
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }; fi
wait $DP || { tail -30 $OUT/data.log; exit 1; }
echo "setup $(( $(date +%s) - T0 )) s"
VAL_SEED=$(python3 -c "import json; print(json.load(open('$W/data/manifest.json'))['val_seed'])")
RUN=$W/cont_$(date +%s)
python3 -m engine.cli finetune --checkpoint .devrun/cand/parent.safetensors --dataset $W/data/train --out $RUN \
  --recipe paper --batch-size 8 --lr $LR --steps 100000 --max-minutes $MIN --val-fraction 0.1 --seed $VAL_SEED \
  --device cuda --num-workers 12 --zoom-out 4 --zoom-out-prob 0.4 --bf16 --invert-prob $INV > $OUT/train.log 2>&1
tail -5 $OUT/train.log
mkdir -p $OUT/res; cp $RUN/best.safetensors $OUT/res/; cp $RUN/log.csv $RUN/train_config.json $OUT/res/; cd $OUT && tar czf res.tgz res && rm -rf res
echo "total $(( $(date +%s) - T0 )) s"

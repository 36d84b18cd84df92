#!/usr/bin/env bash
# One self-contained device call: kernels (cached in /tmp/site while warm), interactive data, then
# the bundled tiny interactive model trained twice at once (INVERT_PROB 0 and $INV), checkpoints to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R
T0=$(date +%s)
W=/tmp/ia; mkdir -p $W
( python3 experiments/interactive_data.py --shared $R/.data --out $W/data --phantoms 16 --val-fraction 0.1 > $OUT/data.log 2>&1 ) &
DP=$!
if ! python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }; fi
wait $DP || { tail -30 $OUT/data.log; exit 1; }
python3 -c "from engine.model.scan import cuda_kernels_available as c; print('kernels', c())"
echo "setup $(( $(date +%s) - T0 )) s"
VAL_SEED=$(python3 -c "import json; print(json.load(open('$W/data/manifest.json'))['val_seed'])")
for inv in 0 $INV; do
  python3 -m engine.cli train --dataset $W/data/train --out $W/run_inv$inv --task interactive --preset tiny --recipe paper \
    --patch-size 64 64 64 --target-spacing 1 1 1 --batch-size 8 --lr 1e-3 --steps 100000 --max-minutes $MIN \
    --val-fraction 0.1 --seed $VAL_SEED --device cuda --num-workers 6 --zoom-out 4 --zoom-out-prob 0.4 --bf16 \
    --invert-prob $inv --task-option simulation.p_near_prior=0.4 --task-option encoding.point_radius=2 \
    --task-option simulation.max_rounds=5 > $OUT/train_inv$inv.log 2>&1 &
done
wait
for inv in 0 $INV; do
  mkdir -p $OUT/run_inv$inv; cp $W/run_inv$inv/best.safetensors $W/run_inv$inv/*.json $OUT/run_inv$inv/ 2>/dev/null
  ls $W/run_inv$inv; tail -4 $OUT/train_inv$inv.log
done
cp $W/data/manifest.json $OUT/
echo "total $(( $(date +%s) - T0 )) s"

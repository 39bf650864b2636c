#!/usr/bin/env bash
# ShapesBench evaluation of every model of the shapes recipe: 600 prompts over the four
# categories + 150 held-out compositions, fixed seeds (image i: noise seed i), 128 px.
#
#   bash training/recipes/shapes_eval.sh                  # all of them
#   MODELS="ladd4 ladd8" bash training/recipes/shapes_eval.sh
#
# Reports (JSON, one record per prompt) and sample grids go to runs/shapes/eval/; the table in
# docs/results.md comes from `python training/recipes/shapes_table.py runs/shapes/eval`.
# With PARALLEL=1 (default) two evaluations run at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPGEN="${SNAPGEN:-.venv/bin/snapgen}"
MODELS="${MODELS:-teacher pretrain-4k kd pretrain pretrain4 ladd4 ladd8}"
PARALLEL="${PARALLEL:-1}"
OUT=runs/shapes/eval
mkdir -p "$OUT"

P=runs/shapes/pretrain
declare -A MODEL=(
    [teacher]=runs/shapes/teacher/teacher [pretrain-4k]=$P/model-4000steps [kd]=runs/shapes/kd/model
    [pretrain]=$P/model [pretrain4]=$P/model [ladd4]=runs/shapes/ladd/model [ladd8]=runs/shapes/ladd/model
)
# The teacher and the 28-step students sample with guidance 3 (their exported default), pretrain4
# too (the parent at the default's step count, not step-distilled); the LADD students are
# step-distilled to sample without it. pretrain-4k and kd: the KD comparison at equal steps.
declare -A STEPS=([teacher]=28 [pretrain-4k]=28 [kd]=28 [pretrain]=28 [pretrain4]=4 [ladd4]=4 [ladd8]=8)

evaluate() {
    local name=$1
    echo "== eval ${name}: $(date -u +%FT%TZ)"
    OMP_NUM_THREADS=1 "$SNAPGEN" eval shapes --model "${MODEL[$name]}" --steps "${STEPS[$name]}" \
        --n 600 --seed 0 --batch-size 50 --grid 16 --out "${OUT}/${name}.json" > "${OUT}/${name}.log" 2>&1
    tail -n 2 "${OUT}/${name}.log"
}

pids=()
for name in $MODELS; do
    if [ "$PARALLEL" = 1 ]; then
        evaluate "$name" &
        pids+=($!)
        if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    else
        evaluate "$name"
    fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

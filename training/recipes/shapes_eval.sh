#!/usr/bin/env bash
# ShapesBench evaluation of every model of the shapes recipe: 600 prompts over the four
# categories + 150 held-out compositions, fixed seeds (image i: noise seed i), 128 px.
#
#   bash training/recipes/shapes_eval.sh                  # all of them
#   MODELS="ladd4 ladd8" bash training/recipes/shapes_eval.sh
#
# Reports (JSON, one record per prompt) and sample grids go to runs/shapes/eval/; the table in
# docs/results.md comes from `python training/recipes/shapes_table.py runs/shapes/eval`.
# With PARALLEL=1 (default) two evaluations run at a time, one thread each. PRODUCTS and EVAL_OUT
# name other products and reports (the GPU recipe's: runs/shapes-gpu/products, runs/shapes-gpu/eval).
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPGEN="${SNAPGEN:-.venv/bin/snapgen}"
MODELS="${MODELS:-teacher kd-baseline kd ladd4 ladd8 ladd-baseline4 ladd-noadv4 default4 default8}"
PARALLEL="${PARALLEL:-1}"
OUT="${EVAL_OUT:-runs/shapes/eval}"
mkdir -p "$OUT"

# Each stage's product as the recipe links it (runs/shapes/products/, see shapes.sh); default*: the
# shipped model.
P="${PRODUCTS:-runs/shapes/products}" D=snapgen/assets/snapgen-shapes
declare -A MODEL=(
    [teacher]=$P/teacher [kd-baseline]=$P/kd-baseline [kd]=$P/kd [ladd4]=$P/ladd [ladd8]=$P/ladd
    [ladd-baseline4]=$P/ladd-baseline [ladd-noadv4]=$P/ladd-noadv [default4]=$D [default8]=$D
)
# The teacher and the KD pair sample with guidance 3 (their exported default) at 28 steps: the
# KD comparison at equal steps. The LADD students are step-distilled to sample without guidance.
declare -A STEPS=(
    [teacher]=28 [kd-baseline]=28 [kd]=28 [ladd4]=4 [ladd8]=8 [ladd-baseline4]=4 [ladd-noadv4]=4
    [default4]=4 [default8]=8
)

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

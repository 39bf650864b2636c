#!/usr/bin/env bash
# The embedded default model (snapgen-shapes) from scratch, every stage of the recipe in order.
# Each stage resumes from its last checkpoint when re-run, so this script can be
# interrupted and started again; stages already finished (runs/shapes/STAGE/DONE) are skipped.
#
#   bash training/recipes/shapes.sh                  # all stages
#   STAGES="kd ladd" bash training/recipes/shapes.sh # some of them
#   MAX_STEPS=6000 STAGES="teacher" bash training/recipes/shapes.sh   # extend a finished stage
#   STAGES=ship bash training/recipes/shapes.sh       # only copy the LADD product into the package
#   PRODUCT=runs/shapes/ladd-s5/model STAGES=ship bash training/recipes/shapes.sh  # ship another run
#
# Dependencies: autoencoder -> {decoder, teacher}; decoder -> pretrain (the student without KD);
# teacher + decoder -> kd; pretrain + teacher -> ladd. Every run but LADD is progressive (64 px,
# then 128 px): better per CPU-hour, and the only way the students here learned which way round
# a spatial relation goes (docs/results.md). The KD comparison is kd (4000 steps) against
# pretrain's 4000-step snapshot (runs/shapes/pretrain/model-4000steps). LADD's parent is pretrain
# (8000 steps); the MMDiT teacher is LADD's discriminator backbone. With PARALLEL=1 (the default)
# two lanes run side by side, one core each (cpu_threads: 1), then LADD:
#   lane 1: decoder -> pretrain        lane 2: teacher -> (waits for the decoder) kd
#   then: ladd
# Wall time of each stage goes to runs/shapes/NAME/DONE; logs to runs/shapes/NAME.log.
# Last, `ship` replaces the embedded default model (snapgen/assets/snapgen-shapes) with the LADD
# product: the 4-step student with the tiny decoder.
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPGEN="${SNAPGEN:-.venv/bin/snapgen}"
STAGES="${STAGES:-autoencoder decoder teacher pretrain kd ladd ship}"
PARALLEL="${PARALLEL:-1}"
mkdir -p runs/shapes

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

run_stage() {  # NAME: configs/shapes/NAME.yaml -> runs/shapes/NAME, trained as the stage the config names
    local name=$1 config="configs/shapes/$1.yaml" out="runs/shapes/$1" stage
    stage=$(sed -n 's/^stage: *//p' "$config")
    local extra=()
    [ -n "${MAX_STEPS:-}" ] && extra=(--max-steps "$MAX_STEPS")
    if [ -f "${out}/DONE" ] && [ -z "${MAX_STEPS:-}" ]; then
        echo "== ${name}: done already (${out}/DONE)"
        return
    fi
    echo "== ${name}: start $(date -u +%FT%TZ)"
    local start resume=()
    start=$(date +%s)
    [ -d "${out}/checkpoints" ] && resume=(--resume)
    "$SNAPGEN" train "$stage" --config "$config" "${resume[@]}" "${extra[@]}" >> "runs/shapes/${name}.log" 2>&1
    local took=$(( $(date +%s) - start ))
    local before=0
    [ -f "${out}/DONE" ] && before=$(cut -d' ' -f1 "${out}/DONE")
    echo "$(( before + took )) s" > "${out}/DONE"
    echo "== ${name}: done $(date -u +%FT%TZ) (${took} s this run)"
}

run_chain() {
    for name in "$@"; do
        if wanted "$name"; then run_stage "$name"; fi
    done
    return 0
}

wait_for() {  # a stage of the other lane
    while [ ! -f "runs/shapes/$1/DONE" ]; do
        kill -0 "$2" 2>/dev/null || { echo "== $1 failed in the other lane; see runs/shapes/$1.log" >&2; exit 1; }
        sleep 10
    done
}

run_chain autoencoder
if [ "$PARALLEL" = 1 ]; then
    run_chain decoder pretrain &
    lane=$!
    run_chain teacher
    if wanted kd; then
        { wanted decoder || [ -f runs/shapes/decoder/DONE ]; } && wait_for decoder "$lane"
        run_chain kd
    fi
    wait "$lane"
    run_chain ladd
else
    run_chain decoder teacher pretrain kd ladd
fi

if wanted ship; then
    product=${PRODUCT:-runs/shapes/ladd/model} assets=snapgen/assets/snapgen-shapes
    [ -f "${product}/model_index.json" ] || { echo "== ship: no LADD product at ${product}" >&2; exit 1; }
    # Copied beside the target and swapped in, so an interrupted copy never leaves half a model.
    rm -rf "${assets}.new" "${assets}.old"
    cp -r "$product" "${assets}.new"
    chmod -R a+rX "${assets}.new"
    [ -d "$assets" ] && mv "$assets" "${assets}.old"
    mv "${assets}.new" "$assets"
    rm -rf "${assets}.old"
    echo "== ship: ${product} -> ${assets} ($(du -sh "$assets" | cut -f1))"
fi

#!/usr/bin/env bash
# The embedded default model (snapgen-shapes), every stage of the recipe in order:
#
#   autoencoder -> decoder -> teacher -> kd -> ladd -> ship
#
# and the ablations that test the recipe's two claims at equal steps:
#
#   kd-baseline     the kd stage without KD (same student, data, seeds, steps)
#   ladd-baseline   LADD of kd-baseline (the KD comparison after step distillation)
#   ladd-noadv      LADD of kd with adv_weight 0 (what the adversary adds)
#
#   bash training/recipes/shapes.sh                       # the recipe, then ship
#   STAGES="kd-baseline ladd-baseline ladd-noadv" bash training/recipes/shapes.sh
#   STAGES=ship bash training/recipes/shapes.sh           # only copy the LADD product into the package
#   PRODUCT=runs/shapes/ladd-noadv/model STAGES=ship bash training/recipes/shapes.sh
#   RETRAIN="teacher" bash training/recipes/shapes.sh     # train a stage whose product is committed
#
# Resuming. Every stage reads the products of earlier ones from runs/shapes/products/NAME, a
# link this script makes to the first of:
#   1. runs/shapes/NAME/<product>, once the stage has finished here (runs/shapes/NAME/DONE);
#   2. the committed product, for the stages whose product is in git (COMMITTED below), so a
#      fresh clone starts at the first stage whose product is not committed;
#   3. nothing: the stage is trained, resuming from its last checkpoint if there is one.
# So the script can be interrupted and started again, on this machine or, with the committed
# products, on another. RETRAIN names stages to train even though a committed product exists.
# With PARALLEL=1 (the default) independent stages run side by side, one core each
# (cpu_threads: 1 in their configs): kd beside kd-baseline, ladd beside ladd-baseline.
# Wall time of each stage goes to runs/shapes/NAME/DONE; logs to runs/shapes/NAME.log.
# CONFIGS and RUNS name another set of configs and the folder their out_dirs are in (the GPU
# recipe, training/recipes/shapes_gpu.py: CONFIGS=configs/shapes-gpu RUNS=runs/shapes-gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPGEN="${SNAPGEN:-.venv/bin/snapgen}"
CONFIGS="${CONFIGS:-configs/shapes}"
R="${RUNS:-runs/shapes}"
STAGES="${STAGES:-autoencoder decoder teacher kd ladd ship}"
RETRAIN="${RETRAIN:-}"
PARALLEL="${PARALLEL:-1}"
mkdir -p "${R}/products"

# Where each stage's run leaves its product, and the committed copy (fp16 weights where large).
declare -A RUN_PRODUCT=(
    [autoencoder]=${R}/autoencoder/autoencoder [decoder]=${R}/decoder/decoder
    [teacher]=${R}/teacher/model [kd]=${R}/kd/model [kd-baseline]=${R}/kd-baseline/model
    [ladd]=${R}/ladd/model [ladd-baseline]=${R}/ladd-baseline/model
    [ladd-noadv]=${R}/ladd-noadv/model
)
declare -A COMMITTED=(
    [autoencoder]=snapgen/assets/snapgen-shapes/autoencoder [decoder]=snapgen/assets/snapgen-shapes/decoder
    [teacher]=training/products/shapes/teacher
)

wanted() { [[ " $STAGES " == *" $1 "* ]]; }
retrain() { [[ " $RETRAIN " == *" $1 "* ]]; }

link_product() {  # NAME TARGET: ${RUNS}/products/NAME -> TARGET
    ln -sfn "$(realpath --relative-to="${R}/products" "$2")" "${R}/products/$1"
}

resolve() {  # NAME: link the product if there is one; 0 if the stage need not run
    local name=$1 committed=${COMMITTED[$1]:-}
    if [ -f "${R}/${name}/DONE" ] && [ -e "${RUN_PRODUCT[$name]}" ]; then
        link_product "$name" "${RUN_PRODUCT[$name]}"
        echo "== ${name}: done already (${R}/${name}/DONE)"
        return 0
    fi
    if [ -n "$committed" ] && [ -e "$committed" ] && ! retrain "$name"; then
        link_product "$name" "$committed"
        echo "== ${name}: the committed product (${committed})"
        return 0
    fi
    return 1
}

run_stage() {  # NAME: ${CONFIGS}/NAME.yaml -> ${R}/NAME, trained as the stage the config names
    local name=$1 config="${CONFIGS}/$1.yaml" out="${R}/$1" stage
    resolve "$name" && return 0
    stage=$(sed -n 's/^stage: *//p' "$config")
    echo "== ${name}: start $(date -u +%FT%TZ)"
    local start resume=()
    start=$(date +%s)
    [ -d "${out}/checkpoints" ] && resume=(--resume)
    "$SNAPGEN" train "$stage" --config "$config" "${resume[@]}" >> "${R}/${name}.log" 2>&1
    echo "$(( $(date +%s) - start )) s" > "${out}/DONE"
    link_product "$name" "${RUN_PRODUCT[$name]}"
    echo "== ${name}: done $(date -u +%FT%TZ) ($(cat "${out}/DONE"))"
}

run_all() {  # the wanted stages among the arguments: side by side with PARALLEL=1, else in order
    local pids=() name
    for name in "$@"; do
        wanted "$name" || continue
        if [ "$PARALLEL" = 1 ]; then run_stage "$name" & pids+=($!); else run_stage "$name"; fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    return 0
}

# Every product there is, also of the stages not wanted this time (later stages and
# shapes_eval.sh read them).
for name in "${!RUN_PRODUCT[@]}"; do
    wanted "$name" || resolve "$name" > /dev/null || true
done

run_all autoencoder
run_all decoder
run_all teacher
run_all kd kd-baseline
run_all ladd ladd-baseline ladd-noadv

if wanted ship; then
    product=${PRODUCT:-${R}/ladd/model} assets=snapgen/assets/snapgen-shapes
    [ -f "${product}/model_index.json" ] || { echo "== ship: no LADD product at ${product}" >&2; exit 1; }
    # Copied beside the target and swapped in, so an interrupted copy never leaves half a model.
    rm -rf "${assets}.new" "${assets}.old"
    cp -rL "$product" "${assets}.new"
    # The encoder travels with the default, so it can be trained on (image-to-image, fine-tuning).
    [ -d "${assets}.new/autoencoder" ] || cp -rL "${R}/products/autoencoder" "${assets}.new/autoencoder"
    chmod -R a+rX "${assets}.new"
    # Committed products that share the default's weight files (links into the package, such as the
    # teacher, which is the default U-Net) keep the old default's: the links become copies first.
    find training/products -type l 2>/dev/null | while read -r link; do
        target=$(readlink -f "$link")
        case "$target" in "$(realpath "$assets")"/*) cp --remove-destination "$target" "$link" ;; esac
    done
    [ -d "$assets" ] && mv "$assets" "${assets}.old"
    mv "${assets}.new" "$assets"
    rm -rf "${assets}.old"
    echo "== ship: ${product} -> ${assets} ($(du -sh "$assets" | cut -f1))"
fi

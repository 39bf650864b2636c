#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's redis-server (the server tests
# start their own instances on free ports). Idempotent: does nothing when it is already there.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: redis-server is missing and there is no apt-get; install Redis >= 6.2 yourself" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "system-deps: redis-server is missing; run as root (or with sudo): apt-get install -y redis-server" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends redis-server >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends redis-server >/dev/null
fi
# Tests start their own servers; a service the package may have started is not needed.
redis-server --version

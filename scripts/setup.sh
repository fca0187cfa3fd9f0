#!/usr/bin/env bash
# One command for a fresh machine: creates .venv (Python 3.11), installs the project with its
# pinned dependencies, and checks the model files the pipelines load at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || { echo "setup: $PY not found (Python 3.11 is required)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/cogportrait models check
.venv/bin/dvc config core.analytics false >/dev/null 2>&1 || true
# Optional: Debian's headless Chromium, for tests/test_library_report.py (it opens the HTML report).
# Never fails setup: without root or apt the test skips itself.
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } \
            || echo "setup: could not install chromium with apt-get; the browser test will be skipped"
    else
        echo "setup: no /usr/bin/chromium (needs root and apt-get to install); the browser test will be skipped"
    fi
fi
echo "setup: ok ($(.venv/bin/python --version))"

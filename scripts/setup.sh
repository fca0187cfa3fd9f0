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
echo "setup: ok ($(.venv/bin/python --version))"

#!/usr/bin/env bash
# Create/refresh .venv, install maia-onnx with its dev/test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[export,dev,plot,ray,kernels]"
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when a selection collected no test; that is not a failure of the suite.
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"

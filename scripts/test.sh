#!/usr/bin/env bash
# Create/refresh .venv, install maia-onnx with its dev/test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
setup_venv "export,dev,plot,ray,kernels"
# A selection that collects no test is a failure (pytest exits 5): a broken import must not pass as "nothing to run".
exec python -m pytest -q "$@"

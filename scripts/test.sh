#!/usr/bin/env bash
# Create/refresh .venv, install maia-onnx with its dev/test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
# CI must not pass without the Maia plugin EP: its build failure is fatal, and tests/test_plugin_ep.py fails, not skips
export MAIA_REQUIRE_EP=1
setup_venv "export,dev,plot,ray,kernels,diffusers"
# A selection that collects no test is a failure (pytest exits 5): a broken import must not pass as "nothing to run".
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# Create/refresh .venv, install maia-onnx with its dev/test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
setup_venv "export,dev,plot,ray,kernels"
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when a selection collected no test; that is not a failure of the suite.
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"

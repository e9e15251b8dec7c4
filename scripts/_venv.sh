# Sourced (from the repository root) by demo.sh and test.sh: create or refresh .venv, activate it, and install
# maia-onnx editable with the extras named in $1 (e.g. "export,plot").
setup_venv() {
    local py="${PYTHON:-python3}"
    [ -x .venv/bin/python ] || "$py" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
    python -m pip install -q --upgrade pip >/dev/null
    # The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[$1]"
}

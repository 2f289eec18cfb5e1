#!/usr/bin/env bash
# llama.cpp as a benchmark PEER for the SmolLM2 decode benchmark (benchmarks/smollm2_decode.py).
#
# Not a dependency of gqa, not run by tests or CI: run it by hand. It builds llama.cpp from source
# in a scratch folder outside the repository, exports gqa's SmolLM2 variants to GGUF with
# `gqa convert --export gguf`, checks that llama.cpp loads and generates from them (uniform and
# per-layer KV heads), and measures decode tokens/s with llama-batched-bench.
#
# Results recorded by hand in benchmarks/results/llamacpp-smollm2-decode-cpu.{md,json}.
#
# Usage: benchmarks/llamacpp_peer.sh [WORK]        (WORK defaults to /tmp/llamacpp-peer)
# Needs: cmake, a C/C++ compiler, ninja or make, pip (to fetch the llama.cpp source), and gqa's venv.
# Env: LLAMACPP_SRC=<llama.cpp source tree> to skip the download; THREADS="1 2"; CONTEXTS="512 2048 8184".
set -euo pipefail

WORK=${1:-/tmp/llamacpp-peer}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
GQA=${GQA:-$ROOT/.venv/bin/gqa}
THREADS=${THREADS:-"1 2"}
CONTEXTS=${CONTEXTS:-"512 2048 8184"}
NTG=${NTG:-32}
mkdir -p "$WORK"

# 1. llama.cpp source. The recorded run used the copy vendored in llama-cpp-python 0.3.36's sdist
#    (its CHANGELOG: llama.cpp commit 0c1e57098), because the full git history was too large to fetch.
SRC=${LLAMACPP_SRC:-$WORK/llama.cpp-src}
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    "$PY" -m pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d "$WORK/dl"
    tar -xzf "$WORK/dl/llama_cpp_python-0.3.36.tar.gz" -C "$WORK/dl"
    mv "$WORK/dl/llama_cpp_python-0.3.36/vendor/llama.cpp" "$SRC"
fi

# 2. Build only the tools used here (CPU backend, -march=native).
BUILD=$WORK/llama.cpp-build
cmake -B "$BUILD" -S "$SRC" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
nice -n 5 cmake --build "$BUILD" -j2 --target llama-batched-bench llama-simple llama-completion llama-quantize
BIN=$BUILD/bin

# 3. Models: the shipped Q4_1 GGUF, and gqa's fp32 GGUF exports (3 KV heads = identity, 1 = mean-merged,
#    per-layer 3 for layers 0-9 and 1 for layers 10-29, written with llama.cpp's `deci` architecture).
GGUF=$("$PY" -c "from gqa.model.assets import smollm2_gguf_path; print(smollm2_gguf_path())")
M=$WORK/models
mkdir -p "$M"
for k in 3 1; do
    [ -f "$M/kv$k-f32/model.gguf" ] || "$GQA" convert "$GGUF" "$M/kv$k-f32" --kv-heads "$k" --export gguf --dtype float32
done
PL=3,3,3,3,3,3,3,3,3,3,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
[ -f "$M/pl-f32/model.gguf" ] || "$GQA" convert "$GGUF" "$M/pl-f32" --kv-heads-per-layer "$PL" \
    --calib english:calib --calib-tokens 2048 --export gguf --dtype float32

# 4. Load + greedy generation check (llama-simple is greedy).
PROMPT="The capital of France is"
for f in "$M/kv3-f32/model.gguf" "$M/kv1-f32/model.gguf" "$M/pl-f32/model.gguf" "$GGUF"; do
    echo "== $f"
    "$BIN/llama-simple" -m "$f" -n 20 "$PROMPT" 2>"$WORK/simple.err" || { tail -20 "$WORK/simple.err"; }
done

# 5. Decode benchmark. -pps: the prompt is prefilled once and copied to every sequence (the decode
#    steps are what is compared; gqa's benchmark does not prefill at all). -t sets decode threads for
#    one sequence, -tb for batched decode (npl 4), so both are set. KV cache fp32 to match gqa's fp32 run.
for f in "$M/kv3-f32/model.gguf" "$M/kv1-f32/model.gguf" "$GGUF"; do
    for t in $THREADS; do
        for s in $CONTEXTS; do
            c=$(( s + 4 * NTG + 64 ))
            echo "== $f t=$t S=$s load: $(cut -d' ' -f1-3 /proc/loadavg)"
            "$BIN/llama-batched-bench" -m "$f" -c "$c" -b 2048 -ub 512 -npp "$s" -ntg "$NTG" -npl 1,4 \
                -pps -kvu -t "$t" -tb "$t" -ctk f32 -ctv f32 --output-format jsonl 2>/dev/null | grep '^{' || true
            echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
        done
    done
done

#!/usr/bin/env bash
# On a CUDA machine: run the Triton decode-kernel tests on the device, then the full attention
# benchmark in bf16 and fp32. Results land in benchmarks/results/<gpu>-<date>[-<dtype>]-full.{json,md,png}
# (recorded results of the same name are replaced only when FORCE=1).
# Usage (from the repository root, with the project installed): bash benchmarks/attention_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'EOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("attention_gpu.sh needs a CUDA GPU and a CUDA build of torch")
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
EOF

# Without TRITON_INTERPRET the test module builds the kernels for the GPU and runs every case there;
# CI=true makes a missing triton an error instead of a skip.
env -u TRITON_INTERPRET CI=true python -m pytest -q tests/kernels/test_triton.py tests/kernels/test_cpu.py

# The issue's full case list (GQA/MQA/MHA, B=1 S=4k..128k, B=32 S=4k, 4k sliding window).
force=()
[[ "${FORCE:-0}" == 1 ]] && force=(--force)
gqa bench attention --device cuda --dtype bfloat16 --full --max-memory-gb 40 --out benchmarks/results "${force[@]}"
gqa bench attention --device cuda --dtype float32 --full --max-memory-gb 40 --out benchmarks/results "${force[@]}"

#!/usr/bin/env bash
# The one prepared GPU check: every stage at its real size on one GPU, random weights (nothing downloaded), bf16
# (SD-VAE fine-tuning also in its default fp32 and in fp16), a few warm steps each, then one table (img/s, MFU
# against the measured bf16 matmul peak, peak memory). At most 10 minutes (an H200: about 5, of which DiT-XL/2's
# compile is 1-3); stages left when 9 minutes have passed are skipped and say so.
#
#   bash bench/gpu_check.sh                          # on the GPU machine
#   bash bench/gpu_check.sh --official /path/to/DiT  # + the official DiT-XL/2 step (facebookresearch/DiT, needs timm)
#   bash bench/gpu_check.sh --cpu-smoke              # toy sizes on the CPU, seconds: what CI runs
#
# The work is done by bench/gpu_check.py (its docstring lists the stages).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu-smoke "* ]]; then
    # One intra-op thread unless told otherwise: two threads on a busy 2-core machine spin against each other.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec timeout 600 python3 bench/gpu_check.py "$@"

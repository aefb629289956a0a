#!/usr/bin/env bash
# Device-ready check (issue 18): real-size paths CPU tests cannot cover, one line per check
# (passed / failed / skipped with the reason, seconds, peak memory); exit 1 if any failed.
#   - clip_features: open_clip ViT-L-14-336 (random weights) at 518 px through the features encoder
#   - aaclip_stage2_amp: one AA-CLIP stage-2 epoch with autocast + GradScaler
#   - ddp_nccl: one DDP step with NCCL over the GPUs present
#   - benchmark_knn: scripts/benchmark.py --knn-only
# On a CPU machine the GPU-only checks are skipped with a reason. DEVICE_CHECK_TINY=1: tiny sizes (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/device_check.py "$@"

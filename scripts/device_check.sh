#!/usr/bin/env bash
# The whole GPU check in one call on the lent device machine (../shared/docs/device.md), run from
# the repository root there; logs and the DEVICE.md table go to $OUT.
#
# Before it, earlier calls to the same warm machine carried the onnxruntime-gpu wheel in pieces
# (.ortgpu/part-0*.d/part-0* and .ortgpu/SHA256) and the onnx-graphsurgeon wheel (.whl/), and
# the first one started the benchmark models' export in the background:
#     setsid nohup python3 scripts/export_benchmark_models.py >/tmp/export.log 2>&1 </dev/null &
# The machine has numpy, onnx, torch, pillow, click and pytest already. Seen on 2026-11-26: after
# a call that failed to copy, the .whl folder carried earlier was gone; carry it again in the last
# call (it is small). A failed copy also held the machine for ~6 minutes of the 15.
#
# Stages: install; the GPU tests (CUDA maps against the CPU's, repeats); the same seed in two
# processes; scripts/bench_device.py (floors, Smooth Grad-CAM++ n = 25, `onnxcam explain` over
# 256 images) on every model that exported; scripts/profile_ops.py on ResNet-50. About 6 minutes
# (2026-11-26, H200: the first four stages took 4.5 minutes, VGG-16's folder step was cut off).
# scripts/device_prepare.sh makes the pieces and says how to carry them.
set -u
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
python3 - <<'EOF' 2>&1 | tee "$OUT/providers.txt"
import onnxruntime as ort
ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.get_available_providers())
from tests.test_explainer import build_cnn
from onnxcam.runtime.providers import create_session
session, device = create_session(build_cnn().SerializeToString(), "cuda")
print("device", device, session.get_providers())
print("CUDA options", session.get_provider_options().get("CUDAExecutionProvider"))
EOF

stage tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_runtime.py 2>&1 | tee "$OUT/tests.log"

stage "same seed, two processes"
for run in 1 2; do
    timeout 120 python3 - <<'EOF' 2>&1 | tee -a "$OUT/repeat.log"
import hashlib
from pathlib import Path
import sys
sys.path.insert(0, "scripts")
from bench import SPECS
from onnxcam import Explainer
explainer = Explainer("models/efficientnet_lite0.onnx", layer=SPECS["efficientnet_lite0"].honest_layer, device="cuda")
images = sorted(str(p) for p in Path("models/images").glob("*.png"))
maps = [e.raw_map for e in explainer.explain(images, samples=25, seed=3)]
print("device", explainer.session.device, "batch", explainer.batch_size,
      "sha256", hashlib.sha256(b"".join(m.tobytes() for m in maps)).hexdigest()[:16])
EOF
done

stage "waiting for the model export"
for _ in $(seq 1 90); do pgrep -f export_benchmark_models >/dev/null || break; sleep 2; done
cp /tmp/export.log "$OUT/export.log" 2>/dev/null; tail -3 /tmp/export.log 2>/dev/null

stage bench
timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench_device.py --device cuda --repeats 5 \
    --out "$OUT/DEVICE.md" 2>&1 | tee "$OUT/bench.log"

stage "operator profile, ResNet-50 (with and without deterministic kernels)"
if [ -f .cache/bench_models/resnet50.onnx ]; then
    LAYER=$(python3 -c 'import sys; sys.path.insert(0, "scripts"); from bench import SPECS; print(SPECS["resnet50"].honest_layer)')
    for det in 1 0; do
        timeout 90 python3 scripts/profile_ops.py .cache/bench_models/resnet50.onnx --layer "$LAYER" \
            --device cuda --deterministic $det 2>&1 | head -40 | tee -a "$OUT/profile.log"
    done
fi
stage done

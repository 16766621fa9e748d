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
# Stages: install (scripts/device_install.sh); the GPU tests (CUDA maps against the CPU's,
# repeats); the same seed in two processes each under three CUDA settings (deterministic kernels
# or not, cuDNN's exhaustive or heuristic algorithm search), side by side; scripts/bench_device.py
# (floors, Smooth Grad-CAM++ n = 25, `onnxcam explain` over 256 images) on every model that
# exported; scripts/profile_ops.py on ResNet-50. On the H200: about 6 minutes on 2026-11-26,
# 4.3 minutes on 2026-11-27. scripts/device_overhead.sh is the shorter check of where the time
# goes; scripts/device_prepare.sh makes the pieces and says how to carry them.
set -u
source scripts/device_install.sh
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
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_runtime.py 2>&1 | tee "$OUT/tests.log"

stage "waiting for the model export"
for _ in $(seq 1 90); do pgrep -f export_benchmark_models >/dev/null || break; sleep 2; done
cp /tmp/export.log "$OUT/export.log" 2>/dev/null; tail -3 /tmp/export.log 2>/dev/null

stage "same seed, two processes each, three CUDA settings (run side by side)"
cat > /tmp/repeat.py <<'EOF'
import hashlib
from pathlib import Path
import sys
sys.path.insert(0, "scripts")
from bench import SPECS
from onnxcam import Explainer
images = sorted(str(p) for p in Path("models/images").glob("*.png"))
for name in ("efficientnet_lite0", "resnet50"):
    if not SPECS[name].path.is_file():
        continue
    explainer = Explainer(SPECS[name].path, layer=SPECS[name].honest_layer, device="cuda")
    maps = [e.raw_map for e in explainer.explain(images, samples=25, seed=3)]
    print(sys.argv[1], name, "device", explainer.session.device, "batch", explainer.batch_size,
          "sha256", hashlib.sha256(b"".join(m.tobytes() for m in maps)).hexdigest()[:16], flush=True)
EOF
for run in 1 2; do
    timeout 150 python3 /tmp/repeat.py "deterministic,exhaustive" >> /tmp/repeat_d.log 2>&1 &
    ONNXCAM_DETERMINISTIC=0 timeout 150 python3 /tmp/repeat.py "racy,exhaustive" >> /tmp/repeat_r.log 2>&1 &
    ONNXCAM_DETERMINISTIC=0 ONNXCAM_CUDNN_SEARCH=HEURISTIC timeout 150 python3 /tmp/repeat.py "racy,heuristic" \
        >> /tmp/repeat_h.log 2>&1 &
done
wait
cat /tmp/repeat_d.log /tmp/repeat_r.log /tmp/repeat_h.log | tee "$OUT/repeat.log"

stage bench
timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench_device.py --device cuda --repeats 5 \
    --out "$OUT/DEVICE.md" 2>&1 | tee "$OUT/bench.log"

stage "operator profile, ResNet-50 (with and without deterministic kernels)"
if [ -f .cache/bench_models/resnet50.onnx ]; then
    LAYER=$(python3 -c 'import sys; sys.path.insert(0, "scripts"); from bench import SPECS; print(SPECS["resnet50"].honest_layer)')
    for det in 1 0; do
        timeout 60 python3 scripts/profile_ops.py .cache/bench_models/resnet50.onnx --layer "$LAYER" \
            --device cuda --deterministic $det 2>&1 | head -40 | tee -a "$OUT/profile.log"
    done
fi
stage done

#!/usr/bin/env bash
# Prepare, here, what scripts/device_check.sh needs on the lent GPU machine
# (../shared/docs/device.md): the onnxruntime-gpu wheel in pieces that each fit in one call beside
# the working tree, and the onnx-graphsurgeon wheel. Run from the repository root; both folders are
# git-ignored through .git/info/exclude.
#
# Then, back to back on one warm machine (each call counts against the device time; a machine
# left idle for 30 s goes back and the pieces with it):
#   call 1: carry [".ortgpu/part-00.d", ".whl"], command
#           setsid nohup python3 scripts/export_benchmark_models.py >/tmp/export.log 2>&1 </dev/null &
#   calls 2..K-1: carry [".ortgpu/part-0k.d"], command: true
#   call K: carry [".ortgpu/part-0(K-1).d", ".ortgpu/SHA256", ".whl"], command
#           bash scripts/device_check.sh        (or scripts/device_overhead.sh)
# (the number of pieces K is printed below; on 2026-11-26 and 27 it was 6). On 2026-11-27 the
# machine's start and the five carrying calls took 60-85 s of device time, made back to back.
set -eu
VERSION=${ORT_GPU_VERSION:-1.31.1}
for folder in /.ortgpu/ /.whl/; do
    grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
done
PY=${PYTHON:-python3}
mkdir -p .ortgpu .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .ortgpu "onnxruntime-gpu==$VERSION"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "onnx-graphsurgeon==$($PY -c 'import importlib.metadata as m; print(m.version("onnx-graphsurgeon"))')"
# each call carries the working tree (tracked and untracked files) plus one piece: 64 MiB in all
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
PIECE=$(( 63 * 1024 * 1024 - TREE ))  # 1 MiB of margin
echo "working tree $((TREE / 1024)) KiB: pieces of $((PIECE / 1024)) KiB"
cd .ortgpu
rm -rf part-0*
WHEEL=$(ls onnxruntime_gpu-"$VERSION"-*.whl)
split -b "$PIECE" -d "$WHEEL" part-
sha256sum "$WHEEL" > SHA256
for piece in part-0?; do mkdir -p "$piece.d" && mv "$piece" "$piece.d/"; done
echo "pieces: $(ls -d part-0*.d | wc -l) (.ortgpu/part-0*.d)"

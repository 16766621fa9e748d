#!/usr/bin/env bash
# Where the CUDA path's time goes, in one call on the lent GPU machine (after the wheel's pieces
# were carried as scripts/device_prepare.sh says; the first call started the export of ResNet-50
# and MobileNetV2 in the background). Logs go to $OUT: the test suite but the zoo (most of it runs on CUDA there,
# the default device), the host work of one explanation with and without
# the calculator's workspace (scripts/bench_host_work.py), the copies, floors, CUDA graphs and the
# explanation's profile (scripts/profile_cuda_overhead.py), what a change of batch size costs
# (scripts/profile_run_sizes.py), then scripts/bench_device.py on
# three models (its table in $OUT/DEVICE.md, written model by model).
set -u
source scripts/device_install.sh

stage "the test suite on CUDA (the default device there), the model zoo aside (2+ minutes)"
timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -v --tb=short -p no:cacheprovider tests \
    --ignore tests/test_zoo.py > "$OUT/tests.log" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -25

stage "waiting for the model export"
for _ in $(seq 1 60); do pgrep -f export_benchmark_models >/dev/null || break; sleep 2; done
tail -4 /tmp/export.log 2>/dev/null

stage "host work, with and without the calculator's workspace"
timeout 60 python3 scripts/bench_host_work.py --channels 2048 2>&1 | tee "$OUT/host_work.log"

stage "overheads"
timeout 150 python3 scripts/profile_cuda_overhead.py --models efficientnet_lite0 mobilenet_v2 resnet50 \
    2>&1 | tee "$OUT/overhead.log"

stage "run sizes: what a change of batch size costs, and padding a pass's runs"
timeout 120 python3 scripts/profile_run_sizes.py --models efficientnet_lite0 resnet50 2>&1 | tee "$OUT/run_sizes.log"

stage bench
timeout "${BENCH_TIMEOUT:-150}" python3 scripts/bench_device.py --device cuda --repeats "${BENCH_REPEATS:-3}" \
    --models efficientnet_lite0 mobilenet_v2 resnet50 --out "$OUT/DEVICE.md" 2>&1 | tee "$OUT/bench.log"
stage done

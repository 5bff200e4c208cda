#!/usr/bin/env bash
# The GPU checks in one call: GPU tests, then the offload, step and kernel benchmarks, each writing JSON and a
# log under $OUT (default benchmarks/out). Runs from the repository root without installing the package.
#   bash benchmarks/gpu_suite.sh [quick]
set -u
source benchmarks/gpu_env.sh
free -g | head -2 | tee -a "$OUT/gpu.txt"

python3 benchmarks/bench_offload.py --shapes opt-1.3b opt-6.7b opt-13b opt-30b opt-175b --layers 4 \
    --batches 1x2048 8x2048 --repeat 3 --out "$OUT/offload.json" 2>&1 | tee "$OUT/offload.log" | grep -v "^{"
python3 benchmarks/bench_parallel.py --calibrate "$OUT/offload.json" --out "$OUT/parallel.json" 2>&1 \
    | tee "$OUT/parallel.log" | tail -n 70
python3 benchmarks/bench_step.py --device cuda --shapes opt-1.3b opt-6.7b --repeat 3 --out "$OUT/step.json" 2>&1 \
    | tee "$OUT/step.log" | grep -v "^{"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py tests/unit/test_kernels.py -k "gpu or engine or cuda" \
    --timeout 120 2>&1 | tail -n 6 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_kernels.py --quick --out "$OUT/kernels.json" 2>&1 | tail -n 20 | tee "$OUT/kernels.log"
# BLOCK x num_warps grid on OPT-175B / 6.7B blocks; KERNELS_BASELINE=<older triton_ops.py> adds a before/after
python3 benchmarks/bench_kernels.py --sweep ${KERNELS_BASELINE:+--baseline "$KERNELS_BASELINE"} \
    --out "$OUT/kernels_sweep.json" 2>&1 | tail -n 40 | tee "$OUT/kernels_sweep.log"

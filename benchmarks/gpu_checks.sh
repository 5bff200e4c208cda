#!/usr/bin/env bash
# A short GPU pass (about 8 minutes on an H100/H200): the multi-GPU cost-model calibration, the GPU tests (offload,
# kernels, the scheduler's fault repair on CUDA), the kernels' tile sweep and the kernel benchmark. Each part
# writes a log and JSON under $OUT (default benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_checks.sh [OLD_TRITON_OPS.py]   # optional: an older triton_ops.py timed beside the new one
set -u
source benchmarks/gpu_env.sh

timeout 120 python3 benchmarks/bench_parallel.py --calibrate benchmarks/results/2026-11-26-h200/offload.json \
    --out "$OUT/parallel.json" > "$OUT/parallel.log" 2>&1; echo "parallel: exit $?" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py tests/unit/test_kernels.py \
    -k "gpu or engine or cuda" > "$OUT/gpu_tests.log" 2>&1; tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/integration/test_control.py \
    -k "one_worker or mid_write_back or kill_9" > "$OUT/control_gpu.log" 2>&1; tail -n 3 "$OUT/control_gpu.log" | tee -a "$OUT/gpu.txt"
timeout 150 python3 benchmarks/bench_kernels.py --sweep ${1:+--baseline "$1"} --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
echo "sweep: exit $?" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/bench_kernels.py --quick --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels: exit $?" | tee -a "$OUT/gpu.txt"
tail -n 25 "$OUT/sweep.log"; tail -n 20 "$OUT/kernels.log"

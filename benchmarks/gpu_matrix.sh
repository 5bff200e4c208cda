#!/usr/bin/env bash
# The GPU checks of streaming one matrix at a time (optim.stream_granularity = "matrix", zo2/offload/pieces.py;
# about 5 minutes on an H100/H200): the CUDA offload tests (matrix ≡ resident with Triton kernels and bf16
# rounding, K = 1 and 3; its peak against block granularity), then benchmarks/bench_offload.py on the OPT-6.7B and
# OPT-175B shapes at 1×2048 and 8×2048: resident, streamed by block and by matrix, each with K = 1 and K = 4, in one
# run (step time, peak memory, the plan's expected peak), and a profile of the host time of a resident OPT-6.7B
# step. Logs and JSON under $OUT.
#   bash benchmarks/gpu_matrix.sh
set -u
source benchmarks/gpu_env.sh

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py tests/unit/test_optimizers.py \
    -k "cuda or gpu or peak or matrix" > "$OUT/gpu_tests.log" 2>&1
tail -n 6 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu.txt"
timeout 300 python3 benchmarks/bench_offload.py --shapes opt-6.7b opt-175b --layers 4 --batches 1x2048 8x2048 \
    --repeat 3 --budget-shape none --writeback 4 --matrix --out "$OUT/offload_matrix.json" > "$OUT/offload_matrix.log" 2>&1
echo "offload --matrix: exit $?" | tee -a "$OUT/gpu.txt"
grep -v "^{" "$OUT/offload_matrix.log" | tail -n 22
timeout 60 python3 benchmarks/profile_step.py --shape opt-6.7b --layers 4 --batch 1x2048 --offload false --top 18 \
    --out "$OUT/profile_step.json" > "$OUT/profile_step.log" 2>&1
tail -n 28 "$OUT/profile_step.log"

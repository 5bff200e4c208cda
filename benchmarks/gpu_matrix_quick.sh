#!/usr/bin/env bash
# A short GPU check of streaming one matrix at a time (about 2 minutes): the CUDA matrix tests, then
# bench_offload.py on the OPT-6.7B and OPT-175B shapes (4 layers) at 1×2048 and 8×2048, resident, by block and by
# matrix with K = 1, by matrix with no spare ring slot (what the third slot buys), and by block with
# writeback_every = 'auto' (the K its probe chose: 1 where compute-bound), in one run. Logs and JSON under $OUT.
#   bash benchmarks/gpu_matrix_quick.sh
set -u
source benchmarks/gpu_env.sh

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py -k "matrix or peak or chunks or lagging or spare" \
    > "$OUT/gpu_tests.log" 2>&1
tail -n 4 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu.txt"
timeout 260 python3 benchmarks/bench_offload.py --shapes opt-6.7b opt-175b --layers 4 --batches 1x2048 8x2048 \
    --repeat 3 --budget-shape none --matrix --spare-slots 0 --writeback auto --out "$OUT/offload_final.json" > "$OUT/offload_final.log" 2>&1
echo "offload --matrix: exit $?" | tee -a "$OUT/gpu.txt"
grep -v "^{" "$OUT/offload_final.log" | tail -n 28

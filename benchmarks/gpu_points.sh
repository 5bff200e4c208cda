#!/usr/bin/env bash
# The GPU checks of running a step's points as one batch with each module's parameters formed just in time
# (zo2/points.py; about 5 minutes on an H100/H200): the CUDA tests (streamed ≡ resident on Triton kernels with bf16
# rounding, lagging write-back, peak memory flat in depth, the adapters on CUDA), then benchmarks/bench_offload.py
# over the OPT shapes at 1×2048 and 8×2048 (peak memory, step vs the transfer floor), whose JSON the planner's
# comparison test reads (benchmarks/results/<date>-h200/offload.json). Logs and JSON under $OUT.
#   bash benchmarks/gpu_points.sh
set -u
source benchmarks/gpu_env.sh

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py tests/unit/test_adapters.py \
    tests/unit/test_optimizers.py -k "cuda or gpu or peak or resident" > "$OUT/gpu_tests.log" 2>&1
tail -n 6 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu.txt"
timeout 330 python3 benchmarks/bench_offload.py --shapes opt-1.3b opt-6.7b opt-13b opt-30b opt-175b --layers 4 \
    --batches 1x2048 8x2048 --repeat 3 --out "$OUT/offload.json" > "$OUT/offload.log" 2>&1
echo "offload: exit $?" | tee -a "$OUT/gpu.txt"
grep -v "^{" "$OUT/offload.log" | tail -n 16
python3 -c "
from zo2.parallel import plan
for r in plan.compare_with_benchmark('$OUT/offload.json'):
    print(r['shape'], r['batch'], 'peak', round(r['peak_gb'], 2), 'pred', round(r['peak_pred_gb'], 2),
          'streamed', round(r['streamed_ratio'], 3), 'resident', round(r['resident_ratio'], 3))
" 2>&1 | tee "$OUT/compare.txt"

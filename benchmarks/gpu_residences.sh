#!/usr/bin/env bash
# The GPU checks of the residence interface and the lagging write-back (about 6 minutes on an H100/H200): the CUDA
# offload tests (streamed ≡ resident, lagging write-back ≡ resident on Triton kernels with bf16 rounding), then
# benchmarks/bench_offload.py with optim.writeback_every = 2, 4, 8 against the one-way floor measured in the same
# run, for the OPT-6.7B and OPT-175B shapes at 1×2048 and 8×2048. Logs and JSON under $OUT (default
# benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_residences.sh
set -u
source benchmarks/gpu_env.sh

timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py > "$OUT/offload_gpu.log" 2>&1
tail -n 3 "$OUT/offload_gpu.log" | tee -a "$OUT/gpu.txt"
timeout 330 python3 benchmarks/bench_offload.py --shapes opt-6.7b opt-175b --layers 3 --repeat 3 --budget-shape none \
    --writeback 2 4 8 --out "$OUT/offload_writeback.json" > "$OUT/offload_writeback.log" 2>&1
echo "offload --writeback: exit $?" | tee -a "$OUT/gpu.txt"
tail -n 30 "$OUT/offload_writeback.log"

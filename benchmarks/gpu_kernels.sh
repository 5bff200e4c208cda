#!/usr/bin/env bash
# The kernels' GPU pass (about 6 minutes on an H100/H200; the bandwidth targets were set on an H100): the
# kernel tests on CUDA, the register-cap sweep (resident programs per SM against spills; see kernel_notes.md),
# the kernel benchmark on every OPT block shape and the engine step against two plain forwards. Each part writes
# a log and JSON under $OUT (default benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_kernels.sh
set -u
source benchmarks/gpu_env.sh

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py -k "gpu or engine or cuda" \
    > "$OUT/kernel_tests.log" 2>&1; tail -n 3 "$OUT/kernel_tests.log" | tee -a "$OUT/gpu.txt"
timeout 240 python3 benchmarks/bench_kernels.py --sweep --blocks 1024,2048 --warps 2,4 --persistent "" \
    --maxnreg 32,40,48,56,64 --maxnreg-tiles 2048/2,1024/2 --out "$OUT/sweep_regs.json" > "$OUT/sweep_regs.log" 2>&1
echo "sweep: exit $?" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/bench_kernels.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels: exit $?" | tee -a "$OUT/gpu.txt"
timeout 150 python3 benchmarks/bench_step.py --device cuda --shapes opt-1.3b opt-6.7b --repeat 3 --out "$OUT/step.json" \
    > "$OUT/step.log" 2>&1; echo "step: exit $?" | tee -a "$OUT/gpu.txt"
tail -n 32 "$OUT/sweep_regs.log"; tail -n 16 "$OUT/kernels.log"; grep -v "^{" "$OUT/step.log" | tail -n 8

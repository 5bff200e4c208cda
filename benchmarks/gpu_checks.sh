#!/usr/bin/env bash
# A short GPU pass (about 8 minutes on an H100/H200): the multi-GPU cost-model calibration, the GPU tests (offload,
# kernels, the scheduler's fault repair on CUDA), the kernels' tile sweep and the kernel benchmark. Each part
# writes a log and JSON under $OUT (default benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_checks.sh [OLD_TRITON_OPS.py]   # optional: an older triton_ops.py timed beside the new one
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT" /tmp/zo2path
ln -sfn "$PWD/kernels" /tmp/zo2path/zo2_kernels
ln -sfn "$PWD/launcher" /tmp/zo2path/zo2_launcher
export PYTHONPATH="$PWD:/tmp/zo2path:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import zmq" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpuwheels/pyzmq-*abi3*.whl 2>&1 | grep -v "as the .root. user"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, zmq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'pyzmq', zmq.__version__)" | tee -a "$OUT/gpu.txt"

timeout 120 python3 benchmarks/parallel.py --calibrate benchmarks/results/2026-11-26-h200/offload.json \
    --out "$OUT/parallel.json" > "$OUT/parallel.log" 2>&1; echo "parallel: exit $?" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_offload_gpu.py tests/unit/test_kernels.py \
    -k "gpu or engine or cuda" > "$OUT/gpu_tests.log" 2>&1; tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/integration/test_control.py \
    -k "one_worker or mid_write_back or kill_9" > "$OUT/control_gpu.log" 2>&1; tail -n 3 "$OUT/control_gpu.log" | tee -a "$OUT/gpu.txt"
timeout 150 python3 benchmarks/kernels.py --sweep ${1:+--baseline "$1"} --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
echo "sweep: exit $?" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/kernels.py --quick --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels: exit $?" | tee -a "$OUT/gpu.txt"
tail -n 25 "$OUT/sweep.log"; tail -n 20 "$OUT/kernels.log"

#!/usr/bin/env bash
# The GPU checks of the NVMe tier (about 4 minutes on an H100/H200): tests/gpu/test_nvme_gpu.py (the tier on CUDA,
# bit for bit against the host tier and all-resident, fp32 and bf16, writeback_every 1 and 3), then
# benchmarks/bench_nvme_tier.py on 8 OPT-1.3B-shaped blocks (host tier against every block on the local disk, K = 1
# and 4). The files go to $NVME_DIR (default: a folder under /tmp). Logs and JSON under $OUT (default
# benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_nvme.sh
set -u
source benchmarks/gpu_env.sh
NVME_DIR=${NVME_DIR:-/tmp/zo2-nvme-tier}

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_nvme_gpu.py > "$OUT/nvme_gpu.log" 2>&1
tail -n 3 "$OUT/nvme_gpu.log" | tee -a "$OUT/gpu.txt"
timeout 200 python3 benchmarks/bench_nvme_tier.py --folder "$NVME_DIR" --preset opt-1.3b --layers 8 --tokens 2048 \
    --writeback 1 4 --steps 4 --warmup 2 --out "$OUT/nvme_tier.json" > "$OUT/nvme_tier.log" 2>&1
echo "bench_nvme_tier: exit $?" | tee -a "$OUT/gpu.txt"
tail -n 12 "$OUT/nvme_tier.log"

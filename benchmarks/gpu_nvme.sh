#!/usr/bin/env bash
# The GPU checks of the NVMe tier (about 6 minutes on an H100/H200): tests/gpu/test_nvme_gpu.py (the tier on CUDA,
# bit for bit against the host tier and all-resident, fp32 and bf16, writeback_every 1 and 3; one matrix at a time
# sharing the host tier's ring; a LoRA base and prompt-tuned blocks homed on NVMe, by block and by matrix; zo-adam's
# and zo-sgd-momentum's state on NVMe); the drive's write and read rates (benchmarks/bench_nvme.py, 2 × 1 GiB); then the issue's
# benchmark, benchmarks/bench_nvme_tier.py on the OPT-13B shape with a 4 GB host budget (full depth, 40 blocks =
# 25 GB, when the disk has room for both versions of every block, 56 GB; else 24 blocks): step time against the
# disk floor and the tier's read rate against dd iflag=direct over the same files, measured in the same run; then
# zo-sgd against zo-adam on NVMe (OPT-1.3B shape, 8 blocks, K = 1: Adam's moments move with the weights, 5x the
# bytes; under a minute). Files go to $NVME_DIR (default: a folder under /tmp). Logs and JSON under $OUT (default
# benchmarks/out). Runs from the repository root without installing.
#   bash benchmarks/gpu_nvme.sh
set -u
source benchmarks/gpu_env.sh
NVME_DIR=${NVME_DIR:-/tmp/zo2-nvme-tier}
mkdir -p "$NVME_DIR"

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_nvme_gpu.py > "$OUT/nvme_gpu.log" 2>&1
tail -n 3 "$OUT/nvme_gpu.log" | tee -a "$OUT/gpu.txt"
timeout 60 python3 benchmarks/bench_nvme.py --folder "$NVME_DIR/rates" --units 2 --unit-mb 1024 --queue-depth 8 \
    --block-mb 8 --rounds 1 --out "$OUT/nvme.json" > "$OUT/nvme.log" 2>&1
rm -rf "$NVME_DIR/rates"
WRITE=$(python3 -c "import json; print(next(r['gbps'] for r in json.load(open('$OUT/nvme.json'))['rows'] if r['what'].startswith('store write')))" 2>/dev/null || echo 2.0)
FREE=$(df --output=avail -B1G "$NVME_DIR" | tail -n 1 | tr -d ' ')
LAYERS=$([ "$FREE" -ge 56 ] && echo 40 || echo 24)
echo "disk: $FREE GB free, write $WRITE GB/s; OPT-13B shape with $LAYERS blocks" | tee -a "$OUT/gpu.txt"
timeout 300 python3 benchmarks/bench_nvme_tier.py --folder "$NVME_DIR/tier" --preset opt-13b --layers "$LAYERS" \
    --tokens 2048 --host-budget 4 --no-host --writeback 8 --steps 3 --warmup 1 --disk-write-gbs "$WRITE" \
    --out "$OUT/nvme_tier.json" > "$OUT/nvme_tier.log" 2>&1
echo "bench_nvme_tier: exit $?" | tee -a "$OUT/gpu.txt"
rm -rf "$NVME_DIR/tier"
timeout 120 python3 benchmarks/bench_nvme_tier.py --folder "$NVME_DIR/state" --preset opt-1.3b --layers 8 \
    --tokens 2048 --no-host --writeback 1 --optimizer zo-sgd zo-adam --steps 3 --warmup 1 \
    --disk-write-gbs "$WRITE" --out "$OUT/nvme_state.json" > "$OUT/nvme_state.log" 2>&1
echo "bench_nvme_tier --optimizer: exit $?" | tee -a "$OUT/gpu.txt"
rm -rf "$NVME_DIR"
tail -n 6 "$OUT/nvme_tier.log"
tail -n 4 "$OUT/nvme_state.log"

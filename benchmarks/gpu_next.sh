#!/usr/bin/env bash
# Every GPU measurement still owed, in one device call of about 8 minutes: the matrix streaming checks and
# benchmark (gpu_matrix_quick.sh: the ring and the paired points against block streaming at 1×2048 and 8×2048),
# then the NVMe tier's tests and benchmark (gpu_nvme.sh). Logs and JSON under $OUT.
#   bash benchmarks/gpu_next.sh
set -u
bash benchmarks/gpu_matrix_quick.sh
bash benchmarks/gpu_nvme.sh

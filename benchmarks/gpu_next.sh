#!/usr/bin/env bash
# Every GPU measurement still owed: the matrix streaming checks and benchmark (gpu_matrix_quick.sh, about 3-5
# minutes: the ring, the paired points and chunked forming against block streaming at 1×2048 and 8×2048, the ring
# without a spare slot (what the third slot buys), and writeback_every = 'auto'), then the NVMe tier's tests (the
# shared ring, a LoRA base on NVMe) and benchmark (gpu_nvme.sh, about 3-6 minutes). Together
# they can pass one device call's 10 minutes: run them as two calls,
#   bash benchmarks/gpu_matrix_quick.sh      then      bash benchmarks/gpu_nvme.sh
# or this script where a call may run longer. Logs and JSON under $OUT.
set -u
bash benchmarks/gpu_matrix_quick.sh
bash benchmarks/gpu_nvme.sh

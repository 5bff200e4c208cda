# Sourced by the GPU scripts: run from the repository root without installing zo2 (zo2_kernels and zo2_launcher
# from kernels/ and launcher/ on PYTHONPATH), pyzmq from .gpuwheels/ when the machine lacks it (fill it beforehand with `pip download pyzmq
# --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 312 -d .gpuwheels`), and the
# machine's description in $OUT/gpu.txt.
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels:$PWD/launcher:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import zmq" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpuwheels/pyzmq-*abi3*.whl 2>&1 \
    | grep -v "as the .root. user"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, zmq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'pyzmq', zmq.__version__)" | tee -a "$OUT/gpu.txt"

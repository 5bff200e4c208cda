"""Read and write rates of the NVMe store (``zo2/offload/nvme.py``) against a raw O_DIRECT read of the same files
by ``dd iflag=direct``, measured side by side in one run.

Creates a store of ``--units`` units of ``--unit-mb`` MB each under ``--folder`` (both versions preallocated, so
the disk needs twice the data), writes every unit once (the write rate: data, fsync and marker switch), then reads
every unit into page-aligned (pinned where CUDA exists) staging buffers with each engine and queue depth asked
for, and finally with ``dd if=<file> of=/dev/null bs=<block> iflag=direct`` over the same files. Rounds are
interleaved (store read, dd, store read, ...) so a change in the disk's state hits all alike; the median is
reported. Prints a table and writes JSON. The files are removed at the end.

    python benchmarks/bench_nvme.py --folder /tmp/zo2-nvme --units 8 --unit-mb 512
    python benchmarks/bench_nvme.py --queue-depth 4 8 16 --block-mb 1 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_common import environment, print_table, write_json  # noqa: E402
from zo2.offload.nvme import NvmeStore  # noqa: E402
from zo2.offload.nvme_io import ThreadPoolEngine, open_engine  # noqa: E402


def read_all(store: NvmeStore, buffers: list[torch.Tensor]) -> float:
    """Seconds to read every unit, all requests queued before the first wait."""
    start = time.perf_counter()
    for k, buf in enumerate(buffers):
        store.engine.submit_read(store.path(k, store.current(k)), 0, buf)
    store.engine.wait()
    return time.perf_counter() - start


def dd_all(store: NvmeStore, block_mb: int) -> float | None:
    start = time.perf_counter()
    for k in range(len(store)):
        done = subprocess.run(["dd", f"if={store.path(k, store.current(k))}", "of=/dev/null", f"bs={block_mb}M",
                               "iflag=direct"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"dd iflag=direct failed: {done.stderr.strip()}")
            return None
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where the store's files go (default: a temp folder)")
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--unit-mb", type=int, default=512)
    parser.add_argument("--queue-depth", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--block-mb", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--engine", choices=["auto", "aio", "threads"], default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/nvme.json")
    args = parser.parse_args(argv)

    folder = Path(args.folder or tempfile.mkdtemp(prefix="zo2-nvme-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    numel = args.unit_mb * (1 << 20) // 2
    gb = args.units * numel * 2 / 1e9
    rows: list[dict] = []
    try:
        store = NvmeStore.from_numels(folder, [numel] * args.units, torch.bfloat16,
                                      engine=ThreadPoolEngine(queue_depth=8, block_size=8 << 20))
        buffers = [store.staging(k) for k in range(args.units)]
        for buf in buffers:
            buf.view(torch.uint8).random_(0, 255)
        start = time.perf_counter()
        for k, buf in enumerate(buffers):
            store.write(k, buf, step=0)
        write_s = time.perf_counter() - start
        rows.append({"what": "store write (data+fsync+marker)", "gb": gb, "s": write_s, "gbps": gb / write_s,
                     "vs_dd": None})
        engines = []
        for qd in args.queue_depth:
            for block in args.block_mb:
                engines.append((f"{args.engine} qd={qd} block={block}M",
                                open_engine(args.engine, queue_depth=qd, block_size=block << 20)))
        times: dict[str, list[float]] = {name: [] for name, _ in engines}
        dd_times: list[float] = []
        for _ in range(args.rounds):
            for name, engine in engines:
                store.engine = engine
                times[name].append(read_all(store, buffers))
            dd = dd_all(store, max(args.block_mb))
            if dd is not None:
                dd_times.append(dd)
        dd_s = statistics.median(dd_times) if dd_times else None
        if dd_s:
            rows.append({"what": f"dd iflag=direct bs={max(args.block_mb)}M", "gb": gb, "s": dd_s,
                         "gbps": gb / dd_s, "vs_dd": 1.0})
        for name, _ in engines:
            s = statistics.median(times[name])
            rows.append({"what": f"store read, {name}", "gb": gb, "s": s, "gbps": gb / s,
                         "vs_dd": (dd_s / s) if dd_s else None})
        for _, engine in engines:
            if hasattr(engine, "close"):
                engine.close()
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, [("what", "what", ""), ("gb", "GB", ".2f"), ("s", "s", ".3f"),
                       ("gbps", "GB/s", ".2f"), ("vs_dd", "rate / dd's", ".3f")])
    write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step time of the NVMe tier against the host tier: the same OPT-shaped model (built on the meta device, seeded
init), every block streamed, homed once in pinned host memory and once on NVMe (``offload.nvme_path``), for each
``optim.writeback_every`` asked for.

Per configuration: median step time over ``--steps`` after ``--warmup``, the disk bytes read and written per step,
the disk rate they imply, and the step's floor on that disk (the slower of reading every NVMe-homed block and
writing 1/K of them, at the rates ``bench_nvme.py`` measures, given with ``--disk-read-gbs`` / ``--disk-write-gbs``
when known). Prints a table and writes JSON. The store's files are removed at the end.

    python benchmarks/bench_nvme_tier.py --folder /mnt/nvme/zo2 --preset opt-6.7b --layers 8 --writeback 1 4 16
    python benchmarks/bench_nvme_tier.py --hidden 1024 --layers 8 --steps 3            # a quick CPU run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_common import environment, opt_config, print_table, write_json  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.config.offload import OffloadConfig  # noqa: E402
from zo2.offload.loading import empty_model, init_random  # noqa: E402

COLUMNS = [("tier", "tier", ""), ("k", "K", "d"), ("step_s", "step s", ".3f"), ("read_gb", "read GB/step", ".2f"),
           ("written_gb", "written GB/step", ".2f"), ("disk_gbps", "disk GB/s", ".2f"),
           ("floor_s", "disk floor s", ".3f")]


def run(args: argparse.Namespace, folder: Path | None, k: int) -> dict:
    """One configuration: build, fill, warm up, time."""
    overrides = {"hidden_size": args.hidden, "ffn_size": 4 * args.hidden} if args.hidden else {}
    model = empty_model(opt_config(args.preset, args.layers, **overrides), dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ZOConfig(offload=True, device=device, writeback_every=k, lr=1e-6, seed=0)
    tiers = _every_block_on_nvme(folder, model, cfg, args.engine) if folder is not None else None
    engine = ZOEngine(model, cfg, offload_config=tiers)
    init_random(engine, seed=0)
    batch = {"input_ids": torch.randint(3, 1000, (1, args.tokens)), "labels": torch.randint(3, 1000, (1, args.tokens))}
    times, read, written = [], [], []
    for s in range(args.warmup + args.steps):
        start = time.perf_counter()
        engine.step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if s >= args.warmup:
            times.append(time.perf_counter() - start)
            read.append(engine.last_transfer.bytes_disk_read)
            written.append(engine.last_transfer.bytes_disk_written)
    engine.flush()
    step = statistics.median(times)
    r, w = sum(read) / len(read) / 1e9, sum(written) / len(written) / 1e9
    floor = max(r / args.disk_read_gbs, w / args.disk_write_gbs) if args.disk_read_gbs and args.disk_write_gbs \
        else None
    return {"tier": "nvme" if folder is not None else "host", "k": k, "step_s": step, "read_gb": r,
            "written_gb": w, "disk_gbps": (r + w) / step if folder is not None else None, "floor_s": floor,
            "plan": engine.plan.to_dict()}


def _every_block_on_nvme(folder: Path, model, cfg: ZOConfig, engine: str) -> OffloadConfig:
    """A host budget of exactly the staging buffers: every streamed block then goes to NVMe."""
    from zo2.offload.nvme import round_up
    from zo2.offload.tiers import staging_buffers

    block = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.decoder.layers)
    return OffloadConfig(nvme_path=str(folder), host_memory_budget=staging_buffers(cfg.prefetch) * round_up(block),
                         nvme_engine=engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="the NVMe tier's folder (default: a temp folder)")
    parser.add_argument("--preset", default="opt-1.3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None, help="a smaller width than the preset's")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--writeback", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--engine", choices=["auto", "aio", "threads"], default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--disk-read-gbs", type=float, default=None)
    parser.add_argument("--disk-write-gbs", type=float, default=None)
    parser.add_argument("--out", default="benchmarks/out/nvme_tier.json")
    args = parser.parse_args(argv)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="zo2-nvme-tier-"))
    rows = []
    try:
        for k in args.writeback:
            rows.append(run(args, None, k))
            shutil.rmtree(folder, ignore_errors=True)
            rows.append(run(args, folder, k))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, COLUMNS)
    write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step time of the NVMe tier against the host tier: the same OPT-shaped model (built on the meta device, seeded
init), every block streamed, homed once in pinned host memory and once on NVMe (``offload.nvme_path``), for each
``optim.writeback_every`` and optimizer asked for (``--optimizer zo-sgd zo-adam``: a stateful optimizer's state of the
NVMe-homed blocks lives in files beside their weights and moves with them; K = 1 only).

Per configuration: median step time over ``--steps`` after ``--warmup``, the disk bytes read and written per step,
the read rate through the tier (bytes read per step / step time), and, measured in the same run right after the
tier's steps, ``dd if=<file> of=/dev/null iflag=direct`` over the same files: the raw O_DIRECT read rate. The
step's floor on that disk is the bytes read per step at dd's rate plus the bytes written at ``--disk-write-gbs``
(when given; ``bench_nvme.py`` measures it). ``--host-budget`` (GB) keeps the blocks that fit in pinned host memory
and the rest on NVMe (default: only the staging buffers, every block on NVMe); ``--no-host`` skips the host-tier
rows (a model larger than the machine's RAM). Prints a table and writes JSON. The store's files are removed at
the end.

    python benchmarks/bench_nvme_tier.py --folder /mnt/nvme/zo2 --preset opt-13b --layers 40 --host-budget 4 \
        --writeback 8 --no-host                                    # a model several times the host budget
    python benchmarks/bench_nvme_tier.py --folder /mnt/nvme/zo2 --preset opt-6.7b --layers 8 --writeback 1 4 16
    python benchmarks/bench_nvme_tier.py --hidden 1024 --layers 8 --steps 3            # a quick CPU run
    python benchmarks/bench_nvme_tier.py --hidden 512 --layers 4 --writeback 1 --optimizer zo-sgd zo-adam
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
from bench_nvme import dd_all  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.config.offload import OffloadConfig  # noqa: E402
from zo2.offload.loading import empty_model, init_random  # noqa: E402
from zo2.offload.tiered import NvmeResidence  # noqa: E402

COLUMNS = [("tier", "tier", ""), ("optimizer", "optimizer", ""), ("k", "K", "d"), ("step_s", "step s", ".3f"), ("read_gb", "read GB/step", ".2f"),
           ("written_gb", "written GB/step", ".2f"), ("read_gbps", "tier read GB/s", ".2f"),
           ("dd_gbps", "dd GB/s", ".2f"), ("vs_dd", "tier/dd", ".3f"), ("floor_s", "disk floor s", ".3f"),
           ("vs_floor", "step/floor", ".3f")]


def run(args: argparse.Namespace, folder: Path | None, k: int, optimizer: str = "zo-sgd") -> dict:
    """One configuration: build, fill, warm up, time."""
    overrides = {"hidden_size": args.hidden, "ffn_size": 4 * args.hidden} if args.hidden else {}
    model = empty_model(opt_config(args.preset, args.layers, **overrides), dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ZOConfig(offload=True, device=device, writeback_every=k, lr=1e-6, seed=0, optimizer=optimizer)
    tiers = _tiers(folder, model, cfg, args) if folder is not None else None
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
    row = {"tier": "nvme" if folder is not None else "host", "optimizer": optimizer, "k": k, "step_s": step, "read_gb": r, "written_gb": w,
           "plan": engine.plan.to_dict()}
    if folder is not None:
        store = next((res.store for res in engine.residences if isinstance(res, NvmeResidence)), None)
        if store is None:
            raise SystemExit(f"--host-budget {args.host_budget} GB holds every block: nothing is homed on NVMe.")
        dd_s = dd_all(store, 8)
        dd_gbps = sum(store.data_bytes(i) for i in range(len(store))) / 1e9 / dd_s if dd_s else None
        floor = r / dd_gbps + (w / args.disk_write_gbs if args.disk_write_gbs else 0.0) if dd_gbps else None
        row.update(read_gbps=r / step, dd_gbps=dd_gbps, vs_dd=r / step / dd_gbps if dd_gbps else None,
                   floor_s=floor, vs_floor=step / floor if floor else None)
    return row


def _tiers(folder: Path, model, cfg: ZOConfig, args: argparse.Namespace) -> OffloadConfig:
    """``--host-budget`` GB, or a host budget of exactly the staging buffers (of a block's weights and optimizer
    state): every streamed block on NVMe."""
    from zo2.offload.nvme import round_up
    from zo2.offload.tiers import staging_buffers
    from zo2.optim.optimizers import build_optimizer

    opt = build_optimizer(cfg)
    block = max(sum(p.numel() * (p.element_size() + opt.state_bytes(p.dtype)) for p in layer.parameters())
                for layer in model.model.decoder.layers)
    budget = int(args.host_budget * 1e9) if args.host_budget else staging_buffers(cfg.prefetch) * round_up(block)
    return OffloadConfig(nvme_path=str(folder), host_memory_budget=budget, nvme_engine=args.engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="the NVMe tier's folder (default: a temp folder)")
    parser.add_argument("--preset", default="opt-1.3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None, help="a smaller width than the preset's")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--writeback", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--engine", choices=["auto", "aio", "threads"], default="auto")
    parser.add_argument("--optimizer", nargs="+", default=["zo-sgd"],
                        help="zo-sgd, zo-adam, zo-sgd-momentum, ... (stateful ones only at K = 1)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--host-budget", type=float, default=None,
                        help="GB of pinned host memory for the streamed blocks (default: the staging buffers only)")
    parser.add_argument("--no-host", action="store_true", help="skip the host-tier rows")
    parser.add_argument("--disk-write-gbs", type=float, default=None,
                        help="the drive's write rate (bench_nvme.py), for the floor's write-backs")
    parser.add_argument("--out", default="benchmarks/out/nvme_tier.json")
    args = parser.parse_args(argv)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="zo2-nvme-tier-"))
    rows = []
    try:
        for optimizer in args.optimizer:
            for k in args.writeback:
                if k > 1 and optimizer in ("zo-adam", "zo-sgd-momentum"):
                    continue  # a stateful optimizer writes back every step
                if not args.no_host:
                    rows.append(run(args, None, k, optimizer))
                shutil.rmtree(folder, ignore_errors=True)
                rows.append(run(args, folder, k, optimizer))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, COLUMNS)
    write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Bytes each process moves per step, one matrix at a time from the NVMe tier: one process against a node's
several (sliced transfers, perturbation parallelism), measured in one run on the CPU (gloo).

Each process of a node reads, uploads and writes back its share of every matrix (zo2.offload.nvme_slices, cut by
piece), so its disk and host→device bytes are 1/N of one process's (each file rounded up to a 4 KiB page); the
losses are the same. Prints a table and writes JSON.

    python benchmarks/bench_nvme_slices.py [--layers 8] [--hidden 64] [--processes 1 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_common import environment, opt_config, write_json  # noqa: E402


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(4, 200, (2, 32), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _run(rank: int, world: int, port: int, args: argparse.Namespace, folder: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    from zo2 import ZOEngine
    from zo2.config.offload import OffloadConfig
    from zo2.config.zo import ZOConfig
    from zo2.parallel.mesh import ParallelDims, ZOComm

    torch.set_num_threads(1)
    comm = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        comm = ZOComm(ParallelDims(1, world), rank)
    config = opt_config("opt-125m", args.layers, hidden_size=args.hidden, ffn_size=4 * args.hidden, num_heads=4,
                        vocab_size=256, max_positions=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    block = sum(p.numel() * p.element_size() for p in model.model.decoder.layers[0].parameters())
    tiers = OffloadConfig(nvme_path=folder, host_memory_budget=5 * block, nvme_engine="threads")
    engine = ZOEngine(model, ZOConfig(offload=True, stream_granularity="matrix"), comm=comm, offload_config=tiers)
    rows = []
    for step in range(args.steps):
        result = engine.step(_batch(step))
        moved = engine.last_transfer
        rows.append({"step": step, "loss": result.loss, "disk_read": moved.bytes_disk_read,
                     "disk_written": moved.bytes_disk_written, "h2d": moved.bytes_h2d, "d2h": moved.bytes_d2h})
    nvme = len(engine.plan.nvme)
    engine.close()
    torch.save({"rows": rows, "nvme_blocks": nvme, "block_bytes": block}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/out/nvme_slices.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.processes:
            out = f"{tmp}/rank-{world}"
            ctx = mp.get_context("spawn")
            port = _free_port()
            procs = [ctx.Process(target=_run, args=(r, world, port, args, f"{tmp}/nvme-{world}", out))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=600)
                if p.exitcode != 0:
                    raise SystemExit(f"a process of the {world}-process run failed (exit {p.exitcode})")
            for rank in range(world):
                got = torch.load(f"{out}.{rank}")
                last = got["rows"][-1]  # the pass order and the staging are settled by then
                rows.append({"processes": world, "rank": rank, "nvme_blocks": got["nvme_blocks"],
                             "block_bytes": got["block_bytes"], **{k: last[k] for k in
                                                                   ("disk_read", "disk_written", "h2d", "d2h", "loss")}})
    print(f"{'processes':>9} {'rank':>4} {'NVMe blocks':>11} {'disk read/step':>15} {'disk written':>13} "
          f"{'host→device':>12} {'loss':>10}")
    for r in rows:
        print(f"{r['processes']:>9} {r['rank']:>4} {r['nvme_blocks']:>11} {r['disk_read']:>15,} "
              f"{r['disk_written']:>13,} {r['h2d']:>12,} {r['loss']:>10.6f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

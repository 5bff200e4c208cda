"""zo2's CPU step against the ``mezo`` package's step and two plain forwards, measured interleaved in one run.

Four contenders on the same model shape, weights and batch (fp32, batch 4x64 by default, torch's thread count
set by ``--threads``), each on its own copy of the model, timed round by round so that a change in the
machine's load hits them all alike:

* ``2 fwd``: two Hugging Face forwards under ``torch.no_grad()`` (the floor of any MeZO step);
* ``mezo``: ``mezo.update`` from the ``mezo`` package on PyPI (0.0.1: θ += εz, θ -= 2εz, θ += εz with
  ``torch.randn`` from a seeded generator, then the update drawing z again: four passes over the weights);
* ``zo2``: ``ZOEngine.step`` with offload off, and with offload on (blocks kept in the parameter store).

``mezo`` is a benchmark-only dependency, not one of zo2's: install it with ``pip install --no-deps mezo`` (its
declared dependencies would pull an old ``datasets`` that downgrades transformers and huggingface-hub). Without
it the ``mezo`` column is left empty. Prints a table (median of ``--repeat`` rounds) and writes JSON.

    python benchmarks/bench_cpu_peer.py                          # tiny and opt-125m shapes, 2 threads
    python benchmarks/bench_cpu_peer.py --shapes opt-125m --repeat 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_common import environment, print_table, write_json  # noqa: E402
from bench_step import build  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402

try:
    import mezo
except ImportError:  # benchmark-only dependency
    mezo = None

CONTENDERS = ("two_forwards", "mezo", "zo2_offload_off", "zo2_offload_on")


def _loss(model, data) -> torch.Tensor:
    return model(**data).loss


def contenders(shape: str, batch: int, seq: int) -> dict:
    """name -> a callable doing one step (or two forwards), each on its own copy of one randomly built model."""
    torch.manual_seed(0)
    base = build(shape, torch.float32, "cpu")
    ids = torch.randint(3, 50272, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    fns = {}

    @torch.no_grad()
    def two_forwards():
        base(**data).loss.item()
        base(**data).loss.item()

    fns["two_forwards"] = two_forwards
    if mezo is not None:
        peer = copy.deepcopy(base)
        step = iter(range(1 << 30))
        fns["mezo"] = lambda: float(mezo.update(peer, data, _loss, 1e-3, 1e-6, next(step)))
    for offload in (False, True):
        engine = ZOEngine(copy.deepcopy(base), ZOConfig(lr=1e-6, eps=1e-3, offload=offload, device="cpu"))
        fns[f"zo2_offload_{'on' if offload else 'off'}"] = lambda engine=engine: engine.step(data)
    params = sum(p.numel() for p in base.parameters())
    return {"fns": fns, "params_M": params / 1e6}


def measure(shape: str, batch: int, seq: int, repeat: int) -> dict:
    made = contenders(shape, batch, seq)
    fns = made["fns"]
    for fn in fns.values():  # warm-up: first-use builds, allocations, the deferred update's first step
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"shape": shape, "params_M": made["params_M"], "batch": f"{batch}x{seq}", "threads": torch.get_num_threads()}
    for name in CONTENDERS:
        row[f"{name}_s"] = med.get(name)
    fwd, peer = med["two_forwards"], med.get("mezo")
    for name in ("zo2_offload_off", "zo2_offload_on"):
        row[f"{name}_vs_fwd"] = med[name] / fwd
        row[f"{name}_vs_mezo"] = med[name] / peer if peer else None
    row["mezo_vs_fwd"] = peer / fwd if peer else None
    row["all_s"] = {name: ts for name, ts in times.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["tiny", "opt-125m"])
    parser.add_argument("--batch", default="4x64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/out/cpu_peer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if mezo is None:
        print("the mezo package is not installed (pip install --no-deps mezo): its column stays empty")
    batch, seq = (int(v) for v in args.batch.split("x"))
    rows = []
    for shape in args.shapes:
        rows.append(measure(shape, batch, seq, args.repeat))
        print({k: v for k, v in rows[-1].items() if k != "all_s"}, flush=True)
    print()
    print_table(rows, [("shape", "shape", "s"), ("params_M", "params (M)", ".0f"), ("batch", "batch", "s"),
                       ("threads", "threads", "d"), ("two_forwards_s", "2 fwd (s)", ".3f"),
                       ("mezo_s", "mezo (s)", ".3f"), ("zo2_offload_off_s", "zo2 (s)", ".3f"),
                       ("zo2_offload_on_s", "zo2 offload (s)", ".3f"), ("zo2_offload_off_vs_mezo", "zo2/mezo", ".2f"),
                       ("zo2_offload_on_vs_mezo", "zo2 offl./mezo", ".2f"), ("zo2_offload_off_vs_fwd", "zo2/2fwd", ".2f"),
                       ("mezo_vs_fwd", "mezo/2fwd", ".2f")])
    write_json(args.out, {"benchmark": "cpu_peer", "env": environment(), "rows": rows})


if __name__ == "__main__":
    main()

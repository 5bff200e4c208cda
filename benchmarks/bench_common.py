"""Shared pieces of the benchmark scripts: timing, environment record, JSON output, OPT preset shapes."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from zo2.offload.cuda_time import cuda_timed  # noqa: F401  (the benchmarks' CUDA timer)

def opt_shapes() -> list[str]:
    """The OPT presets (the published shapes), e.g. 'opt-1.3b' .. 'opt-175b'."""
    from zo2.config.presets import preset_names

    return [n for n in preset_names() if n.startswith("opt-")]


def opt_config(name: str, layers: int | None = None, **overrides):
    """The transformers config of the OPT preset ``name`` (sdpa attention, dropout off), optionally with
    ``layers`` blocks and other ModelConfig fields changed (e.g. hidden_size for a small shape)."""
    from dataclasses import replace

    from zo2.config.presets import get_preset
    from zo2.train.model import hf_config

    m = get_preset(name).model
    m = replace(m, **{"num_layers": layers or m.num_layers, **overrides})
    cfg = hf_config(m)
    cfg._attn_implementation = "sdpa"
    return cfg


def environment() -> dict:
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "host": platform.node()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return env


def timed(fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> float:
    """Median wall time of ``fn`` in seconds (synchronizing CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))

"""Shared pieces of the benchmark scripts: timing, environment record, JSON output, OPT shapes."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

# The published OPT shapes: hidden size, FFN size, heads, layers.
OPT_SHAPES = {
    "opt-1.3b": (2048, 8192, 32, 24),
    "opt-6.7b": (4096, 16384, 32, 32),
    "opt-13b": (5120, 20480, 40, 40),
    "opt-30b": (7168, 28672, 56, 48),
    "opt-66b": (9216, 36864, 72, 64),
    "opt-175b": (12288, 49152, 96, 96),
}


def opt_config(name: str, layers: int | None = None, vocab: int = 50272, max_positions: int = 2048):
    from transformers import OPTConfig

    d, ffn, heads, n = OPT_SHAPES[name]
    cfg = OPTConfig(vocab_size=vocab, hidden_size=d, ffn_dim=ffn, num_attention_heads=heads,
                    num_hidden_layers=layers or n, max_position_embeddings=max_positions, word_embed_proj_dim=d,
                    dropout=0.0, attention_dropout=0.0)
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


def cuda_timed(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median time of ``fn`` on the current CUDA stream in seconds, measured with events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
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

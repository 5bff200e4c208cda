"""Metrics: per-interval numbers (tokens/s, mean loss, skipped steps), their backends and the loss plot.

* :class:`MetricsWindow` accumulates the steps since the last log line and turns them into one record of
  ``metrics.jsonl`` (step, loss, loss_plus, loss_minus, projected_grad, lr, loss_avg, tokens_per_s, time,
  skipped).
* :class:`JsonlWriter` appends those records to ``metrics.jsonl`` (and can cut it back on resume).
* :class:`Console` shows progress: a tqdm bar with the smoothed loss and tokens/s, or with ``quiet`` plain log
  lines every ``log_every`` steps.
* :func:`plot_loss` draws ``loss.png`` from the trajectory log (matplotlib, without touching pyplot's global
  backend).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

import torch

from zo2.errors import CheckpointError, write_failure

TRANSFER_ZERO = {"h2d_gb": 0.0, "d2h_gb": 0.0, "disk_read_gb": 0.0, "disk_written_gb": 0.0, "transfer_wait_s": 0.0,
                 "step_s": 0.0, "peak_device_gib": 0.0, "replays": 0}


@dataclass
class MetricsWindow:
    """The steps since the last log line: sums for averages and rates, and run-wide counters."""

    skipped_total: int = 0
    """NaN/inf steps since the start of the run (not only this window)."""
    time_offset: float = 0.0
    """Seconds of training before this process started (a resumed run continues the clock)."""
    started: float = field(default_factory=time.perf_counter)
    _losses: list[float] = field(default_factory=list)
    _tokens: int = 0
    _window_start: float = field(default_factory=time.perf_counter)
    _transfer: dict = field(default_factory=lambda: dict(TRANSFER_ZERO))

    def add(self, loss: float, skipped: bool, tokens: int = 0) -> None:
        """Count one step (a skipped step's NaN loss is left out of the mean)."""
        if skipped:
            self.skipped_total += 1
        elif math.isfinite(loss):
            self._losses.append(loss)
        self._tokens += tokens

    def add_transfer(self, result: Any) -> None:
        """Count a step's host↔device traffic, upload wait, step time and peak device memory."""
        t = self._transfer
        t["h2d_gb"] += getattr(result, "bytes_h2d", 0) / 1e9
        t["d2h_gb"] += getattr(result, "bytes_d2h", 0) / 1e9
        t["disk_read_gb"] += getattr(result, "bytes_disk_read", 0) / 1e9
        t["disk_written_gb"] += getattr(result, "bytes_disk_written", 0) / 1e9
        t["transfer_wait_s"] += getattr(result, "transfer_wait_ms", 0.0) / 1e3
        t["step_s"] += getattr(result, "seconds", 0.0)
        t["peak_device_gib"] = max(t["peak_device_gib"], getattr(result, "peak_device_bytes", 0) / 1024 ** 3)
        t["replays"] += getattr(result, "replays", 0)

    def transfer_summary(self) -> str:
        """'H2D 1.2 GB/s, wait 35%, peak 10.2 GiB' for the progress bar ('' when nothing streams)."""
        t = self._transfer
        if not t["h2d_gb"] and not t["peak_device_gib"]:
            return ""
        parts = []
        if t["h2d_gb"]:
            parts.append(f"H2D {t['h2d_gb'] / max(t['step_s'], 1e-9):.1f} GB/s")
            if t["disk_read_gb"]:
                parts.append(f"NVMe read {t['disk_read_gb'] / max(t['step_s'], 1e-9):.1f} GB/s")
            parts.append(f"wait {100 * t['transfer_wait_s'] / max(t['step_s'], 1e-9):.0f}%")
        if t["peak_device_gib"]:
            parts.append(f"peak {t['peak_device_gib']:.1f} GiB")
        return ", ".join(parts)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.time_offset + time.perf_counter() - self.started

    def tokens_per_s(self) -> float:
        """Tokens per second since the window started."""
        return self._tokens / max(time.perf_counter() - self._window_start, 1e-9)

    def record(self, result: Any, step: int) -> dict[str, Any]:
        """The metrics line of ``result`` (``step``: steps done, its 0-based index + 1), then a new window."""
        line = {
            "kind": "train", "step": step, "loss": result.loss, "loss_plus": result.loss_plus,
            "loss_minus": result.loss_minus, "projected_grad": result.projected_grad, "lr": result.lr,
            "loss_avg": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "tokens_per_s": self.tokens_per_s(), "time": self.elapsed(), "skipped": self.skipped_total,
            # since the last line: bytes moved each way, time waiting on uploads vs computing, peak memory
            "h2d_gb": self._transfer["h2d_gb"], "d2h_gb": self._transfer["d2h_gb"],
            # read from and written to the NVMe tier's files (offload.nvme_path)
            "disk_read_gb": self._transfer["disk_read_gb"], "disk_written_gb": self._transfer["disk_written_gb"],
            "transfer_wait_s": self._transfer["transfer_wait_s"],
            "compute_s": max(self._transfer["step_s"] - self._transfer["transfer_wait_s"], 0.0),
            "peak_device_gib": self._transfer["peak_device_gib"],
            # logged updates replayed on uploaded blocks whose host copy lagged (optim.writeback_every > 1)
            "replays": self._transfer["replays"],
        }
        self._losses, self._tokens, self._window_start = [], 0, time.perf_counter()
        self._transfer = dict(TRANSFER_ZERO)
        return line


class JsonlWriter:
    """Append-only JSON-lines file (one record per line, flushed at once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        try:
            self._file.write(json.dumps(dict(record)) + "\n")
            self._file.flush()
        except OSError as exc:
            raise CheckpointError(write_failure(self.path, exc, f"writing {self.path.name}",
                                                "The trajectory log and snapshots are")) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a full disk: the lines already written stay; the log, not this file, is what a resume needs


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete record of a JSON-lines file (a torn last line is ignored)."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_jsonl(path: str | Path, steps_done: int) -> list[dict]:
    """Keep only the records with ``step <= steps_done`` (a resumed run rewrites what follows); return them."""
    p = Path(path)
    kept = [r for r in read_jsonl(p) if r.get("step", 0) <= steps_done]
    p.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


class NullWriter:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Console:
    """Progress on the terminal: a tqdm bar (smoothed loss, tokens/s), or plain lines with ``quiet``. Bar, log lines
    and warnings all go to one stream, stderr by default (stdout stays free for what a command prints as its
    result, such as zo2 eval's JSON line)."""

    def __init__(self, total: int, initial: int = 0, quiet: bool = False, stream: TextIO | None = None,
                 silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # ranks other than 0 print nothing
        self.total = total
        self.stream = stream or sys.stderr
        self.smoothed: float | None = None
        self._bar = None
        if not self.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream,
                             desc="train")

    def log(self, message: str) -> None:
        """One message line, printed above the bar when there is one."""
        if self.silent:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def step(self, loss: float, tokens_per_s: float, extra: str = "") -> None:
        """Advance the bar by one step and show the smoothed loss (exponential moving average, 0.9)."""
        if math.isfinite(loss):
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self._bar is not None:
            shown = f"{self.smoothed:.4f}" if self.smoothed is not None else "nan"
            tail = f", {extra}" if extra else ""
            self._bar.set_postfix_str(f"loss {shown}, {tokens_per_s:,.0f} tok/s{tail}", refresh=False)
            self._bar.update(1)

    def metrics(self, line: Mapping[str, Any]) -> None:
        """With ``quiet``, the log line of a metrics record."""
        if self.quiet:
            self.log(format_metrics(line, self.total))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_metrics(line: Mapping[str, Any], total: int) -> str:
    """``step 10/400 | loss 5.4321 (avg 5.5000) | g -1.2e+00 | lr 5.0e-03 | 1,234 tok/s | skipped 0 | 12.3s``."""
    return (f"step {line['step']}/{total} | loss {line['loss']:.4f} (avg {line['loss_avg']:.4f}) | "
            f"g {line['projected_grad']:+.3e} | lr {line['lr']:.2e} | {line['tokens_per_s']:,.0f} tok/s | "
            f"skipped {line['skipped']} | {line['time']:.1f}s"
            + (f" | H2D {line['h2d_gb']:.2f} GB, D2H {line['d2h_gb']:.2f} GB, wait {line['transfer_wait_s']:.2f}s"
               if line.get("h2d_gb") else "")
            + (f" | NVMe read {line['disk_read_gb']:.2f} GB, written {line['disk_written_gb']:.2f} GB"
               if line.get("disk_read_gb") or line.get("disk_written_gb") else "")
            + (f" | peak {line['peak_device_gib']:.2f} GiB" if line.get("peak_device_gib") else ""))


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated/reserved GiB on a CUDA device since the last reset (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    gib = 1024 ** 3
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (NaNs skipped)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        recent = kept[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_loss(records: Iterable[Mapping[str, Any]], evals: Iterable[Mapping[str, Any]], path: str | Path,
              title: str = "") -> Path:
    """``loss.png``: per-step training loss, its moving average, and evaluation losses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    steps = [r["step"] for r in records]
    losses = [float(r["loss"]) for r in records]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss (per step)")
    window = max(len(records) // 20, 1)
    ax.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=1.8,
            label=f"loss (mean of {window} steps)")
    evals = list(evals)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:orange",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)

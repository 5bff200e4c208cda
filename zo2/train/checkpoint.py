"""Checkpoints (DESIGN.md §5): an append-only trajectory log, atomic safetensors snapshots, and replay.

The bytes of a log line are :mod:`zo2.train.log_format`'s; the safetensors writer, tensor CRCs and fsync are
:mod:`zo2.train.durable`'s.

Conventions the trainer follows (nothing here enforces more than the step numbering):

* **Log:** one record per step ``t``, appended once the step's update is known (:func:`make_record`):
  the :class:`~zo2.optim.estimators.Update` fields (step, seeds, coeffs, lr), ``data`` = the loader's
  ``position()`` *after* drawing step t's batch, ``loss``, ``projected_grad`` and ``skipped`` (a step whose
  update was not applied, e.g. a non-finite loss). Steps are consecutive.
* **Snapshot at step S:** the parameters after the updates of steps ``< S`` (flush a deferred update first),
  with the caller's meta, e.g. ``{"data": position, "log_records": n}``. With a stateful optimizer
  (zo-sgd-momentum, zo-adam) ``ZOEngine.trainable_state()`` also holds its state (``optimizer/...`` tensors):
  a logged step's effect depends on it, so replay starts from a snapshot's weights *and* state (or from the base
  weights with zero state) and applies the logged steps in order. A conservative step logs the update it kept
  (its lr times 1, −1 or 0).
* **Resume:** ``snap = latest_good_snapshot(run_dir)``; ``records = read_log(log)`` (opening a
  :class:`TrajectoryLog` on it repairs a torn last line); ``replay_updates(apply, records, snap.step,
  records[-1]["step"] + 1)`` on the snapshot's tensors (or the base weights with start 0 when there is no
  snapshot); ``loader.seek(records[-1]["data"])``; continue at ``records[-1]["step"] + 1``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from zo2.errors import CheckpointError, write_failure
from zo2.optim.estimators import Update
from zo2.fsync import fsync_dir, fsync_file
from zo2.offload.store import Deferred
from zo2.train.durable import SnapshotTensors, tensor_crc, tensors_checksum, write_safetensors
from zo2.train.log_format import decode_line, encode_line, jsonable

LOG_FILE = "trajectory.jsonl"
"""The trajectory log's name in a run folder."""
SNAPSHOT_DIR = "snapshots"
"""Sub-folder of a run folder that holds the snapshots."""
CORRUPT_DIR = "corrupt"
"""Unreadable snapshots are moved to ``snapshots/corrupt/``: kept for inspection, never resumed from or counted."""
LOG_KEYS = ("step", "seeds", "coeffs", "lr", "skipped")
"""Keys every trajectory-log record must have (replay needs them)."""
SNAPSHOT_FORMAT = 1
_META_KEY = "zo2"
_SNAPSHOT_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")
_TMP_MARK = ".tmp."


class CheckpointWarning(UserWarning):
    """Something was damaged but recoverable: a torn last log line, a corrupt latest snapshot."""


# ----------------------------------------------------------------------------------------------------------
# Trajectory log
# ----------------------------------------------------------------------------------------------------------

class ReadOnlyLog:
    """The trajectory log as ranks other than 0 see it: its path, to read; appends are rank 0's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def make_record(update: Update, *, data: Mapping[str, Any], loss: float, projected_grad: float,
                skipped: bool = False, **extra: Any) -> dict:
    """The log record of one step: the update's fields plus data position, loss, g and the skipped flag."""
    return {**update.to_dict(), "data": dict(data), "loss": float(loss), "projected_grad": float(projected_grad),
            "skipped": bool(skipped), **extra}


@dataclass
class _Scan:
    """What reading a log found: the good records, their byte length, and the damaged last line if any."""

    records: list[dict]
    good_bytes: int
    torn_tail: bool


def _scan_log(path: Path) -> _Scan:
    """Read and check every line; CheckpointError for damage anywhere but the last line."""
    if not path.is_file():
        raise CheckpointError(f"Trajectory log {str(path)!r} does not exist. Check the run folder, or start "
                              "a new run instead of resuming.")
    lines = path.read_bytes().splitlines(keepends=True)
    records: list[dict] = []
    good = 0
    for n, line in enumerate(lines, start=1):
        record = decode_line(line)
        if record is None:
            if n == len(lines):
                return _Scan(records, good, True)
            raise CheckpointError(
                f"Trajectory log {str(path)!r} is damaged at line {n} of {len(lines)} (a torn line or a "
                f"checksum mismatch), so the run cannot be replayed past the {_steps(records)} before it. Restore "
                "the log from a backup, or resume from a snapshot and cut the log back to the lines before "
                f"line {n}.")
        if records and record["step"] != records[-1]["step"] + 1:
            raise CheckpointError(
                f"Trajectory log {str(path)!r} jumps from step {records[-1]['step']} to step {record['step']} "
                f"at line {n}: the log is damaged or two runs wrote to it. Restore the log from a backup, or "
                "start a new run folder.")
        records.append(record)
        good += len(line)
    return _Scan(records, good, False)


def read_log(path: str | Path) -> list[dict]:
    """All records of a trajectory log, CRC-checked and with consecutive steps.

    A torn or corrupt *last* line (a crash mid-write) is dropped with a :class:`CheckpointWarning`; damage
    before it raises :class:`CheckpointError` naming the line.
    """
    p = Path(path)
    scan = _scan_log(p)
    if scan.torn_tail:
        warnings.warn(f"Trajectory log {str(p)!r}: dropped a torn last line (a crash while writing it); the log "
                      f"holds {_steps(scan.records)}.", CheckpointWarning, stacklevel=2)
    return scan.records


def repair_log(path: str | Path, *, fsync: bool = True) -> list[dict]:
    """Cut a torn last line off the log file (with a warning) and return the good records."""
    p = Path(path)
    scan = _scan_log(p)
    if scan.torn_tail:
        warnings.warn(f"Trajectory log {str(p)!r}: removed a torn last line (a crash while writing it); the log "
                      f"now holds {_steps(scan.records)}.", CheckpointWarning, stacklevel=2)
        with open(p, "r+b") as f:
            f.truncate(scan.good_bytes)
            if fsync:
                os.fsync(f.fileno())
    return scan.records


class TrajectoryLog:
    """Append-only, fsynced JSON-lines log of the steps of a run.

    Opening an existing log checks it and repairs a torn last line, so appends continue right after the
    last good record. Each :meth:`append` is one line, flushed (and fsynced when ``fsync``) before it returns.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        existed = self.path.exists()
        records = repair_log(self.path, fsync=fsync) if existed else []
        self.num_records = len(records)
        self.last_step: int | None = records[-1]["step"] if records else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if not existed and fsync:
            fsync_dir(self.path.parent)

    @property
    def next_step(self) -> int | None:
        """The step the next record must have (None: any, the log is empty)."""
        return None if self.last_step is None else self.last_step + 1

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one CRC-protected line and make it durable."""
        missing = [k for k in LOG_KEYS if k not in record]
        if missing:
            raise ValueError(f"log record lacks {missing}; build it with make_record()")
        step = record["step"]
        if not _is_int(step) or (self.last_step is not None and step != self.last_step + 1):
            raise CheckpointError(f"Trajectory log {str(self.path)!r} ends at step {self.last_step}; the next "
                                  f"record must be step {self.next_step}, not {step!r}. Resume from the end of the "
                                  "log, or start a new run folder.")
        line = encode_line(record)
        end = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._abandon(end)
            raise CheckpointError(write_failure(self.path, exc, f"appending step {step + 1} to the trajectory log",
                                                f"It holds the {self.num_records} steps before, intact")) from None
        self.last_step = step
        self.num_records += 1

    def _abandon(self, end: int) -> None:
        """After a failed append: drop the unwritten bytes and cut any partial line, so the file ends after the
        last durable record (what a resume reads)."""
        try:
            os.ftruncate(self._file.fileno(), end)
        except OSError:
            pass  # a partial last line is repaired as a torn one when the log is opened again
        raw, self._file = self._file, open(os.devnull, "ab")  # appending after a failure is refused above anyway
        try:
            raw.close()
        except OSError:
            pass  # its buffer could not be written: it is dropped, the file is consistent

    def close(self) -> None:
        """Close the file (appending after this is an error); never raises for a full disk."""
        try:
            self._file.close()
        except OSError:
            pass

    def __enter__(self) -> "TrajectoryLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Snapshots
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """A loaded, checksum-verified snapshot."""

    path: Path
    step: int
    tensors: Mapping[str, torch.Tensor]
    """Its tensors by name: a dict, or (``lazy``) a :class:`SnapshotTensors` reading each from the file when asked."""
    meta: dict


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/snapshots/step_{step:08d}.safetensors``."""
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:08d}.safetensors"


def snapshot_step(path: str | Path) -> int:
    """The step in a snapshot's file name."""
    match = _SNAPSHOT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a snapshot (step_00000100.safetensors)")
    return int(match.group(1))


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """The run's snapshot files, oldest step first (temporary files of unfinished saves excluded)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _SNAPSHOT_NAME.match(p.name)), key=snapshot_step)


def save_snapshot(run_dir: str | Path, step: int, tensors: Mapping[str, torch.Tensor | Deferred],
                  meta: Mapping[str, Any], keep_last: int = 2, fsync: bool = True,
                  check: Callable[[str, torch.Tensor], None] | None = None) -> Path:
    """Write ``tensors`` and ``meta`` atomically as the step-``step`` snapshot; keep the newest ``keep_last``.

    The file is written under a temporary name in the same folder, fsynced, renamed into place and the
    folder fsynced, so a crash leaves either the whole snapshot or none. ``meta`` must be JSON-serializable;
    it is stored, with the step and checksums, in the safetensors header. Each tensor is read once, when it is
    written (its CRC then), so :class:`~zo2.offload.store.Deferred` tensors (weights homed on NVMe) keep one of
    them in memory at a time; ``check(name, tensor)`` sees each one and may raise, which abandons the snapshot
    (the previous ones are untouched).
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not _is_int(keep_last) or keep_last < 1:
        raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")

    def metadata(crcs: dict[str, int]) -> dict[str, str]:
        header = {"format": SNAPSHOT_FORMAT, "step": step, "checksum": tensors_checksum(crcs), "crcs": crcs,
                  "meta": dict(meta)}
        return {_META_KEY: json.dumps(header, default=jsonable)}

    final = snapshot_path(run_dir, step)
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(folder)
        tmp = folder / f".{final.name}{_TMP_MARK}{os.getpid()}"
        try:
            write_safetensors(tmp, tensors, metadata, check=check)
            if fsync:
                fsync_file(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if fsync:
            fsync_dir(folder)
    except OSError as exc:
        raise CheckpointError(f"Could not write snapshot {str(final)!r}: {exc}. Free disk space or fix the run "
                              "folder's permissions; the previous snapshots are untouched.") from exc
    _prune(run_dir, keep_last)
    return final


def read_snapshot_meta(path: str | Path) -> dict:
    """The zo2 header of a snapshot (format, step, checksum, crcs, meta) without loading its tensors."""
    header, _ = _open_snapshot(Path(path), with_tensors=False)
    return header


def load_snapshot(path: str | Path, lazy: bool = False) -> tuple[Mapping[str, torch.Tensor], dict]:
    """The tensors and meta of a snapshot, after checking every tensor's CRC.

    The meta returned is the dict given to :func:`save_snapshot` with ``"step"`` set to the snapshot's step.
    ``lazy``: the tensors as a :class:`SnapshotTensors` (checked one at a time, then read again when used), so
    no more than one is in memory at once. Raises :class:`CheckpointError` for a missing, truncated or corrupt
    file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Snapshot {str(p)!r} does not exist. Pick one listed by list_snapshots(), or "
                              "resume without a snapshot.")
    header, tensors = _open_snapshot(p, with_tensors=not lazy)
    tensors = SnapshotTensors(p, _corrupt) if lazy else tensors
    _verify(p, tensors, header)
    return tensors, {**header["meta"], "step": header["step"]}


def _open_snapshot(path: Path, with_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The parsed zo2 header and (when asked) the tensors of a snapshot file; CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors and raw else {}
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise _corrupt(path, f"unreadable ({exc})") from exc
    if raw is None:
        raise _corrupt(path, "not a zo2 snapshot (no zo2 metadata)")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _corrupt(path, "its metadata is not valid JSON") from exc
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise _corrupt(path, f"unknown snapshot format {found!r}")
    return header, tensors


def check_log_covers_snapshots(run_dir: str | Path, done: int) -> None:
    """CheckpointError when a snapshot is newer than the trajectory log's end (``done`` steps): the log was deleted
    or lost records, and continuing would restart beside newer weights and log steps twice. File names only."""
    newer = [snapshot_step(p) for p in list_snapshots(run_dir) if snapshot_step(p) > done]
    if newer:
        log = Path(run_dir) / LOG_FILE
        state = "is missing" if not log.exists() or log.stat().st_size == 0 else f"holds only {done} steps"
        raise CheckpointError(f"{run_dir} holds a snapshot at step {max(newer)}, but its trajectory log {state}: "
                              "the log lost records, so the run cannot continue from it. Restore the log, or delete "
                              "the newer snapshots to resume from an older point, or start over with --overwrite.")


def latest_good_snapshot(run_dir: str | Path, at_most: int | None = None, *,
                         set_aside_corrupt: bool = False, lazy: bool = True) -> Snapshot | None:
    """The newest snapshot (at step ``at_most`` or earlier, if given) that loads and verifies; corrupt newer
    ones are skipped with a warning and, with ``set_aside_corrupt`` (a run that continues in the folder), moved to
    ``snapshots/corrupt/`` so that no later rotation counts them. ``lazy`` (the default): its tensors are read
    from the file when used (:class:`SnapshotTensors`), never all at once.

    None when there is no good snapshot: start from the base weights and replay the whole log.
    """
    for path in reversed(list_snapshots(run_dir)):
        if at_most is not None and snapshot_step(path) > at_most:
            continue
        try:
            tensors, meta = load_snapshot(path, lazy=lazy)
        except CheckpointError as exc:
            if not (set_aside_corrupt and set_aside(path, exc)):
                warnings.warn(f"Skipping snapshot {path.name}: {exc}", CheckpointWarning, stacklevel=2)
            continue
        return Snapshot(path, meta["step"], tensors, meta)
    return None


def set_aside(path: Path, why: object) -> Path | None:
    """Move an unreadable snapshot to ``snapshots/corrupt/`` (kept for inspection, out of resume and rotation) with
    a warning; None when it cannot be moved (a read-only folder): it is then only skipped."""
    dest = path.parent / CORRUPT_DIR / path.name
    try:
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
    except OSError:
        return None
    warnings.warn(f"Snapshot {path.name} is unreadable and was moved to {dest}; the run continues from an older "
                  f"snapshot or the log. ({why})", CheckpointWarning, stacklevel=3)
    return dest


def _verify(path: Path, tensors: Mapping[str, torch.Tensor], header: dict) -> None:
    """CheckpointError unless the tensors match the CRCs and checksum recorded when they were saved."""
    crcs = header.get("crcs", {})
    if set(crcs) != set(tensors):
        raise _corrupt(path, "its tensor list does not match the one recorded at save time")
    for name, t in tensors.items():
        if tensor_crc(t) != crcs[name]:
            raise _corrupt(path, f"tensor {name!r} fails its checksum")
    if tensors_checksum(crcs) != header.get("checksum"):
        raise _corrupt(path, "its checksum does not match")


def _corrupt(path: Path, why: str) -> CheckpointError:
    """The error for a damaged snapshot file."""
    return CheckpointError(f"Snapshot {str(path)!r} is corrupt: {why}. Delete it to resume from an older "
                           "snapshot (latest_good_snapshot skips it), or resume from the base weights and the "
                           "full trajectory log.")


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` snapshots that open (header and size: a cheap check that catches truncated and
    overwritten files) and delete the older ones; an unreadable snapshot is set aside, never counted, so a damaged
    file can never push the last good snapshot out of the rotation."""
    kept = 0
    for path in reversed(list_snapshots(run_dir)):
        if kept >= keep_last:
            path.unlink(missing_ok=True)
            continue
        try:
            _open_snapshot(path, with_tensors=False)
        except CheckpointError as exc:
            set_aside(path, exc)
            continue
        kept += 1


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary files left by saves that crashed."""
    for p in folder.iterdir():
        if p.name.startswith(".step_") and _TMP_MARK in p.name:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------------------

def replay_updates(apply_fn: Callable[[Update], Any], records: Iterable[Mapping[str, Any]], start_step: int,
                   stop_step: int, *, progress: bool = False) -> int:
    """Call ``apply_fn(update)`` for every non-skipped record with ``start_step <= step < stop_step``, in order.

    The records must cover every step of the range exactly once, in order (checked before anything is
    applied, so a gap leaves the parameters untouched). ``progress``: a progress bar on stderr (long replays
    take minutes). Returns how many updates were applied.
    """
    if start_step > stop_step:
        raise ValueError(f"start_step {start_step} is after stop_step {stop_step}")
    chosen = [r for r in records if start_step <= r["step"] < stop_step]
    expected = start_step
    for r in chosen:
        if r["step"] != expected:
            raise CheckpointError(f"The trajectory log does not cover steps {start_step}..{stop_step - 1}: step "
                                  f"{expected} is expected but step {r['step']} comes next. The log is incomplete "
                                  "or out of order; resume from a snapshot at or after the gap, or from a "
                                  "complete log.")
        expected += 1
    if expected != stop_step:
        raise CheckpointError(f"The trajectory log does not cover steps {start_step}..{stop_step - 1}: it stops "
                              f"before step {expected}. Resume from an older point, or replay only up to the "
                              "end of the log.")
    updates = [Update.from_dict(r) for r in chosen if not r.get("skipped", False)]
    bar = None
    if progress and updates:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(updates), unit="step", desc="replay", dynamic_ncols=True, file=sys.stderr)
    try:
        for update in updates:
            apply_fn(update)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return len(updates)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def _steps(records: list[dict]) -> str:
    """How many steps ``records`` hold, for messages: steps are counted as done (a log of N records holds steps
    1..N in the words of --to, snapshots and progress bars), never by the 0-based ``step`` field."""
    return f"{len(records)} step{'' if len(records) == 1 else 's'}"


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)

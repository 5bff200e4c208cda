"""Run folders: their file names, the checks before a run touches one, the saved config a resumed run reads
back, cutting a run back to an earlier step, and the weights written into one (``final/``, ``best/``).

What a run folder holds is described in :mod:`zo2.train.trainer`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from zo2.config.job import JobConfig
from zo2.config.loader import load_saved_config, parse_override
from zo2.errors import CheckpointError, ConfigError, NonFiniteLossError, write_failure
from zo2.models.base import is_peft_model
from zo2.train.checkpoint import LOG_FILE, list_snapshots, read_log, snapshot_step
from zo2.train.durable import write_safetensors
from zo2.train.metrics import read_jsonl
from zo2.train.tokenizer import ByteTokenizer

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
PLOT_FILE = "loss.png"
RESUME_LOCKED = ("model.", "data.", "optim.weight_decay", "optim.no_decay", "optim.sign_mode", "optim.distribution",
                 "train.eval_batches")
"""Overrides a resumed run refuses: they would change the weights replay rebuilds, or the data it continues."""


def is_run_dir(path: Path) -> bool:
    """True when ``path`` looks like a zo2 run folder (a config.toml or a trajectory log)."""
    return (path / CONFIG_FILE).is_file() or (path / LOG_FILE).is_file()


def holds_steps(run_dir: Path) -> bool:
    """True when ``run_dir`` holds trained steps (a non-empty trajectory log, or a snapshot): work a new run must
    not replace without --overwrite. A run folder whose start failed (a bad config, a broken install) holds none."""
    log = run_dir / LOG_FILE
    return (log.is_file() and log.stat().st_size > 0) or bool(list_snapshots(run_dir))


def is_stepless_run(run_dir: Path) -> bool:
    """A zo2 run folder that holds no steps: a new run may replace it without --overwrite."""
    return is_run_dir(run_dir) and not holds_steps(run_dir)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, purpose: str = "resume") -> None:
    """Refuse to touch an existing run folder unless told to resume or overwrite it (nothing is written)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"Run folder {str(run_dir)!r} is a file. Pick another folder with --out DIR.")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            fix = {"resume": ", or drop --resume to start a new run", "evaluate": ", or a Hugging Face model "
                   "folder"}.get(purpose, "")
            raise CheckpointError(f"{str(run_dir)!r} is not a zo2 run folder (it has no {CONFIG_FILE}), so there "
                                  f"is nothing to {purpose}. Pass the folder a previous `zo2 train` wrote{fix}.")
    elif used and not overwrite and not is_stepless_run(run_dir):
        raise CheckpointError(f"Run folder {str(run_dir)!r} already exists and is not empty; zo2 left it "
                              f"untouched. Continue that run with `zo2 train --resume {run_dir}`, start it over "
                              "with --overwrite (deletes its contents), or write elsewhere with --out DIR.")
    elif used and not is_run_dir(run_dir):
        raise CheckpointError(f"Refusing to --overwrite {str(run_dir)!r}: it is not a zo2 run folder (no "
                              f"{CONFIG_FILE} or {LOG_FILE}), and --overwrite deletes its contents. Pick an empty "
                              "or new folder with --out DIR.")


def check_writable(folder: Path, what: str = "The run folder") -> None:
    """ConfigError naming ``folder`` when nothing can be written there (a read-only folder or mount), before any
    work starts; a folder that does not exist yet is checked at its nearest existing parent."""
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return  # a file in the way: check_run_dir names it
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {str(folder)!r} cannot be written ({exc.strerror or exc} in {probe}). Make it "
                          "writable, or pick another folder with --out DIR.") from None


def create_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make the run folder, first deleting an old run there when ``overwrite`` or when it holds no steps (a start
    that failed before its first step: the corrected command starts the run)."""
    if run_dir.is_dir() and (overwrite or is_stepless_run(run_dir)):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_resume_config(run_dir: str | Path, overrides: Iterable[str] = (), *, purpose: str = "resume") -> JobConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied (those that would break the replay refused).
    ``purpose`` ("resume", "replay" or "evaluate") words the error for a folder that holds no run."""
    run_dir = Path(run_dir)
    overrides = list(overrides)
    for item in overrides:
        section, key, _ = parse_override(item)
        if any(f"{section}.{key}".startswith(locked) for locked in RESUME_LOCKED):
            raise ConfigError(f"--set {section}.{key} cannot change on --resume: the steps already taken depend on "
                              "it, so replay and the data order would no longer match the run. Start a new run "
                              "with that setting instead (or replay this one to a step and train from there).")
    check_run_dir(run_dir, resume=True, overwrite=False, purpose=purpose)
    job = load_saved_config(run_dir / CONFIG_FILE, overrides)
    job.run = replace(job.run, out_dir=str(run_dir))
    return job


def cut_run(run_dir: str | Path, step: int) -> str | None:
    """Cut the run in ``run_dir`` back to ``step`` steps done, so that resuming continues from the weights after
    step ``step`` (e.g. before an update that blew them up): the trajectory log keeps its first ``step`` records,
    snapshots of later steps leave the rotation. Nothing is deleted: copies of the whole log and metrics.jsonl, and
    those snapshots, go to ``RUN_DIR/after-step-SSSSSSSS/``. Returns a line saying so (None: nothing to cut)."""
    run_dir = Path(run_dir)
    log = run_dir / LOG_FILE
    records = read_log(log)
    check_step_in_log(step, len(records), run_dir, "--resume-from-step")
    later = [p for p in list_snapshots(run_dir) if snapshot_step(p) > step]
    if step == len(records) and not later:
        return None
    aside = run_dir / f"after-step-{step:08d}"
    try:
        aside.mkdir(exist_ok=True)
        for name in (LOG_FILE, METRICS_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, aside / name)
        kept = b"".join(log.read_bytes().splitlines(keepends=True)[:step])  # read_log checked these lines
        tmp = log.with_name(f".{log.name}.cut")
        tmp.write_bytes(kept)
        os.replace(tmp, log)
        for path in later:
            os.replace(path, aside / path.name)
    except OSError as exc:
        raise CheckpointError(write_failure(aside / LOG_FILE, exc, f"setting the steps after step {step} aside",
                                            "The run folder is")) from None
    return (f"zo2: continuing from the weights after step {step}: the log's later {len(records) - step} steps, the "
            f"metrics and {len(later)} later snapshot(s) were set aside in {aside}")


def save_model(model: nn.Module, tokenizer: Any, folder: Path, engine: Any = None) -> Path:
    """``save_pretrained`` the model (and a Hugging Face tokenizer) to ``folder``, replacing it atomically; with
    ``engine``, the weights only its residences hold (the NVMe tier's, whose parameters are on the meta device)
    are read from there one unit at a time, as the model's ``model.safetensors`` is written tensor by tensor (a
    model larger than host memory is exported without a host copy of it)."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of zo2's output
    try:
        home = engine.home_weights() if engine is not None else {}
        if home and is_peft_model(model):  # the adapter alone (small): its NVMe-homed tensors read from the files
            state = model.state_dict()
            state.update({n: d.load().clone() for n, d in home.items()})
            model.save_pretrained(str(tmp), state_dict=state)
        elif home:
            _save_streamed(model, home, tmp)
        else:
            model.save_pretrained(str(tmp))
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if not isinstance(tokenizer, ByteTokenizer) and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _save_streamed(model: nn.Module, home: dict, folder: Path) -> None:
    """What ``save_pretrained`` writes for ``model`` (its config, generation config and one ``model.safetensors``),
    with ``home``'s deferred tensors in place of the parameters on the meta device: written tensor by tensor. A
    tensor sharing its storage with an earlier one of the state dict (a tied LM head) is left out, as
    ``save_pretrained`` leaves it out."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(folder))
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        if name in home:
            tensors[name] = home[name]
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if not t.is_meta else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        tensors[name] = t
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


def check_finite_weights(tensors: dict[str, torch.Tensor], steps_done: int) -> None:
    """NonFiniteLossError instead of saving weights that hold NaN/inf."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]  # host sync per tensor
    if bad:
        raise NonFiniteLossError(f"After {steps_done} steps the weights hold NaN/inf values (e.g. in {bad[0]}); "
                                 "zo2 did not save them. Lower optim.lr or optim.eps, or use model.dtype = 'fp32', "
                                 "and restart from a snapshot or `zo2 replay` of an earlier step.")


def check_step_in_log(step: int, held: int, run_dir: Path, option: str) -> None:
    """CheckpointError naming ``option`` unless 0 <= ``step`` <= ``held`` (the steps the log holds)."""
    if not 0 <= step <= held:
        raise CheckpointError(f"{option} {step} is outside the run in {run_dir}: its trajectory log holds {held} "
                              f"steps, so pick a step from 0 (the base weights) to {held}.")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics.jsonl records of a run folder."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)

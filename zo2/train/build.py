"""The pieces of a training job, one ``build_*`` function each: device, tokenizer, model, data, engine, loss
guard, and the CPU thread count. The trainer, the scheduler and its workers, ``zo2 replay`` and ``zo2 eval``
build their jobs from these."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from zo2.config.job import JobConfig
from zo2.engine import LossFn, ZOEngine
from zo2.errors import ConfigError, DataError
from zo2.parallel.mesh import ZOComm
from zo2.train.data import BatchLoader, Example, collate, load_examples
from zo2.train.guard import LossGuard
from zo2.train.model import STREAMED, build_model, fill_weights, max_positions, vocab_size
from zo2.train.tokenizer import load_tokenizer, special_ids


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device ('auto': cuda when available, else cpu)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}, but torch sees no CUDA device here. Set train.device = "
                          "'cpu' (or 'auto'), or install a CUDA build of torch on a GPU machine.")
    return torch.device(name)


TINY_MODEL_PARAMS = 10_000_000
"""Below this many parameters the CPU path runs on one intra-op thread (see :func:`cpu_threads`)."""


def cpu_threads(job: JobConfig, cores: int) -> int:
    """Intra-op threads for a CPU run of ``job`` given ``cores`` for it: 1 for a model built from a shape under
    TINY_MODEL_PARAMS, else ``cores``. A tiny model's matrices (64-256 wide) take microseconds per op, less than
    handing work to a second thread costs: on 2 cores the default job runs as fast on one thread when the machine is
    idle and about 1.5x faster when another process keeps a core busy, while OPT-125M's step is 1.56x faster on two
    threads than on one (benchmarks/RESULTS.md)."""
    from zo2.config.presets import parameter_count

    if job.model.path is None and parameter_count(job.model) < TINY_MODEL_PARAMS:
        return 1
    return max(cores, 1)


def set_cpu_threads(job: JobConfig) -> int | None:
    """For the command line: set torch's intra-op threads by :func:`cpu_threads` unless OMP_NUM_THREADS says
    otherwise or the job runs on a GPU. Returns the count set (None: left alone)."""
    if "OMP_NUM_THREADS" in os.environ or job.train.device.startswith("cuda") or (
            job.train.device == "auto" and torch.cuda.is_available()):
        return None
    threads = cpu_threads(job, torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def build_tokenizer(job: JobConfig) -> Any:
    """The tokenizer ``data.tokenizer`` names (the byte tokenizer by default)."""
    return load_tokenizer(job.data, job.model.path)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """pad/bos/eos ids of the tokenizer, for the config of a model built from a shape."""
    pad, eos = special_ids(tokenizer)
    return {"pad_token_id": pad, "bos_token_id": getattr(tokenizer, "bos_token_id", None), "eos_token_id": eos}


def build_job_model(job: JobConfig, tokenizer: Any) -> nn.Module:
    """The model of ``job.model``, checked against the tokenizer and the sequence length."""
    model = build_model(job.model, special_token_ids(tokenizer))
    rows, needed = vocab_size(model), len(tokenizer)
    if rows < needed:
        raise ConfigError(f"The model's vocabulary has {rows} entries but the tokenizer produces ids up to "
                          f"{needed - 1}. Raise model.vocab_size to at least {needed}, or use a matching tokenizer "
                          "(data.tokenizer).")
    longest = max_positions(model)
    if longest is not None and job.data.max_length > longest:
        raise ConfigError(f"data.max_length = {job.data.max_length} exceeds the {longest} positions the model "
                          "accepts. Lower data.max_length.")
    if job.peft.method is not None:  # only the adapter's parameters are trained
        from zo2.models.peft_adapter import apply_peft

        model = apply_peft(model, job.peft, job.model.family, seed=job.model.init_seed)
    return model


def build_data(job: JobConfig, tokenizer: Any, comm: ZOComm | None = None
               ) -> tuple[BatchLoader, list[dict[str, torch.Tensor]]]:
    """The training loader and the held-out batches: the last ``train.eval_batches × data.batch_size``
    examples of the data set are held out from training and evaluated."""
    examples = load_examples(job.data, tokenizer)
    size = job.data.batch_size
    held = job.train.eval_batches * size
    if held and len(examples) - held < size:
        raise DataError(f"The data set has {len(examples)} examples; holding out train.eval_batches × "
                        f"data.batch_size = {held} for evaluation leaves less than one training batch. Lower "
                        "train.eval_batches (0 turns evaluation off) or data.batch_size, or add examples.")
    train: list[Example] = examples[: len(examples) - held]
    pad, _ = special_ids(tokenizer)
    evals = [collate(examples[i: i + size], pad) for i in range(len(train), len(examples), size)]
    shard = dict(rank=comm.dp_rank, world_size=comm.dims.dp) if comm is not None else {}
    return BatchLoader(job.data, tokenizer, examples=train, **shard), evals


def build_engine(job: JobConfig, model: nn.Module, loss_fn: LossFn | None = None,
                 comm: ZOComm | None = None) -> ZOEngine:
    """The ZO engine on ``train.device`` (``optim.total_steps`` filled in from ``train.steps``)."""
    device = resolve_device(job.train.device)
    optim = replace(job.optim, device=str(device), total_steps=job.optim.total_steps or job.train.steps)
    engine = ZOEngine(model, optim, loss_fn=loss_fn, comm=comm if comm is not None and comm.world_size > 1 else None,
                      offload_config=job.offload)
    if getattr(model, STREAMED, False):
        fill_weights(job.model, engine)  # weights go straight into the store / onto the device
    return engine


def build_guard(job: JobConfig, resume_command: str) -> LossGuard:
    """The run's loss guard (NaN/inf streaks, blow-ups), with the command that continues it for its advice."""
    return LossGuard(job.train.max_nonfinite_steps, job.train.divergence_factor, resume_command, job.optim.lr,
                     run_dir=job.run.out_dir)


"""ZOTrainer: the Hugging Face ``transformers.Trainer`` loop with zo2's zeroth-order engine underneath.

``ZOTrainer`` is a ``Trainer``: datasets, collators, callbacks, logging integrations, ``save_steps`` checkpoints,
``evaluate()``, ``resume_from_checkpoint`` and ``save_model`` work as usual. What changes is the step:

* ``training_step`` runs :meth:`ZOEngine.step` on the batch — two forwards at θ ± εz, no backward — and returns
  the step's loss. The weights are updated by the engine (deferred to the next step's visit of each unit, as
  always); the Trainer's optimizer and scheduler are placeholders that update nothing. The scheduler's learning
  rate is the engine's, so the logged ``learning_rate`` is the one the ZO update used.
* The ZO settings come from ``zo_config`` (a :class:`~zo2.config.zo.ZOConfig`). Without one they are mapped from
  the ``TrainingArguments`` fields that mean the same thing (:func:`zo_config_from_args`): ``learning_rate``,
  ``seed`` (the direction seeds), ``weight_decay``, ``lr_scheduler_type`` (constant, constant_with_warmup,
  linear, cosine), the warm-up and the number of training steps (``max_steps`` or the epochs'). ε stays
  ZOConfig's default (1e-3). The Trainer's ``seed`` also seeds data shuffling, as usual.
* Logs add ``projected_grad`` (mean over the logging interval of the step's (L+ − L-)/2ε) and
  ``projected_grad_abs`` (mean of its absolute value); ``grad_norm`` (meaningless without gradients) is dropped.
* ``save_model`` and every checkpoint flush the deferred update first, so saved weights are current; the folder
  also gets ``zo2_engine.json`` (the engine's step and config). Evaluation runs :meth:`ZOEngine.evaluate`.
* The Trainer's global step is the ZO step: a resumed run continues the direction seeds where it stopped.

Limitations (each raises a :class:`~zo2.errors.ConfigError` where it can be detected):

* one process, one device: no DDP/FSDP/DeepSpeed, ``n_gpu`` must be ≤ 1 (zo2's own launcher does many GPUs);
* ``gradient_accumulation_steps`` must be 1 (a ZO step has no gradient to accumulate: raise the batch size);
* ``fp16`` mixed precision is refused (its gradient scaler needs gradients) and ``bf16=True`` changes nothing:
  the engine's dtypes are ``ZOConfig.storage_dtype`` / ``compute_dtype``;
* no ``optimizers`` / ``optimizer_cls_and_kwargs`` / ``model_init``; TrainingArguments' optimizer fields
  (``optim``, Adam betas, ``max_grad_norm``) are ignored — choose ZO optimizers through ``ZOConfig``;
* the loss is the engine's ``loss_fn`` (causal-LM cross-entropy on ``labels`` by default); ``compute_loss`` and
  ``compute_loss_func`` are not used for training; batches carry ``input_ids``, ``attention_mask`` and
  ``labels`` (columns a custom ``zo_loss_fn`` reads survive only with ``remove_unused_columns=False``);
* the model is placed by the engine (offloaded blocks stay in host memory): the Trainer never moves it;
* stateful ZO optimizers (``zo-sgd-momentum``, ``zo-adam``) keep their buffers in ``zo2_optimizer.safetensors``
  in each checkpoint, and ``resume_from_checkpoint`` restores them.

For TRL-style trainers, mix :class:`ZOTrainerMixin` in front of the trainer class:
``class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer): pass``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from zo2.config.zo import ZOConfig
from zo2.engine import LossFn, ZOEngine
from zo2.errors import ConfigError

ENGINE_FILE = "zo2_engine.json"
"""Written next to the weights by ``save_model`` and checkpoints: the engine's state and config."""
OPTIMIZER_FILE = "zo2_optimizer.safetensors"
"""Written beside them for stateful ZO optimizers (momentum, Adam): their buffers, restored on resume."""

_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}
"""TrainingArguments.lr_scheduler_type → ZOConfig.lr_schedule."""


def zo_config_from_args(args: TrainingArguments, num_training_steps: int | None = None) -> ZOConfig:
    """A ZOConfig from the TrainingArguments fields that mean the same thing in a ZO run.

    The schedule needs the number of steps; without ``num_training_steps`` (nor ``max_steps``) it is constant
    until :class:`ZOTrainer` knows the step count (at the start of ``train()``).
    """
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind not in _SCHEDULES:
        raise ConfigError(f"TrainingArguments.lr_scheduler_type = {kind!r} has no ZO equivalent; use one of "
                          f"{', '.join(_SCHEDULES)}, or pass zo_config=ZOConfig(...) with the schedule you want.")
    steps = num_training_steps if num_training_steps is not None else (args.max_steps if args.max_steps > 0 else None)
    schedule = dict(lr_schedule="constant")
    if steps is not None:
        schedule = dict(lr_schedule=_SCHEDULES[kind], warmup_steps=int(args.get_warmup_steps(steps)),
                        total_steps=max(1, int(steps)))
    return ZOConfig(lr=args.learning_rate, seed=args.seed, weight_decay=args.weight_decay, device=str(args.device),
                    **schedule)


def _check_args(args: TrainingArguments) -> None:
    if args.gradient_accumulation_steps != 1:
        raise ConfigError(f"ZOTrainer needs gradient_accumulation_steps = 1 (got {args.gradient_accumulation_steps}): "
                          "a ZO step has no gradient to accumulate. Raise per_device_train_batch_size instead.")
    if args.world_size > 1 or args.n_gpu > 1:
        raise ConfigError("ZOTrainer runs in one process on one device (world size "
                          f"{args.world_size}, {args.n_gpu} GPUs visible). Set CUDA_VISIBLE_DEVICES to one GPU, or "
                          "train on many GPUs with zo2's own launcher (`zo2 launch`).")
    if args.fp16:
        raise ConfigError("ZOTrainer does not use fp16 mixed precision (its gradient scaler needs gradients). Set "
                          "fp16=False and choose dtypes with ZOConfig(storage_dtype=..., compute_dtype='fp16').")
    if args.deepspeed or args.fsdp:
        raise ConfigError("ZOTrainer does not run under DeepSpeed or FSDP: zo2 offloads and shards by itself.")


class _NoUpdate(torch.optim.Optimizer):
    """Stands in for the Trainer's optimizer: the engine updates the weights inside ``training_step``. Its one
    parameter group only carries the engine's learning rate (set by the scheduler) for the Trainer's logs."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": 1.0})

    def step(self, closure: Any = None) -> None:
        return None


class ZOTrainerMixin:
    """Turns a ``transformers.Trainer`` (sub)class into a zeroth-order trainer; see the module docstring.

    Keyword arguments added to the trainer's own: ``zo_config`` (a ZOConfig; default: mapped from the
    TrainingArguments), ``zo_engine`` (an engine already built on the same model, instead of ``zo_config``) and
    ``zo_loss_fn`` (the engine's ``loss_fn(logits, batch)``).
    """

    def __init__(self, *args: Any, zo_config: ZOConfig | None = None, zo_engine: ZOEngine | None = None,
                 zo_loss_fn: LossFn | None = None, **kwargs: Any):
        if tuple(kwargs.get("optimizers") or (None, None)) != (None, None) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ConfigError("ZOTrainer updates the weights with zo2's engine: pass no optimizers / "
                              "optimizer_cls_and_kwargs (choose the ZO optimizer in ZOConfig).")
        if kwargs.get("model_init") is not None:
            raise ConfigError("ZOTrainer needs a model; model_init is not supported.")
        if zo_engine is not None and (zo_config is not None or zo_loss_fn is not None):
            raise ConfigError("Pass either zo_engine or zo_config/zo_loss_fn to ZOTrainer, not both.")
        super().__init__(*args, **kwargs)
        _check_args(self.args)
        self._zo_schedule_from_args = zo_engine is None and zo_config is None
        if zo_engine is not None:
            if zo_engine.model is not self.model:
                raise ConfigError("zo_engine was built on a different model than the one given to ZOTrainer.")
            self.engine = zo_engine
        else:
            config = zo_config or zo_config_from_args(self.args)
            if config.device is None:
                config = dataclasses.replace(config, device=str(self.args.device))
            self.engine = ZOEngine(self.model, config, loss_fn=zo_loss_fn)
        # The engine placed the model (streamed blocks stay in host memory): Accelerate must not move it.
        self.accelerator.device_placement = False
        self._zo_grads: list[float] = []

    # ------------------------------------------------------------------ the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One ZO step on ``inputs`` (two forwards, no backward); returns its loss for the Trainer's logs."""
        engine = self.engine
        if engine.model.training:
            engine.model.eval()  # ZO forwards run with dropout off
        if engine.step_count != self.state.global_step:  # resumed: the directions follow the Trainer's step
            engine.load_state_dict({"step": self.state.global_step})
        result = engine.step(self._prepare_inputs(inputs))
        if not result.skipped:
            self._zo_grads.append(result.projected_grad)
        return torch.tensor(result.loss, device=self.args.device)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer counts 6·N per token (forward + backward); a ZO step runs one 2·N forward per point."""
        return super().floating_point_ops(inputs) // 3 * len(self.engine.estimator.points(self.engine.step_count))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _NoUpdate()
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """A scheduler whose learning rate is the engine's (for the logs; the engine applies it itself)."""
        if self._zo_schedule_from_args:  # now the step count is known
            mapped = zo_config_from_args(self.args, num_training_steps)
            self.engine.config = dataclasses.replace(
                self.engine.config, lr_schedule=mapped.lr_schedule, warmup_steps=mapped.warmup_steps,
                total_steps=mapped.total_steps)
        if self.lr_scheduler is None:
            engine = self.engine
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, engine.lr_at)
            self._created_lr_scheduler = True  # the Trainer makes a new one at the next train()
        return self.lr_scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._zo_grads:
            grads, self._zo_grads = self._zo_grads, []
            logs["projected_grad"] = math.fsum(grads) / len(grads)
            logs["projected_grad_abs"] = math.fsum(abs(g) for g in grads) / len(grads)
        logs.pop("grad_norm", None)
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Loss (and logits) at the current weights, from the engine's unit-by-unit forward."""
        inputs = self._prepare_inputs(inputs)
        result = self.engine.evaluate(inputs)  # flushes the deferred update first
        loss = torch.tensor(result.loss, device=self.args.device)
        if prediction_loss_only:
            return loss, None, None
        return loss, result.logits.detach(), inputs.get("labels")

    # ------------------------------------------------------------------ saving and loading
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, after applying the deferred update, plus the engine's state and config."""
        self.engine.flush()
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"state": self.engine.state_dict(), "config": dataclasses.asdict(self.engine.config)}
            (folder / ENGINE_FILE).write_text(json.dumps(meta, indent=2))
            state = self.engine.optimizer_state()
            if state:  # momentum / Adam buffers: a resumed run continues them instead of starting from zero
                from zo2.train.durable import write_safetensors

                write_safetensors(folder / OPTIMIZER_FILE, state, metadata={"format": "zo2-optimizer-state"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.engine.flush()  # nothing pending may land on the loaded weights
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.engine.invalidate_prefetch()  # device copies uploaded ahead hold the old weights
        state_file = Path(resume_from_checkpoint) / OPTIMIZER_FILE
        if state_file.is_file():
            from safetensors.torch import load_file

            self.engine.load_optimizer_state(load_file(str(state_file), device=str(self.engine.device)))

    def _load_best_model(self) -> None:
        self.engine.flush()
        super()._load_best_model()
        self.engine.invalidate_prefetch()

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """The engine places the model (resident units on the device, streamed blocks in host memory)."""


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with zo2's zeroth-order engine underneath (see :mod:`zo2.integrations.hf_trainer`)."""

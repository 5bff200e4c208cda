"""Building models too large to materialize, and streaming their weights into the parameter store.

``empty_model`` builds a transformers causal LM with every parameter on the meta device (buffers such as
rotary frequencies stay real), so a 175B-shaped model costs no memory until the engine has decided what is
resident and what lives in the store. ``load_safetensors`` then reads the checkpoint's shards one tensor at a
time straight into the store (streamed blocks) or onto the device (resident units); ``init_random`` fills
the same places with a seeded normal initialization for benchmarks and shape experiments.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from zo2.errors import ModelError
from zo2.models.base import base_checkpoint_name, is_peft_model
from zo2.optim.rng import param_key



class Fillable(Protocol):
    """What the loaders fill: an engine (zo2.ZOEngine) after it placed the model."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    store: Any
    device: torch.device
    residences: list
    """Each unit's residence (zo2.offload.residence): the NVMe tier's is filled through ``fill_home``."""

    def invalidate_prefetch(self) -> None: ...

    def flush(self) -> None: ...


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is created on the meta device (buffers are not)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A causal LM for ``config`` (a transformers config) whose parameters take no memory (meta device)."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _targets(engine: Fillable) -> dict[str, torch.Tensor]:
    """Where each trainable parameter's values live: a view of the store, or the (device) parameter itself
    (not the NVMe tier's: their parameters are on the meta device, filled through :func:`_fill`). Under PEFT the
    frozen base weights instead (the views of their frozen store, or the device parameters), named as the base
    model's checkpoint names them: the adapter keeps its seeded init. Not what a shared store of the node holds
    that another process made: that process fills it, once for the node."""
    others = _filled_by_another(engine)
    if is_peft_model(engine.model):
        targets = {base_checkpoint_name(n): p.data for n, p in engine.model.named_parameters()
                   if not p.requires_grad and not p.is_meta}
    else:
        targets = {n: p.data for n, p in engine.params.items() if not p.is_meta}
        if engine.store is not None:
            for i in range(len(engine.store)):
                targets.update(engine.store.views(engine.store.flat(i), engine.store.layout(i)))
    return {n: t for n, t in targets.items() if not any(lo <= t.data_ptr() < hi for lo, hi in others)}


def _shared_stores(engine: Fillable) -> list:
    """The host stores of ``engine`` that the processes of its node share: the weights store and a PEFT base's
    frozen store (zo2.offload.frozen_setup), where they are shared."""
    stores = [engine.store, getattr(getattr(engine, "streamer", None), "frozen", None)]
    stores += [getattr(getattr(r, "frozen", None), "store", None) for r in getattr(engine, "residences", ())]
    return [s for s in stores if s is not None and getattr(s, "shared", False)]


def _filled_by_another(engine: Fillable) -> list[tuple[int, int]]:
    """The address ranges of shared stores another process of the node made: it fills them (once for the node),
    this process only waits for that (:func:`_fill`)."""
    return [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for s in _shared_stores(engine)
            if not s.owner for b in s.buffers if b.numel()]


def _resolve(name: str, targets: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The model's name for a checkpoint tensor name (checkpoints may omit or add the base-model prefix)."""
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if candidate in targets:
            return candidate
    return None


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a Hugging Face checkpoint folder, in index order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"No *.safetensors files in {folder}: the offload loader streams safetensors shards. "
                         "Convert the checkpoint with save_pretrained(..., safe_serialization=True).")
    return files


def _fill(engine: Fillable, fill: Any) -> None:
    """Run ``fill(targets)`` on the store and the device, then on each NVMe-homed unit's staging buffer in turn,
    which goes straight to its files: a unit at a time, never the whole model in host memory."""
    engine.invalidate_prefetch()
    fill(_targets(engine))
    comm = getattr(engine, "comm", None)
    if _shared_stores(engine) and comm is not None and comm.local_size > 1:
        comm.local_barrier()  # the node's shared stores are filled (by the process that made each) before any use
    base = is_peft_model(engine.model)  # the frozen base weights (the adapter keeps its seeded init)
    for residence in getattr(engine, "residences", ()):
        (residence.fill_frozen if base else residence.fill_home)(fill)
    engine.flush()


@torch.no_grad()
def load_safetensors(engine: Fillable, folder: str | Path) -> None:
    """Stream a checkpoint's tensors, one at a time, into the store or onto the device."""
    prefix = getattr(engine.model, "base_model_prefix", "model")
    _fill(engine, lambda targets: load_safetensors_into(targets, folder, prefix))


@torch.no_grad()
def load_safetensors_into(targets: dict[str, torch.Tensor], folder: str | Path, prefix: str = "model",
                          only: set[str] | None = None) -> None:
    """Copy a checkpoint's tensors, one at a time, into ``targets`` (model name → tensor to fill); ``only``
    restricts it to some names (e.g. the units of a node store being repaired)."""
    from safetensors import safe_open

    wanted = set(targets) if only is None else set(only)
    filled: set[str] = set()
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as shard:
            for key in shard.keys():
                name = _resolve(key, targets, prefix)
                if name is None or name in filled or name not in wanted:
                    continue  # buffers, tied copies (lm_head of tied models)
                tensor = shard.get_tensor(key)
                if tuple(tensor.shape) != tuple(targets[name].shape):
                    raise ModelError(f"{path.name}: tensor {key} has shape {tuple(tensor.shape)} but the model's "
                                     f"{name} has {tuple(targets[name].shape)}; the checkpoint does not match the "
                                     "model config.")
                targets[name].copy_(tensor)
                filled.add(name)
    missing = sorted(wanted - filled)
    if missing:
        raise ModelError(f"The checkpoint in {folder} lacks {len(missing)} parameters, e.g. {missing[:3]}.")


@torch.no_grad()
def init_random(engine: Fillable, seed: int = 0, std: float = 0.02) -> None:
    """Fill every trainable parameter with N(0, std²) (norm weights with 1, biases with 0), deterministically.

    Generated one parameter at a time on the compute device and copied into place, so even a store far larger
    than the device fills quickly.
    """
    _fill(engine, lambda targets: init_random_into(targets, seed, engine.device, std))


@torch.no_grad()
def init_random_into(targets: dict[str, torch.Tensor], seed: int, device: torch.device | str,
                     std: float = 0.02) -> None:
    """:func:`init_random` on ``targets`` (name → tensor to fill), generating on ``device``: each parameter's
    values are a pure function of (seed, name, shape, device type), so any subset can be regenerated alone."""
    gen = torch.Generator(device=device)
    for name, target in targets.items():
        lowered = name.lower()
        if target.dim() == 1:
            target.fill_(1.0 if "norm" in lowered or "ln" in lowered else 0.0)
            continue
        gen.manual_seed((seed << 32) ^ param_key(name))
        values = torch.randn(target.shape, generator=gen, device=device, dtype=torch.float32) * std
        target.copy_(values.to(target.dtype))

"""A model seen as units: the embedding, one unit per block, the head — what the engine visits in order and
what is perturbed, updated and (when offloaded) stored and streamed together.

A pure function of the model's structure (:func:`build_units`): the engine and the scheduler that holds a node's
store (zo2.control) compute the same units, layouts and keys from the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from zo2.errors import ModelError


@dataclass
class Slot:
    """One place a unit's forward reads a trainable parameter: ``module._parameters[attr]``."""

    module: nn.Module
    attr: str
    name: str
    reader: nn.Module | None = None
    """The module whose forward reads it: ``module``, or where ``module`` is a parameter container without a
    forward (an ``nn.ParameterDict`` / ``nn.ParameterList``: peft's IA3 scaling vectors, VeRA's lambdas) the
    module holding that container."""

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = self.module


@dataclass
class Unit:
    """Embedding, one block or the head: parameters perturbed, updated and (later) streamed together."""

    name: str
    kind: str  # "embed" | "block" | "head"
    index: int
    slots: list[Slot]
    owned: list[str]
    """Parameters this unit updates (a tied parameter is owned by the first unit that uses it)."""
    applied: int = -1
    """Step of the last update applied to the owned parameters (on the compute device's copy)."""
    residence: Any = None
    """Where the unit's weights live between visits and how a visit gets them (zo2.offload.residence)."""
    store_index: int | None = None
    """Index in the parameter store when the unit is streamed, else None (resident on the device)."""
    layout: list = field(default_factory=list)
    """Where each owned parameter sits in the unit's flat buffer (zo2.offload.store.Segment)."""
    table: Any = None
    """The kernels' segment table of that flat buffer."""
    flat: Any = None
    """The flat device buffer of a resident unit (the parameters are views of it)."""
    slice_table: Any = None
    """With sliced transfers: the segment table of this process's slice of the (streamed) unit."""
    home: int | None = None
    """With a node store (zo2.control): this unit's index there (resident units sync back to it)."""


def build_units(adapter: Any, params: Mapping[str, nn.Parameter], model_name: str = "model") -> list[Unit]:
    """The model's units in visit order (embed, blocks, head) with the trainable parameters each reads and owns."""
    names_by_id = {id(p): n for n, p in params.items()}
    groups = [("embed", "embed", 0, adapter.embed_modules())]
    groups += [(f"block.{i}", "block", i, [b]) for i, b in enumerate(adapter.blocks())]
    groups.append(("head", "head", 0, adapter.head_modules()))
    owned_so_far: set[str] = set()
    units = []
    for name, kind, index, modules in groups:
        slots = _slots(modules, names_by_id)
        owned = list(dict.fromkeys(s.name for s in slots if s.name not in owned_so_far))
        owned_so_far.update(owned)
        units.append(Unit(name, kind, index, slots, owned))
    missing = set(params) - owned_so_far
    if missing:
        raise ModelError(
            f"The {type(adapter).__name__} adapter of {model_name} does not cover the trainable parameters "
            f"{sorted(missing)[:5]}; they would never be perturbed. Freeze them (requires_grad=False) or "
            "fix the adapter's embed_modules/blocks/head_modules."
        )
    return units


def shared_names(units: Sequence[Unit]) -> set[str]:
    """Parameters read by more than one unit (tied weights: the head reads the embedding's)."""
    read_by = [n for u in units for n in {s.name for s in u.slots}]
    return {n for n in read_by if read_by.count(n) > 1}


CONTAINERS = (nn.ParameterDict, nn.ParameterList)
"""Modules that hold parameters but have no forward: their parameters are read by the module holding them."""


def _slots(modules: Sequence[nn.Module], names_by_id: dict[int, str]) -> list[Slot]:
    slots, seen = [], set()
    for root in modules:
        parent = {id(c): m for m in root.modules() for c in m.children()}
        for module in root.modules():
            reader = module
            while isinstance(reader, CONTAINERS) and id(reader) in parent:
                reader = parent[id(reader)]
            for attr, p in module._parameters.items():
                if p is not None and id(p) in names_by_id and (id(module), attr) not in seen:
                    seen.add((id(module), attr))
                    slots.append(Slot(module, attr, names_by_id[id(p)], reader))
    return slots

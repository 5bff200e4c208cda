"""ZOEngine: MeZO-style zeroth-order steps on a Hugging Face causal LM.

A step evaluates the estimator's perturbed points (θ + εz, θ − εz for MeZO) by running every point's hidden
states through the model unit by unit (``embed → blocks → head``), each unit's parameters perturbed out of place
(θ itself is never modified by a perturbation, so nothing drifts in low precision). The losses give the
projected gradient and an :class:`~zo2.optim.estimators.Update`; by default the update is *deferred*: it is
applied to each unit at the start of its visit in the next step, the schedule the offload engine streams with.
Deferred and immediate updates run the same arithmetic on the same values and are bit-identical.

Every unit records the last update applied to it, so ``flush()`` (and a step that stopped half-way) never
applies an update twice.

``optim.optimizer`` picks how the estimate moves θ (zo2.optim.optimizers): MeZO-SGD on the fused kernels, or
momentum, sign, conservative or Adam steps. Momentum and Adam state lives per unit beside the weights
(zo2.offload.state), is updated on the same visit as the deferred update, and is part of ``trainable_state()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from zo2.config.zo import ZOConfig, torch_dtype
from zo2.errors import CheckpointError, ConfigError, ModelError
from zo2.models.base import adapter_for, causal_lm_loss
from zo2.optim.decay import skips_decay
from zo2.optim.estimators import Point, Update, build_estimator
from zo2.optim.rng import direction, direction_seed, param_key
import zo2_kernels
from zo2.optim.schedule import lr_at
from zo2.offload.build import build_offload
from zo2.parallel.mesh import share_bounds
from zo2.offload.streamer import TransferStats
from zo2.offload.state import build_optimizer_state
from zo2.optim.optimizers import UnitState, build_optimizer, check_supported, conservative_scale

if TYPE_CHECKING:
    from zo2.parallel.mesh import ZOComm

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
"""``loss_fn(logits, batch) -> scalar tensor``: any scalar function of the logits (need not be differentiable)."""

_ROUNDING_STREAM = 0x5352_0000_0000  # separates the rounding seeds from the direction seeds


@dataclass
class StepResult:
    """What one ``ZOEngine.step`` reports."""

    step: int
    loss: float
    loss_plus: float
    loss_minus: float
    projected_grad: float
    lr: float
    skipped: bool
    update: Update | None
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    """The loss of every evaluated point, in the estimator's order; zo-sgd-conservative appends L(θ) (unless the
    estimator has it) and its two candidates' losses, L(θ − lr(ĝ + λθ)) and L(θ + lr(ĝ + λθ))."""
    bytes_h2d: int = 0
    """Bytes uploaded from the parameter store this step (0 when nothing streams)."""
    bytes_d2h: int = 0
    """Bytes written back to the parameter store this step."""
    transfer_wait_ms: float = 0.0
    """Time the compute stream waited for uploads (CUDA only)."""
    peak_device_bytes: int = 0
    """Peak memory allocated on the compute device during the step (CUDA only)."""


@dataclass
class EvalResult:
    loss: float
    logits: torch.Tensor


@dataclass
class _Slot:
    """One place a unit's forward reads a trainable parameter: ``module._parameters[attr]``."""

    module: nn.Module
    attr: str
    name: str


@dataclass
class Unit:
    """Embedding, one block or the head: parameters perturbed, updated and (later) streamed together."""

    name: str
    kind: str  # "embed" | "block" | "head"
    index: int
    slots: list[_Slot]
    owned: list[str]
    """Parameters this unit updates (a tied parameter is owned by the first unit that uses it)."""
    applied: int = -1
    """Step of the last update applied to the owned parameters."""
    store_index: int | None = None
    """Index in the parameter store when the unit is streamed, else None (resident on the device)."""
    layout: list = field(default_factory=list)
    """Where each owned parameter sits in the unit's flat buffer (zo2.offload.store.Segment)."""
    table: Any = None
    """The kernels' segment table of that flat buffer."""
    flat: torch.Tensor | None = None
    """The flat device buffer of a resident unit (the parameters are views of it)."""
    slice_table: Any = None
    """With sliced transfers: the segment table of this process's slice of the (streamed) unit."""
    home: int | None = None
    """With a node store (zo2.control): this unit's index there (resident units sync back to it)."""


def select_kernels(name: str, device: torch.device, dtypes: set[torch.dtype]):
    """The perturbation/update backend: zo2_kernels' Triton kernels or the torch reference."""
    if torch.float64 in dtypes and name != "triton":
        return zo2_kernels.reference  # the Triton kernels take 16- and 32-bit floats only
    try:
        return zo2_kernels.get_backend(name, device)
    except RuntimeError as err:
        raise ConfigError(f"optim.kernels = 'triton' cannot be used: {err}. Use 'auto' or 'torch'.") from None


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """zo2's default rule (optim.no_decay = 'norms_and_biases'): no weight decay on biases and norm weights."""
    return skips_decay(name, param)


def default_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``batch['labels']``, or the input ids with padding masked out when the batch has no labels."""
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss of ``batch`` averages over (labels shifted by one, -100 ignored)."""
    return int((default_labels(batch)[..., 1:] != -100).sum())


def loss_weight(loss_fn: Any, batch: Mapping[str, torch.Tensor]) -> float:
    """What ``loss_fn``'s value on ``batch`` averages over — ``loss_fn.weight(batch)`` when it says, else the loss
    tokens: data-parallel ranks weight their shard's loss by it, so the combined loss is the full batch's."""
    return getattr(loss_fn, "weight", loss_tokens)(batch)


def default_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(logits, default_labels(batch))


def build_units(adapter: Any, params: Mapping[str, nn.Parameter], model_name: str = "model") -> list[Unit]:
    """The model's units in visit order (embed, blocks, head) with the trainable parameters each reads and owns.

    A pure function of the model's structure: the engine and a scheduler holding the node's store
    (zo2.control) compute the same units, layouts and keys.
    """
    names_by_id = {id(p): n for n, p in params.items()}
    groups = [("embed", "embed", 0, adapter.embed_modules())]
    groups += [(f"block.{i}", "block", i, [b]) for i, b in enumerate(adapter.blocks())]
    groups.append(("head", "head", 0, adapter.head_modules()))
    owned_so_far: set[str] = set()
    units = []
    for name, kind, index, modules in groups:
        slots = _slots(modules, names_by_id)
        owned = [s.name for s in slots if s.name not in owned_so_far]
        owned = list(dict.fromkeys(owned))
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


def _slots(modules: Sequence[nn.Module], names_by_id: dict[int, str]) -> list[_Slot]:
    slots, seen = [], set()
    for root in modules:
        for module in root.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in names_by_id and (id(module), attr) not in seen:
                    seen.add((id(module), attr))
                    slots.append(_Slot(module, attr, names_by_id[id(p)]))
    return slots


def segment_table(layout: Sequence[Any], params: Mapping[str, torch.Tensor], no_decay: str) -> Any:
    """The kernels' segment table of a flat buffer laid out as ``layout``: each parameter's perturbation key
    and whether weight decay applies to it (the ``no_decay`` rule, zo2.optim.decay)."""
    return zo2_kernels.SegmentTable([(seg.offset, seg.numel, param_key(seg.name),
                                      not skips_decay(seg.name, params[seg.name], no_decay)) for seg in layout])


def rounding_seed(config: ZOConfig, update: Update, dtype: torch.dtype) -> int | None:
    """Seed of the stochastic rounding of ``update`` (a pure function of base seed and step, so replays and
    offloaded runs round alike); None when the weights are not low precision or rounding is off."""
    if dtype not in (torch.bfloat16, torch.float16) or not config.stochastic_rounding:
        return None
    return direction_seed(config.seed ^ _ROUNDING_STREAM, update.step)


def update_flat(kernels: Any, config: ZOConfig, target: torch.Tensor, table: Any, update: Update,
                optimizer: Any = None, state: Any = None) -> None:
    """θ ← θ − lr (D + λθ) in place on a flat buffer (or a slice of one) described by ``table``: the
    arithmetic of every update the engine applies, also used to repair a store from the trajectory log.

    D = Σ c z (MeZO-SGD, the fused kernels) unless ``optimizer`` (a :class:`~zo2.optim.optimizers.ZOOptimizer`)
    is not plain SGD: then its rule, with ``state`` (a UnitState: its buffers laid out like ``target``) updated
    in place."""
    if optimizer is None or optimizer.fused:
        kernels.update(target, table, update.seeds, update.coeffs, update.lr, config.weight_decay,
                       config.distribution, stochastic_rounding_seed=rounding_seed(config, update, target.dtype),
                       out=target)
        return
    optimizer.apply(target, table, state, update, config.weight_decay, config.distribution,
                    rounding_seed(config, update, target.dtype), kernels=kernels)


class ZOEngine:
    """Zeroth-order fine-tuning of ``model`` (a transformers causal LM) with the settings of ``config``."""

    def __init__(self, model: nn.Module, config: ZOConfig | None = None, *, loss_fn: LossFn | None = None,
                 comm: "ZOComm | None" = None, store_spec: Any = None):
        self.config = config or ZOConfig()
        self.comm = comm
        """Set under torchrun: this rank evaluates its share of the points on its shard of the batch."""
        self.model = model.eval()  # ZO forwards run with dropout off, as MeZO's
        self.adapter = adapter_for(model)
        self.loss_fn = loss_fn or default_loss
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False).")
        self._set_dtypes()
        self.keys = {n: param_key(n) for n in self.params}
        if len(set(self.keys.values())) != len(self.keys):
            raise ModelError("Two parameter names hash to the same perturbation key; rename one of them.")
        self.decay = {n: not skips_decay(n, p, self.config.no_decay) for n, p in self.params.items()}
        self.units = self._build_units()
        read_by = [n for u in self.units for n in {s.name for s in u.slots}]
        self._shared_names = {n for n in read_by if read_by.count(n) > 1}
        self.estimator = build_estimator(self.config.estimator, self.config.seed, self.config.eps, self.config.q)
        self.optimizer = build_optimizer(self.config)
        self.step_count = 0
        self.pending: Update | None = None
        self.device = self._compute_device()
        self.store_spec = store_spec
        """A node store to map (zo2.control.store.StoreSpec): every unit lives in the scheduler's shared store."""
        self.markers = None
        """With a node store: its per-unit markers (zo2.offload.markers.StoreMarkers), kept current on write-back."""
        self.store_writer = 0
        """With a node store: this process's index among the node's writers (the slice it writes back)."""
        self.plan, self.store, self.streamer = build_offload(self, self.device)
        self.state_area = self._map_state_area()
        """With a node store and a stateful optimizer: the scheduler's state area (zo2.offload.state.StateArea),
        from which streamed blocks' state streams (sliced like the weights) and resident units' is synced."""
        check_supported(self.optimizer, comm=comm)
        self.opt_state = build_optimizer_state(self, self.state_area)
        """The optimizer's per-unit state (zo2.offload.state): empty for stateless optimizers."""
        streamed = [u for u in self.units if u.store_index is not None]
        self._last_streamed = streamed[-1] if streamed else None
        self.kernels = select_kernels(self.config.kernels, self.device, {self._unit_dtype(u) for u in self.units})
        self.last_transfer: TransferStats | None = None

    # ------------------------------------------------------------------ setup
    def _set_dtypes(self) -> None:
        """Cast trainable weights to the storage dtype; frozen ones to the compute dtype (never updated, they are
        kept, and streamed read-only, as the forwards read them)."""
        storage = torch_dtype(self.config.storage_dtype)
        if storage is not None:
            for p in self.params.values():
                if p.dtype != storage:
                    p.data = p.data.to(storage)
        compute = torch_dtype(self.config.compute_dtype)
        self.compute_dtype = compute or next(iter(self.params.values())).dtype
        if compute is not None:
            for p in self.model.parameters():
                if not p.requires_grad and p.is_floating_point() and p.dtype != compute:
                    p.data = p.data.to(compute)

    def _unit_dtype(self, unit: Unit) -> torch.dtype:
        return self.params[unit.owned[0]].dtype if unit.owned else self.compute_dtype

    def _compute_device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        device = next(iter(self.params.values())).device
        if device.type == "meta":
            raise ModelError("The model is on the meta device; set optim.device (e.g. 'cuda') so the engine knows "
                             "where to compute, and load the weights into the parameter store.")
        return device

    def _build_units(self) -> list[Unit]:
        return build_units(self.adapter, self.params, type(self.model).__name__)

    # ------------------------------------------------------------------ the math on one tensor
    def lr_at(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.lr, c.lr_schedule, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def _z(self, name: str, seed: int) -> torch.Tensor:
        return direction(seed, self.keys[name], self.params[name].numel(), distribution=self.config.distribution,
                         device=self.device)

    def _map_state_area(self) -> Any:
        """Map the node's optimizer-state area (the scheduler created and filled it)."""
        spec = self.store_spec
        if spec is None:
            return None
        if tuple(spec.state_names) != tuple(self.optimizer.state_names):
            raise ModelError(f"The node store was made for optimizer state {list(spec.state_names)} but this "
                             f"worker's optimizer ({self.optimizer.name}) keeps {list(self.optimizer.state_names)}: "
                             "start the workers from the scheduler of the same config.")
        if not spec.state_names:
            return None
        from zo2.offload.state import StateArea
        from zo2.optim.update import math_dtype

        return StateArea(spec.name, self.store.layouts, spec.state_names, math_dtype(spec.torch_dtype),
                         pad_to=spec.pad_to, create=False, pin=self.device.type == "cuda")

    def _rounding_seed(self, update: Update, dtype: torch.dtype) -> int | None:
        return rounding_seed(self.config, update, dtype)

    @contextlib.contextmanager
    def _visit(self, unit: Unit, pending: Update | None, seeds: Sequence[int] = ()
               ) -> Iterator[tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]]:
        """The unit's flat buffer on the compute device with ``pending`` applied (once), and θ ± εz(seed).

        A streamed unit is uploaded (or was prefetched), updated on the device and written back to the store
        while its forwards run; a resident unit is updated in place. With one seed and an update to apply,
        the update and both perturbations are one fused pass (``update_and_perturb``).
        """
        streamed = unit.store_index is not None
        flat = self.streamer.acquire(unit.store_index) if streamed else unit.flat
        cfg, k = self.config, self.kernels
        pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            if unit.slice_table is not None:  # sliced transfers: update my slice, then assemble the block
                self._update_slice(unit, flat, pending)
            elif pending is not None and unit.applied < pending.step:
                if len(seeds) == 1 and not self.plan.one_copy and self.optimizer.fused:
                    plus, minus = self._pair_buffers(flat)
                    k.update_and_perturb(flat, unit.table, pending.seeds, pending.coeffs, pending.lr,
                                         cfg.weight_decay, seeds[0], cfg.eps, cfg.distribution,
                                         stochastic_rounding_seed=self._rounding_seed(pending, flat.dtype),
                                         out=flat, out_plus=plus, out_minus=minus)
                    pairs[seeds[0]] = (plus, minus)
                else:
                    self._update_in_place(flat, unit.table, pending, unit)
                unit.applied = pending.step
                if streamed:
                    self.streamer.write_back(unit.store_index, pending.step)
            for seed in seeds if not self.plan.one_copy else ():
                if seed not in pairs:
                    plus, minus = self._pair_buffers(flat)
                    k.perturb_pair(flat, unit.table, seed, cfg.eps, cfg.distribution, out_plus=plus, out_minus=minus)
                    pairs[seed] = (plus, minus)
            yield flat, pairs
        finally:
            if streamed:
                self.streamer.release(unit.store_index)
            self.opt_state.release(unit)

    def _update_slice(self, unit: Unit, flat: torch.Tensor, pending: Update | None) -> None:
        """Sliced transfers: this process uploaded only its slice of the block; it applies the deferred
        update to that slice, writes it back to the node's shared store, and an all-gather assembles the
        whole updated block on every process."""
        lo, hi = self.streamer.ranges[unit.store_index]
        if pending is not None and unit.applied < pending.step:
            self._update_in_place(flat[lo:hi], unit.slice_table, pending, unit, part=slice(lo, hi))
            unit.applied = pending.step
            self.streamer.write_back(unit.store_index, pending.step)
        self.comm.gather_slices(flat)

    def _update_in_place(self, target: torch.Tensor, table: Any, update: Update, unit: Unit | None = None,
                         part: slice | None = None) -> None:
        """θ ← θ − lr (D + λθ) on a flat buffer (or the ``part`` of ``unit``'s buffer that is ``target``, with
        sliced transfers) described by ``table``: the fused kernels for MeZO-SGD (D = Σ c z), else the optimizer's
        rule with ``unit``'s state (uploaded, the same part of it updated, written back)."""
        state = self.opt_state.acquire(unit) if unit is not None and not self.optimizer.fused else None
        if state is not None and part is not None:
            view = UnitState({n: b[part] for n, b in state.buffers.items()}, state.count)
            update_flat(self.kernels, self.config, target, table, update, self.optimizer, view)
            state.count = view.count
        else:
            update_flat(self.kernels, self.config, target, table, update, self.optimizer, state)
        if state is not None:
            self.opt_state.updated(unit)

    def _pair_buffers(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device),
                torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device))

    def _apply_to_unit(self, unit: Unit, update: Update) -> None:
        if unit.applied < update.step:
            with self._visit(unit, update):
                pass

    # ------------------------------------------------------------------ forwards
    @contextlib.contextmanager
    def _swapped(self, unit: Unit, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Make the unit's modules read ``values[name]`` instead of their parameters, then restore them."""
        saved = [(s, s.module._parameters[s.attr]) for s in unit.slots]
        try:
            for s in unit.slots:
                s.module._parameters[s.attr] = values[s.name]
            yield
        finally:
            for s, p in saved:
                s.module._parameters[s.attr] = p

    def _point_values(self, unit: Unit, flat: torch.Tensor, pairs: Mapping, point: Point) -> dict[str, torch.Tensor]:
        """Parameter views of the unit's buffer at ``point`` (θ, θ + εz, θ − εz, or θ after a candidate update)."""
        if point.after is not None:
            buf = self._candidate(unit, flat, point.after)
        elif not point.terms:
            buf = flat if flat.dtype == self.compute_dtype else flat.to(self.compute_dtype)
        elif self.plan.one_copy:
            # θ ± εz as the update θ − 1·((∓ε) z): the same float operations as perturb_pair, one copy at a time
            (seed, sign), = point.terms
            buf = torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device)
            self.kernels.update(flat, unit.table, [seed], [-sign * self.config.eps], 1.0, 0.0,
                                self.config.distribution, out=buf)
        else:
            (seed, sign), = point.terms
            buf = pairs[seed][0 if sign > 0 else 1]
        return {seg.name: buf[seg.offset : seg.offset + seg.numel].view(seg.shape) for seg in unit.layout}

    def _candidate(self, unit: Unit, flat: torch.Tensor, update: Update) -> torch.Tensor:
        """θ after ``update``, out of place: exactly the values applying it would store, in the compute dtype."""
        out = torch.empty(flat.numel(), dtype=flat.dtype, device=flat.device)
        self.kernels.update(flat, unit.table, update.seeds, update.coeffs, update.lr, self.config.weight_decay,
                            self.config.distribution, stochastic_rounding_seed=self._rounding_seed(update, flat.dtype),
                            out=out)
        return out if out.dtype == self.compute_dtype else out.to(self.compute_dtype)

    def _run(self, batch: Mapping[str, torch.Tensor], points: Sequence[Point], pending: Update | None,
             keep_logits: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run every point through the units in order; apply ``pending`` to each unit on its visit."""
        hidden: list[Any] = [None] * len(points)
        losses: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []
        ctx: list[Any] = [None] * len(points)  # per point: a prefix-tuned model's holds that point's prefixes
        seeds = list(dict.fromkeys(seed for p in points for seed, _ in p.terms))
        shared: list[dict[str, torch.Tensor]] = [{} for _ in points]  # tied weights, read again by the head
        if self.streamer is not None:
            self.streamer.begin([u.store_index for u in self.units if u.store_index is not None])
        if pending is not None:
            self.opt_state.begin(self.units)  # the state streams with the weights when an update is applied
        for unit in self.units:
            with self._visit(unit, pending, seeds) as (flat, pairs), self._frozen_weights(unit):
                for i, point in enumerate(points):
                    values = self._point_values(unit, flat, pairs, point)
                    shared[i].update({n: v for n, v in values.items() if n in self._shared_names})
                    values.update({s.name: shared[i][s.name] for s in unit.slots if s.name not in values})
                    with self._swapped(unit, values):
                        if unit.kind == "embed":
                            hidden[i], ctx[i] = self.adapter.embed(batch["input_ids"], batch.get("attention_mask"))
                        elif unit.kind == "block":
                            hidden[i] = self.adapter.block(unit.index, hidden[i], ctx[i])
                        else:
                            logits = self.adapter.head(hidden[i], ctx[i])
                            # .double() is exact for any dtype and keeps float64 checks exact
                            losses.append(self.loss_fn(logits, batch).detach().double().reshape(()))
                            if keep_logits:
                                logits_out.append(logits)
                            hidden[i] = ctx[i] = None
                    del values  # frees this point's perturbed copy before the next one is formed
            if unit is self._last_streamed:
                self.streamer.prefetch_next_pass()  # overlaps the remaining blocks and the head
        return losses, logits_out

    def _frozen_weights(self, unit: Unit) -> contextlib.AbstractContextManager:
        """A streamed block's frozen weights (e.g. the base model under LoRA), read from the device copy uploaded
        with the block: never perturbed, updated or written back. Nothing to do for a resident unit."""
        if unit.store_index is None:
            return contextlib.nullcontext()
        return self.streamer.frozen_weights(unit.store_index)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """One ZO step on ``batch`` (input_ids, attention_mask, labels)."""
        start = time.perf_counter()
        step = self.step_count
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        points = self.estimator.points(step)
        n_estimator = len(points)
        if self.optimizer.conservative and all(p.terms for p in points):
            points = points + [Point(())]  # L(θ), which the conservative step compares its candidates with
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        losses = self._point_losses(batch, points, self.pending)
        self.pending = None
        lr = self.lr_at(step)
        self.step_count += 1
        finite = all(math.isfinite(x) for x in losses)
        if finite:
            est = self.estimator.combine(step, losses[:n_estimator], lr)
            update = est.update
            if self.optimizer.conservative:
                base = losses[next(i for i, p in enumerate(points) if not p.terms)]
                update, tried = self._conservative(batch, update, base)
                losses = losses + tried
        transfer = self.streamer.collect_stats() if self.streamer is not None else TransferStats()
        self.last_transfer = transfer = self.opt_state.add_stats(transfer)
        measured = dict(bytes_h2d=transfer.bytes_h2d, bytes_d2h=transfer.bytes_d2h, transfer_wait_ms=transfer.wait_ms,
                        peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else 0)
        if not finite:
            nan = float("nan")
            return StepResult(step, nan, nan, nan, nan, lr, True, None, tokens, time.perf_counter() - start, losses,
                              **measured)
        if self.config.deferred_update:
            self.pending = update
        else:
            self.apply_update(update)
        return StepResult(step, est.loss, est.loss_plus, est.loss_minus, est.projected_grad, lr, False, update,
                          tokens, time.perf_counter() - start, losses, **measured)

    def _point_losses(self, batch: Mapping[str, torch.Tensor], points: Sequence[Point], pending: Update | None
                      ) -> list[float]:
        """Every point's loss on ``batch`` (under torchrun: this rank's share evaluated, the others gathered)."""
        mine = self.comm.my_points(len(points)) if self.comm else list(range(len(points)))
        losses_t, _ = self._run(self._to_device(batch), [points[i] for i in mine], pending)
        if self.comm is not None:  # every point's loss over the global batch (one small all-reduce)
            return self.comm.combine(losses_t, mine, len(points), loss_weight(self.loss_fn, batch))
        return torch.stack(losses_t).tolist()  # host sync: the loss scalars, once per pass

    def _conservative(self, batch: Mapping[str, torch.Tensor], update: Update, loss: float
                      ) -> tuple[Update, list[float]]:
        """zo-sgd-conservative: the losses of θ − lr(ĝ + λθ) and θ + lr(ĝ + λθ) on the same batch (one more
        pass); the step keeps the best of those and θ (loss ``loss``) as ``update`` with lr scaled by 1, −1 or 0,
        so the trajectory log replays the choice."""
        tried = self._point_losses(batch, [Point((), after=update), Point((), after=replace(update, lr=-update.lr))],
                                   None)
        return replace(update, lr=update.lr * conservative_scale(loss, *tried)), tried

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending deferred update now; afterwards ``model`` holds the current weights."""
        if self.pending is not None:
            for unit in self.units:
                self._apply_to_unit(unit, self.pending)
            self.pending = None
        self.opt_state.synchronize()
        if self.streamer is not None:
            self.streamer.synchronize()
            if self.streamer.take_issued() and self.streamer.ranges:
                # every process's slice (and its state's) is back in the shared store. Only after write-backs,
                # which every process of the node issues alike: a flush with nothing written since the last one
                # (rank 0's trainable_state after the collective flush of a snapshot) enters no barrier the others
                # skip.
                self.comm.local_barrier()

    @torch.no_grad()
    def sync_store(self) -> None:
        """With a node store (zo2.control): flush, then write every resident unit back to the store (this
        process's slice of it when several workers share the node), so the store holds the current weights and
        the scheduler can snapshot them. Streamed units are written back on every visit already."""
        self.flush()
        if self.store_spec is None:
            return
        writer = self.store_writer
        for unit in self.units:
            if unit.store_index is not None or unit.flat is None:
                continue
            dst = self.store.flat(unit.home)
            lo, hi = share_bounds(dst.numel(), writer, self.store_spec.writers)
            hi = min(hi, unit.flat.numel())  # the resident copy is not padded
            self.markers.begin(unit.home, writer, unit.applied)
            if hi > lo:
                dst[lo:hi].copy_(unit.flat[lo:hi])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the bytes are in the store before the marker says so
            self.markers.done(unit.home, writer, unit.applied)
        if self.state_area is not None:
            self.opt_state.save_area(lambda n: share_bounds(n, writer, self.store_spec.writers))
        if self.comm is not None:
            self.comm.local_barrier()

    @torch.no_grad()
    def apply_update(self, update: Update) -> None:
        """Apply ``update`` to every parameter (replay of a logged step), flushing any pending one first."""
        self.flush()
        for unit in self.units:
            self._apply_to_unit(unit, update)
        if self.streamer is not None:
            self.streamer.synchronize()
        self.opt_state.synchronize()

    @torch.no_grad()
    def evaluate(self, batch: Mapping[str, torch.Tensor]) -> EvalResult:
        """Loss and logits at the current, unperturbed parameters."""
        self.flush()
        losses, logits = self._run(self._to_device(batch), [Point(())], None, keep_logits=True)
        return EvalResult(float(losses[0]), logits[0])  # host sync: the reported loss

    def perturbation(self, step: int, direction_index: int = 0) -> dict[str, torch.Tensor]:
        """The direction z of step ``step`` (direction ``direction_index`` of q), keyed by parameter name."""
        seed = self.estimator.seeds(step)[direction_index]
        return {n: self._z(n, seed).view(p.shape) for n, p in self.params.items()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the current trainable parameters (after a flush), by name, plus the optimizer's state
        (:meth:`optimizer_state`) for zo-sgd-momentum and zo-adam: what a snapshot must hold for the trajectory
        log's later steps to replay bit-exactly on it."""
        self.flush()
        tensors = {n: p.detach().clone() for n, p in self.params.items()}
        tensors.update(self.opt_state.state_dict())
        return tensors

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """A copy of the optimizer's state (after a flush): ``optimizer/<buffer>/<parameter>`` tensors shaped like
        the parameters and ``optimizer/step``, the updates applied so far (Adam's t). Empty when stateless."""
        self.flush()
        return self.opt_state.state_dict()

    @torch.no_grad()
    def load_optimizer_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`optimizer_state` returned (extra keys are ignored); CheckpointError when a stateful
        optimizer's tensors are missing."""
        self.flush()
        self.opt_state.load_state_dict(tensors)

    @torch.no_grad()
    def load_trainable_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(tensors)
        if missing:
            raise CheckpointError(f"The saved weights lack {len(missing)} parameters, e.g. {sorted(missing)[:3]}; "
                                  "they were saved from a different model.")
        self.pending = None
        self.invalidate_prefetch()
        self.opt_state.load_state_dict(tensors)  # stateful optimizers: the snapshot's state, or CheckpointError
        for n, p in self.params.items():
            if tensors[n].shape != p.shape:
                raise CheckpointError(f"Saved parameter {n} has shape {tuple(tensors[n].shape)}, the model's is "
                                      f"{tuple(p.shape)}: the checkpoint belongs to a different model shape.")
            p.data.copy_(tensors[n])  # streamed blocks' parameters are views of the store: this fills it

    @torch.no_grad()
    def checksum(self) -> float:
        """A float64 sum over every trainable weight (after a flush): equal on replicas that stayed identical."""
        self.flush()
        return float(sum(p.detach().double().sum() for p in self.params.values()))  # host sync, rare

    def invalidate_prefetch(self) -> None:
        """Call after writing streamed weights from the host (e.g. ``model.load_state_dict``): device copies
        uploaded ahead for the next step are dropped. ``load_trainable_state`` and the loaders call it."""
        if self.streamer is not None:
            self.streamer.invalidate()
        self.opt_state.invalidate()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.flush()
        self.step_count = int(state["step"])
        for unit in self.units:
            unit.applied = self.step_count - 1

    def save(self, path: str | Path) -> None:
        """Write the current weights (safetensors) and the engine state (JSON) to the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous().cpu() for n, t in self.trainable_state().items()}
        save_file(tensors, str(path / "weights.safetensors"))
        meta = {"state": self.state_dict(), "config": asdict(self.config)}
        (path / "engine.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, config: ZOConfig | None = None,
             loss_fn: LossFn | None = None) -> "ZOEngine":
        """An engine on ``model`` with the weights and state saved by :meth:`save` in ``path``."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "engine.json").is_file() or not (path / "weights.safetensors").is_file():
            raise CheckpointError(f"{path} is not a saved zo2 engine (engine.json and weights.safetensors are "
                                  "expected there); pass the folder given to ZOEngine.save.")
        meta = json.loads((path / "engine.json").read_text())
        engine = cls(model, config or ZOConfig(**meta["config"]), loss_fn=loss_fn)
        engine.load_trainable_state(load_file(str(path / "weights.safetensors"), device=str(engine.device)))
        engine.load_state_dict(meta["state"])
        return engine

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

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from zo2.config.zo import ZOConfig, torch_dtype
from zo2.errors import CheckpointError, ModelError
from zo2.models.base import adapter_for
from zo2.models.losses import LossFn, default_loss, loss_weight
from zo2.models.units import build_units
from zo2.offload.build import OffloadInputs, build_offload
from zo2.offload.residence import DeviceResidence, set_writeback_every
from zo2.offload.store import Deferred
from zo2.offload.streamer import TransferStats
from zo2.optim.decay import skips_decay
from zo2.optim.estimators import Point, Update, build_estimator
from zo2.optim.optimizers import build_optimizer, check_supported, conservative_scale
from zo2.optim.rng import direction, param_key
from zo2.optim.schedule import lr_at
from zo2.parallel.plan_memory import activation_bytes, working_bytes
from zo2.points import PointsForward, PointValues, check_called, groups_of
from zo2.results import EvalResult, StepResult
from zo2.visit import Visitor

log = logging.getLogger("zo2.engine")

if TYPE_CHECKING:
    from zo2.parallel.mesh import ZOComm


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """zo2's default rule (optim.no_decay = 'norms_and_biases'): no weight decay on biases and norm weights."""
    return skips_decay(name, param)


class ZOEngine:
    """Zeroth-order fine-tuning of ``model`` (a transformers causal LM) with the settings of ``config``."""

    def __init__(self, model: nn.Module, config: ZOConfig | None = None, *, loss_fn: LossFn | None = None,
                 comm: "ZOComm | None" = None, store_spec: Any = None, offload_config: Any = None):
        """``offload_config``: the job's ``[offload]`` section (zo2.config.offload.OffloadConfig): the host memory
        budget and the NVMe tier of streamed blocks; None: the default host budget, no NVMe tier."""
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
        """Whether weight decay applies to each parameter (the ``optim.no_decay`` rule, zo2.optim.decay)."""
        self.units = build_units(self.adapter, self.params, type(model).__name__)
        self.estimator = build_estimator(self.config.estimator, self.config.seed, self.config.eps, self.config.q)
        self.optimizer = build_optimizer(self.config)
        self.step_count = 0
        self.pending: Update | None = None
        self.device = self._compute_device()
        self.store_spec = store_spec
        """A node store to map (zo2.control.store.StoreSpec): every unit lives in the scheduler's shared store."""
        check_supported(self.optimizer, comm=comm)
        inputs = OffloadInputs(self.model, self.adapter, self.params, self.units, self.config, self.compute_dtype,
                               self.optimizer, comm, store_spec, offload_config)
        offload = build_offload(inputs, self.device)  # every unit's residence (unit.residence), from the plan
        self.plan, self.store, self.streamer = offload.plan, offload.store, offload.streamer
        self.residences = offload.residences
        self.state_area = offload.state_area
        """With a node store and a stateful optimizer: the scheduler's state area (zo2.offload.state.StateArea),
        from which streamed blocks' state streams (sliced like the weights) and resident units' is synced."""
        self.opt_state = offload.opt_state
        """The optimizer's per-unit state (zo2.offload.state): empty for stateless optimizers."""
        self.kernels = offload.kernels
        self.visitor = Visitor(self.config, self.kernels, self.optimizer, self.opt_state)
        self.point_values = PointValues(self.config, self.kernels, self.compute_dtype)
        self._groups = {u.name: groups_of(u) for u in self.units}
        """The modules holding each unit's parameters, with their ranges of its flat buffer (zo2.points)."""
        self._tied_at: dict[str, tuple[torch.Tensor, int, int, Any, tuple[int, ...]]] = {}
        """Tied weights' owner buffer, range, table and shape (:meth:`_tied`)."""
        self._reached: set[str] = set()
        """Units whose every parameter-holding module was called in a pass (zo2.points.check_called)."""
        self.last_transfer: TransferStats | None = None
        self.writeback_probe = offload.writeback_probe
        """``optim.writeback_every = 'auto'`` on a GPU: deciding K from the first steps' upload waits."""

    def _probe_writeback(self, step_s: float, wait_ms: float) -> None:
        """Feed ``optim.writeback_every = 'auto'``'s probe one step; once it decides, every streamed residence
        writes back every K steps from now on (values do not depend on K)."""
        probe = self.writeback_probe
        k = probe.observe(step_s, wait_ms)
        if k is None:
            return
        self.writeback_probe = None
        set_writeback_every(self.plan, self.residences, k)
        why = "the link is the bottleneck" if k > 1 else "the forwards outlast the transfers"
        log.info("optim.writeback_every = 'auto': the compute stream waited for uploads %.1f%% of the measured "
                 "steps, %s: blocks are written back every %d steps", 100 * probe.share, why, k)

    def describe_plan(self, rows: int | None = None, seq: int | None = None) -> str:
        """The residency plan as text; with a batch of ``rows`` × ``seq`` tokens, also the peak with its
        activations (zo2.parallel.plan_memory.activation_bytes: the number ``zo2 plan`` predicts)."""
        if rows is None or seq is None:
            return self.plan.describe()
        cfg = self.model.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        ffn = (getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", None)
               or getattr(cfg, "n_inner", None) or 4 * (hidden or 0))
        vocab = getattr(cfg, "vocab_size", None)
        if not hidden or not vocab:
            return self.plan.describe()
        n = len(self.estimator.points(0))
        copies = len(self.comm.my_points(n)) if self.comm is not None else n
        tokens = rows * seq // (self.comm.dims.dp if self.comm is not None else 1)  # this rank's shard
        size = torch.empty((), dtype=self.compute_dtype).element_size()
        act_block, logits, loss = activation_bytes(hidden, ffn, vocab, tokens, copies, size)
        return self.plan.describe(activations=(f"{rows}x{seq}", lambda block, reserve: working_bytes(
            block, reserve, act_block, logits, loss)))

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

    def _compute_device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        device = next(iter(self.params.values())).device
        if device.type == "meta":
            raise ModelError("The model is on the meta device; set optim.device (e.g. 'cuda') so the engine knows "
                             "where to compute, and load the weights into the parameter store.")
        return device

    # ------------------------------------------------------------------ the math on one tensor
    def lr_at(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.lr, c.lr_schedule, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def _z(self, name: str, seed: int) -> torch.Tensor:
        return direction(seed, self.keys[name], self.params[name].numel(), distribution=self.config.distribution,
                         device=self.device)

    # ------------------------------------------------------------------ forwards
    def _run(self, batch: Mapping[str, torch.Tensor], points: Sequence[Point], pending: Update | None,
             keep_logits: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run every point through the units in order as one batch (point i on rows [i·B, (i+1)·B), zo2.points);
        apply ``pending`` to each unit on its visit."""
        n, rows = len(points), batch["input_ids"].shape[0]
        ids, mask = _repeat(batch["input_ids"], n), _repeat(batch.get("attention_mask"), n)
        forward = PointsForward(self.point_values, points, rows)
        hidden: Any = None
        ctx: Any = None
        losses: list[torch.Tensor] = []
        logits_out: list[torch.Tensor] = []
        for residence in self.residences:
            residence.begin_pass(self.units)
        if pending is not None:
            self.opt_state.begin(self.units)  # the state streams with the weights when an update is applied
        for unit in self.units:
            with (self.visitor.visit(unit, pending) as flat, unit.residence.frozen_weights(unit),
                  forward.installed(self._groups[unit.name], flat, self._tied)):
                if unit.kind == "embed":
                    hidden, ctx = self.adapter.embed(ids, mask)
                elif unit.kind == "block":
                    hidden = self.adapter.block(unit.index, hidden, ctx)
                else:  # one point at a time: one point's logits exist at once
                    for i in range(n):
                        with forward.at(i):
                            logits = self.adapter.head(hidden[i * rows : (i + 1) * rows], ctx)
                        # .double() is exact for any dtype and keeps float64 checks exact
                        losses.append(self.loss_fn(logits, batch).detach().double().reshape(()))
                        if keep_logits:
                            logits_out.append(logits)
                        del logits
                    hidden = ctx = None
            if unit.name not in self._reached:  # its first pass: every parameter-holding module was called
                check_called(unit.name, self._groups[unit.name], forward.called)
                self._reached.add(unit.name)
            unit.residence.after_visit(unit)  # a streamed pass's last block starts the next pass's uploads
        return losses, logits_out

    def _tied(self, name: str) -> tuple[torch.Tensor, int, int, Any, tuple[int, ...]]:
        """Where a parameter read by one unit and owned by another (a tied weight) is formed from: the owner's
        buffer (resident), the range and segment table of the parameter there, its shape. Found once: the
        kernels keep a table's device copy, so the same table serves every step."""
        found = self._tied_at.get(name)
        if found is None:
            owner = next(u for u in self.units if name in u.owned)
            seg = next(s for s in owner.layout if s.name == name)
            if owner.flat is None:
                raise ModelError(f"{name} is read by two units and its owner {owner.name} is streamed; tied "
                                 "weights need their owner resident on the compute device.")
            lo, hi = seg.offset, seg.offset + seg.numel
            found = self._tied_at[name] = (owner.flat, lo, hi, owner.table.slice(lo, hi), tuple(seg.shape))
        return found

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
        transfer = TransferStats()
        for residence in self.residences:
            transfer.add(residence.collect_stats()).add(residence.frozen_stats())
        self.last_transfer = transfer = self.opt_state.add_stats(transfer)
        if self.writeback_probe is not None:
            self._probe_writeback(time.perf_counter() - start, transfer.wait_ms)
        measured = dict(bytes_h2d=transfer.bytes_h2d, bytes_d2h=transfer.bytes_d2h, transfer_wait_ms=transfer.wait_ms,
                        bytes_disk_read=transfer.bytes_disk_read, bytes_disk_written=transfer.bytes_disk_written,
                        replays=transfer.replays,
                        peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else 0)
        if not finite:
            nan = float("nan")
            return StepResult(step, nan, nan, nan, nan, lr, True, None, tokens, time.perf_counter() - start, losses,
                              **measured)
        if self.config.deferred_update:
            self.pending = update
            self.visitor.remember(update)
        else:
            self.apply_update(update)
        self.visitor.forget_before(min(u.residence.held(u) for u in self.units))
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
        """Apply the pending deferred update now and write every lagging home copy; afterwards ``model`` holds
        the current weights."""
        for unit in self.units:
            self.visitor.settle(unit, self.pending)
        self.pending = None
        self.visitor.history.clear()  # every home copy holds every update now
        self.opt_state.synchronize()
        for residence in self.residences:
            residence.synchronize()
        if any([r.take_issued() for r in self.residences]):  # asks each (and resets its count)
            # every process's slice (and its state's) is back in the shared store. Only after write-backs,
            # which every process of the node issues alike: a flush with nothing written since the last one
            # (rank 0's trainable_state after the collective flush of a snapshot) enters no barrier the others
            # skip.
            self.comm.local_barrier()

    @torch.no_grad()
    def sync_store(self) -> None:
        """With a node store (zo2.control): flush, then write every resident unit back to the store (this
        process's slice of it when several workers share the node), so the store holds the current weights and
        the scheduler can snapshot them. Streamed units are home after the flush (it writes every lagging one)."""
        self.flush()
        if self.store_spec is None:
            return
        for unit in self.units:
            unit.residence.sync_home(unit)
        if self.state_area is not None:
            resident = next(r for r in self.residences if isinstance(r, DeviceResidence))
            self.opt_state.save_area(resident.share)  # this process's share of each unit's state
        if self.comm is not None:
            self.comm.local_barrier()

    @torch.no_grad()
    def apply_update(self, update: Update) -> None:
        """Apply ``update`` to every parameter (replay of a logged step), flushing any pending one first."""
        self.flush()
        self.visitor.remember(update)
        for unit in self.units:
            self.visitor.apply(unit, update)
        for residence in self.residences:
            residence.synchronize()
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
        log's later steps to replay bit-exactly on it. (A snapshot writer takes :meth:`snapshot_tensors`, which
        copies nothing.)"""
        return {n: _loaded(t).clone() for n, t in self.snapshot_tensors().items()}

    def snapshot_tensors(self) -> dict[str, torch.Tensor | Deferred]:
        """What :meth:`trainable_state` holds, without copies (after a flush; valid until the next step): the
        parameters themselves (resident ones on the device, streamed ones views of the host store), the NVMe
        tier's as :class:`~zo2.offload.store.Deferred` reads of their files. A snapshot writer copies one tensor
        at a time, so a model larger than host memory can be saved."""
        home = self.home_weights()
        tensors: dict[str, torch.Tensor | Deferred] = {n: home.get(n, p.detach()) for n, p in self.params.items()}
        tensors.update(self.opt_state.tensors())
        return tensors

    def home_weights(self) -> dict[str, Deferred]:
        """The weights only a residence holds (their parameters are not views of home: the NVMe tier's), each read
        when loaded (after a flush; valid until the next step): one unit in host memory at a time."""
        self.flush()
        tensors: dict[str, Deferred] = {}
        for residence in self.residences:
            tensors.update(residence.deferred_weights())
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
        shape_of = getattr(tensors, "shape_of", lambda n: tuple(tensors[n].shape))  # a lazy snapshot reads no data
        for n, p in self.params.items():
            if tuple(shape_of(n)) != tuple(p.shape):
                raise CheckpointError(f"Saved parameter {n} has shape {tuple(shape_of(n))}, the model's is "
                                      f"{tuple(p.shape)}: the checkpoint belongs to a different model shape.")
        written = set().union(*(r.load_weights(tensors) for r in self.residences))  # the NVMe tier's files
        for n, p in self.params.items():
            if n not in written:
                p.data.copy_(tensors[n])  # streamed blocks' parameters are views of the store: this fills it

    @torch.no_grad()
    def checksum(self) -> float:
        """A float64 sum over every trainable weight (after a flush): equal on replicas that stayed identical."""
        tensors = self.snapshot_tensors()
        return float(sum(_loaded(tensors[n]).double().sum() for n in self.params))  # host sync, rare

    def close(self) -> None:
        """End of the run: the NVMe tier finishes its I/O, lets its folder go and removes the files no run resumes
        from (a PEFT base's, refilled at every start; a stateful optimizer's state of the NVMe-homed blocks); the
        trainable units' files stay for a resume. The engine is not used afterwards. Idempotent; without an NVMe
        tier it does nothing."""
        self.opt_state.close()  # the NVMe-homed blocks' optimizer state files, while the folder is still held
        for residence in self.residences:
            close = getattr(residence, "close", None)
            if close is not None and not getattr(residence, "closed", False):
                residence.closed = True
                close()

    def invalidate_prefetch(self) -> None:
        """Call after writing streamed weights from the host (e.g. ``model.load_state_dict``): device copies
        uploaded ahead for the next step are dropped. ``load_trainable_state`` and the loaders call it."""
        for residence in self.residences:
            residence.invalidate()
        self.opt_state.invalidate()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.flush()
        self.step_count = int(state["step"])
        for unit in self.units:
            unit.applied = self.step_count - 1
        for residence in self.residences:
            residence.invalidate()  # home holds what the units now say they hold

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


def _repeat(tensor: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``tensor``'s rows n times over (point i's copy of the batch at rows [i·B, (i+1)·B))."""
    if tensor is None or n == 1:
        return tensor
    return tensor.repeat(n, *([1] * (tensor.dim() - 1)))


def _loaded(t: torch.Tensor | Deferred) -> torch.Tensor:
    return t.load() if isinstance(t, Deferred) else t

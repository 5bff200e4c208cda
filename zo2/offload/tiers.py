"""The tiers below the device: which streamed blocks keep their home in pinned host memory and which in files on
an NVMe disk (DESIGN.md §2b).

The residency planner (zo2.offload.planner) chooses the blocks resident on the device under
``optim.gpu_memory_budget``; :func:`place_tiers` then homes the streamed ones in pinned host memory, in order,
while they fit ``offload.host_memory_budget`` (the NVMe tier's staging buffers count against it), and the rest in
files under ``offload.nvme_path``. Without an NVMe folder, streamed blocks beyond the host budget are a
ResourceError with the numbers and the fix.
"""

from __future__ import annotations

from typing import Any, NoReturn

import psutil

from zo2.errors import ConfigError, ResourceError
from zo2.offload.nvme import round_up
from zo2.offload.planner import Plan, stream_slots
from zo2.offload.store import HOST_MARGIN_BYTES


def default_host_budget() -> int:
    """What psutil reports available minus HOST_MARGIN_BYTES (2 GiB): the host store's own check, so a model that
    fits it is never refused here."""
    return int(psutil.virtual_memory().available - HOST_MARGIN_BYTES)


def staging_buffers(prefetch: int) -> int:
    """Pinned staging buffers of the NVMe tier: ``prefetch`` + 1 reads ahead and one write-back."""
    return prefetch + 2


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def place_tiers(plan: Plan, host_budget: int | None, nvme_path: str | None, prefetch: int) -> Plan:
    """Split ``plan.streamed`` between pinned host memory and NVMe (``plan.nvme``) under ``host_budget`` bytes
    (None: :func:`default_host_budget`); returns ``plan``, updated.

    Streamed by block with blocks in both tiers, the NVMe tier's streamer has device slots of its own (one matrix
    at a time, the two tiers share one ring): :func:`count_tier_slots` adds them to ``plan.slot_bytes``, and where
    that passes the device budget, resident blocks stream instead (a ResourceError with the fix when none is
    left)."""
    while True:
        _split(plan, host_budget, nvme_path, prefetch)
        if not count_tier_slots(plan) or plan.budget is None or plan.expected_peak <= plan.budget:
            return plan
        if not plan.resident:
            raise ResourceError(
                f"With {len(plan.host)} streamed blocks in pinned host memory and {len(plan.nvme)} on NVMe, block "
                f"streaming takes two sets of device slots ({_gb(plan.slot_bytes)}), and the expected peak "
                f"{_gb(plan.expected_peak)} passes the device budget of {_gb(plan.budget)}. Set "
                "optim.stream_granularity = 'matrix' (the two tiers then share one ring of matrices), raise "
                "optim.gpu_memory_budget, or raise offload.host_memory_budget so every streamed block fits there.")
        plan.streamed = sorted(plan.streamed + [plan.resident.pop()])


def count_tier_slots(plan: Plan) -> bool:
    """Block streaming with blocks in both tiers: set ``plan.slot_bytes`` to both streamers' slots (each
    :func:`~zo2.offload.planner.stream_slots` of its largest block); whether it did."""
    if plan.granularity != "block" or not plan.nvme or not plan.host:
        return False
    plan.slot_bytes = stream_slots(plan.prefetch) * (max(plan.block_bytes[i] for i in plan.host)
                                                     + max(plan.block_bytes[i] for i in plan.nvme))
    return True


def _split(plan: Plan, host_budget: int | None, nvme_path: str | None, prefetch: int) -> None:
    """:func:`place_tiers`' split of ``plan.streamed`` (``plan.nvme``, ``host_budget``, ``staging_bytes``)."""
    plan.nvme, plan.staging_bytes = [], 0
    streamed = plan.streamed
    need = sum(plan.block_bytes[i] for i in streamed)
    explicit = host_budget is not None
    budget = host_budget if explicit else default_host_budget()
    plan.host_budget = budget
    if need <= budget or not streamed:
        return
    where = "offload.host_memory_budget" if explicit else "what psutil reports available, minus a margin"
    if nvme_path is None:
        raise ResourceError(
            f"The {len(streamed)} streamed blocks need {_gb(need)} of pinned host memory, but the host budget is "
            f"{_gb(budget)} ({where}). Set [offload] nvme_path to a folder on a local NVMe disk to keep the blocks "
            "that do not fit there, raise offload.host_memory_budget, or use a smaller storage dtype "
            "(optim.storage_dtype = 'bf16' halves fp32).")
    staging = staging_buffers(prefetch) * round_up(max(plan.block_bytes[i] for i in streamed))
    room = budget - staging
    if room < 0:
        raise ResourceError(
            f"The host budget of {_gb(budget)} ({where}) cannot hold the NVMe tier's {staging_buffers(prefetch)} "
            f"staging buffers of the largest block ({_gb(staging)}). Raise offload.host_memory_budget or lower "
            "optim.prefetch.")
    host: list[int] = []
    for i in streamed:
        if plan.block_bytes[i] > room:
            break
        room -= plan.block_bytes[i]
        host.append(i)
    plan.nvme = streamed[len(host):]
    plan.staging_bytes = staging
    plan.nvme_path = nvme_path


def place_tiers_for(inputs: Any, plan: Plan, frozen: list, creates_store: bool) -> Plan:
    """:func:`place_tiers` for an engine's offload inputs (zo2.offload.build.OffloadInputs: its ``tiers`` are the
    ``[offload]`` section) where this process creates the host store (``creates_store``), and on every process of
    a torchrun node with an NVMe tier (the first one's budget shared); the NVMe tier's limits as ConfigErrors.
    ``frozen``: the frozen parameters of each block."""
    tiers = inputs.tiers
    nvme_path = getattr(tiers, "nvme_path", None)
    if inputs.store_spec is not None:
        return _node_tiers(inputs, plan, frozen)
    budget = getattr(tiers, "host_budget_bytes", None)
    comm = inputs.comm
    if nvme_path is not None and comm is not None and comm.local_size > 1:
        if not inputs.config.sliced_transfers:
            raise ConfigError(f"offload.nvme_path with {comm.local_size} processes per node needs "
                              "optim.sliced_transfers = true: the node's processes share one copy of the NVMe files, "
                              "each process moving its slice of every block.")
        if budget is None:  # every process places the blocks alike, by the first one's measure
            budget = comm.local_share(default_host_budget(), "agreeing on the host memory budget")
    elif not creates_store:
        return plan  # a torchrun node's first process checks its store
    plan = place_tiers(plan, budget, nvme_path, inputs.config.prefetch)
    if plan.nvme and any(frozen[i] for i in plan.nvme) and comm is not None and comm.local_size > 1:
        refuse_base_on_nvme(f"{comm.local_size} processes per node")
    return plan


def refuse_base_on_nvme(processes: str) -> NoReturn:
    """The ConfigError of a PEFT base past the host budget with ``processes`` (e.g. '2 workers per node'): the
    NVMe tier holds one process's own base files only."""
    raise ConfigError("offload.nvme_path: the NVMe tier holds a PEFT model's frozen base weights with one process "
                      f"per node (zo2 train, or zo2 launch with one worker), but with {processes} the blocks that "
                      "do not fit offload.host_memory_budget have frozen parameters. Raise "
                      "offload.host_memory_budget, or run one process per node (one worker per node under zo2 "
                      "launch).")


def _node_tiers(inputs: Any, plan: Plan, frozen: list) -> Plan:
    """Under the scheduler: the blocks its node store homes on NVMe (the spec's ``nvme_units``, unit indices) are
    ``plan.nvme``; one the device plan would keep resident streams instead (a resident unit is mirrored to a node
    store in host memory at sync points, and its home is a file)."""
    spec = inputs.store_spec
    homes = set(getattr(spec, "nvme_units", ()))
    if not homes:
        return plan
    block_units = [k for k, u in enumerate(inputs.units) if u.kind == "block"]
    on_nvme = [i for i, k in enumerate(block_units) if k in homes]
    if any(frozen[i] for i in on_nvme) and spec.writers > 1:
        refuse_base_on_nvme(f"{spec.writers} workers per node")
    moved = [i for i in plan.resident if i in set(on_nvme)]
    if moved:
        plan.resident = [i for i in plan.resident if i not in set(moved)]
        plan.streamed = sorted(plan.streamed + moved)
    plan.nvme, plan.nvme_path = on_nvme, spec.nvme_path
    largest = max(plan.block_bytes[i] for i in on_nvme)
    plan.staging_bytes = staging_buffers(inputs.config.prefetch) * round_up(-(-largest // spec.writers))
    count_tier_slots(plan)
    return plan

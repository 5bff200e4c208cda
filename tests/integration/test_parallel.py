"""Perturbation parallelism, ZO data parallelism and 2D on CPU (gloo, spawned processes) against one process."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zo2 import ZOConfig, ZOEngine
from zo2.config.parallel import ParallelConfig
from zo2.errors import ConfigError
from zo2.parallel.mesh import DivergenceError, ParallelDims, RankFailure, ZOComm
from zo2_testing import padded_batch, tiny_model

STEPS = 3
CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=13)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    return padded_batch(seed=100 + step, batch=4, length=10)


def _model(lora: bool = False):
    """The tiny Llama every run trains, or that model wrapped in LoRA (random adapter weights, B ≠ 0)."""
    model = tiny_model("llama", seed=2)
    if not lora:
        return model
    import peft

    torch.manual_seed(102)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                                       target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _worker(rank: int, world: int, port: int, dp: int, pp: int, cfg: dict, out: str, die_at: int,
            corrupt: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=30))
    try:
        comm = ZOComm(ParallelDims(dp, pp), rank)
        cfg = dict(cfg)
        engine = ZOEngine(_model(cfg.pop("lora", False)), ZOConfig(**cfg), comm=comm)
        results = []
        for step in range(STEPS):
            if step == die_at and rank == world - 1:
                os._exit(1)  # a rank dies mid-run
            batch = _global_batch(step)
            shard = batch["input_ids"].shape[0] // dp
            rows = slice(comm.dp_rank * shard, (comm.dp_rank + 1) * shard)
            start = time.monotonic()
            try:
                r = engine.step({k: v[rows] for k, v in batch.items()})
            except RankFailure as err:
                torch.save({"error": str(err), "seconds": time.monotonic() - start}, f"{out}.{rank}")
                return
            results.append(r.losses)
        if corrupt and rank == 1:
            with torch.no_grad():
                next(iter(engine.params.values())).add_(1e-3)  # one replica drifts
        try:
            comm.check_replicas(engine.checksum(), STEPS)
        except DivergenceError as err:
            torch.save({"error": str(err)}, f"{out}.{rank}")
            return
        moved = engine.last_transfer
        torch.save({"losses": results, "params": engine.trainable_state(),
                    "h2d": moved.bytes_h2d if moved else 0, "d2h": moved.bytes_d2h if moved else 0,
                    "store_bytes": engine.store.nbytes if engine.store else 0,
                    "store_files": len(engine.store._paths) if engine.store else 0,
                    "granularity": engine.plan.granularity, "frozen": _frozen_store(engine)}, f"{out}.{rank}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _frozen_store(engine) -> dict | None:
    """How this rank holds its streamed blocks' frozen weights (block: the streamer's companion store; one matrix
    at a time: the frozen ring's store), and whether its frozen parameters point into that store."""
    store = getattr(engine.streamer, "frozen", None)
    for r in engine.residences:
        if store is None and getattr(r, "frozen", None) is not None:
            store = r.frozen.store
    if store is None:
        return None
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in store.buffers if b.numel()]
    inside = all(any(lo <= s.module._parameters[s.attr].data_ptr() < hi for lo, hi in spans)
                 for slots in store.slots for s in slots)
    return {"shared": store.shared, "owner": store.owner, "files": len(store._paths), "name": store.name,
            "bytes": store.nbytes, "params_inside": inside}


def _spawn(tmp_path, dp: int, pp: int, die_at: int = -1, corrupt: bool = False, **extra) -> list[dict]:
    world = dp * pp
    out = str(tmp_path / "rank")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, dp, pp,
                                                {**CFG, **extra}, out, die_at, corrupt)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert not p.is_alive(), "a rank hung"
    return [torch.load(f"{out}.{r}") if os.path.exists(f"{out}.{r}") else None for r in range(world)]


def _single(lora: bool = False, **extra):
    engine = ZOEngine(_model(lora), ZOConfig(**CFG, **extra))
    base = engine.trainable_state()
    losses = [engine.step(_global_batch(s)).losses for s in range(STEPS)]
    return losses, engine.trainable_state(), base


def _assert_matches(results, single_losses, single_params, base_params, exact: bool):
    """Replicas identical to the bit; against one process: exact for perturbation parallelism (same batch,
    same math), else the losses to the rounding of per-shard forwards and the parameters' displacement to that
    rounding amplified by the projected gradient's 1/2ε."""
    first = results[0]["params"]
    for res in results[1:]:
        assert all(torch.equal(first[n], res["params"][n]) for n in first)
    if exact:
        assert results[0]["losses"] == single_losses
        assert all(torch.equal(first[n], single_params[n]) for n in first)
        return
    for got, want in zip(results[0]["losses"], single_losses):
        assert got == pytest.approx(want, rel=1e-5)
    moved = torch.cat([(first[n] - base_params[n]).reshape(-1) for n in first])
    want = torch.cat([(single_params[n] - base_params[n]).reshape(-1) for n in first])
    assert ((moved - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("dp,pp,extra", [(1, 2, {}), (2, 1, {}),
                                          pytest.param(2, 2, {"offload": True}, marks=pytest.mark.slow),
                                          (1, 2, {"q": 2, "estimator": "central"})])
def test_parallel_runs_equal_the_single_process_run(tmp_path, dp, pp, extra):
    single_losses, single_params, base = _single(**extra)
    _assert_matches(_spawn(tmp_path, dp, pp, **extra), single_losses, single_params, base, exact=dp == 1)


@pytest.mark.slow
def test_sliced_transfers_move_a_quarter_of_the_host_bytes_per_rank(tmp_path):
    single_losses, single_params, base = _single(offload=True)
    results = _spawn(tmp_path, 2, 2, offload=True)
    _assert_matches(results, single_losses, single_params, base, exact=False)
    store = results[0]["store_bytes"]
    assert store > 0
    for res in results:  # the last step uploads and writes back one slice of every block (4 processes)
        assert res["h2d"] == store // 4 and res["d2h"] == store // 4
    assert [res["store_files"] for res in results][1:] == [0, 0, 0]  # one store on the node, made by rank 0


@pytest.mark.parametrize("k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sliced_matrix_streaming_is_exact(tmp_path, k):
    """One matrix at a time with sliced transfers: each of two processes uploads, updates and writes back its half
    of every piece and an all-gather assembles it; perturbation parallelism keeps it exact against one process
    streaming by block."""
    single_losses, single_params, base = _single(offload=True)
    results = _spawn(tmp_path, 1, 2, offload=True, stream_granularity="matrix", writeback_every=k)
    _assert_matches(results, single_losses, single_params, base, exact=True)
    if k == 1:  # each process moves half of every piece: half the store up and back
        assert all(res["h2d"] == res["store_bytes"] // 2 == res["d2h"] for res in results)


@pytest.mark.parametrize("extra", [dict(lora=True, optimizer="zo-adam"),
                                   pytest.param(dict(optimizer="zo-sgd-momentum"), marks=pytest.mark.slow)])
def test_sliced_matrix_streaming_of_frozen_weights_and_optimizer_state_is_exact(tmp_path, extra):
    """One matrix at a time with sliced transfers, a LoRA model's base weights through their own ring (whole
    pieces on each process) and a stateful optimizer's state in slices of every piece from the node's state area:
    exact against one process streaming by block, state included."""
    if extra.get("lora"):
        pytest.importorskip("peft")
    single_losses, single_params, base = _single(offload=True, **extra)
    assert any(n.startswith("optimizer/") for n in single_params)
    results = _spawn(tmp_path, 1, 2, offload=True, stream_granularity="matrix", **extra)
    _assert_matches(results, single_losses, single_params, base, exact=True)
    assert [res["granularity"] for res in results] == ["matrix"] * 2
    if extra.get("lora"):
        _assert_one_frozen_copy(results)


def _assert_one_frozen_copy(results: list[dict]) -> None:
    """The node's processes share one copy of the base weights: the first made it, the other mapped it, and
    each one's frozen parameters point into it."""
    first, other = (res["frozen"] for res in results)
    assert first["shared"] and other["shared"] and first["name"] == other["name"] and first["bytes"] > 0
    assert first["owner"] and first["files"] > 0 and not other["owner"] and other["files"] == 0
    assert first["params_inside"] and other["params_inside"]


def test_a_lora_base_is_one_shared_copy_per_node_streamed_by_block(tmp_path):
    """Sliced transfers by block with LoRA: the base weights of the streamed blocks live once on the node, in
    shared memory, and both processes stream them from there; exact against one process."""
    pytest.importorskip("peft")
    single_losses, single_params, base = _single(lora=True, offload=True)
    results = _spawn(tmp_path, 1, 2, lora=True, offload=True)
    _assert_matches(results, single_losses, single_params, base, exact=True)
    assert [res["granularity"] for res in results] == ["block"] * 2
    _assert_one_frozen_copy(results)


def test_sliced_perturbation_parallel_is_exact(tmp_path):
    single_losses, single_params, base = _single(offload=True)
    _assert_matches(_spawn(tmp_path, 1, 2, offload=True), single_losses, single_params, base, exact=True)


@pytest.mark.parametrize("optimizer", ["zo-adam", "zo-sgd-momentum"])
def test_sliced_transfers_stream_a_stateful_optimizers_state_in_slices_exactly(tmp_path, optimizer):
    """Each rank streams its slice of a block's state from the node's shared state area beside its slice of the
    weights; every rank's snapshot (weights and state) equals one process's."""
    single_losses, single_params, base = _single(offload=True, optimizer=optimizer)
    assert any(n.startswith("optimizer/") for n in single_params)
    before = {p for p in os.listdir("/dev/shm") if "-state-" in p}
    _assert_matches(_spawn(tmp_path, 1, 2, offload=True, optimizer=optimizer), single_losses, single_params, base,
                    exact=True)
    assert {p for p in os.listdir("/dev/shm") if "-state-" in p} <= before  # the area's files are gone


def test_a_dead_rank_makes_the_others_stop_with_a_clear_error(tmp_path):
    results = _spawn(tmp_path, 1, 2, die_at=1)
    survivor = results[0]
    assert survivor is not None and "lost contact with another rank" in survivor["error"]
    assert survivor["seconds"] < 30


def test_diverged_replicas_are_detected_on_every_rank(tmp_path):
    results = _spawn(tmp_path, 2, 1, corrupt=True)
    assert all(r is not None and "diverged by step 3" in r["error"] for r in results)


def test_sizes_must_multiply_to_the_world_size():
    with pytest.raises(ConfigError, match=r"parallel.dp × parallel.pp = 2 × 2 = 4, but the job has 2 processes"):
        ParallelDims.from_config(ParallelConfig(dp=2, pp=2), 2)
    with pytest.raises(ConfigError, match="does not divide the 2 perturbed points"):
        ZOComm(ParallelDims(1, 3), 0).my_points(2)


def _fill_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from zo2.offload.loading import _targets, empty_model, load_safetensors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=30))
    try:
        comm = ZOComm(ParallelDims(1, world), rank)
        model = empty_model(_model().config, dtype=torch.float32)
        engine = ZOEngine(model, ZOConfig(**CFG, offload=True, device="cpu"), comm=comm)
        filled = len(_targets(engine))
        load_safetensors(engine, folder)
        losses = [engine.step(_global_batch(s)).losses for s in range(STEPS)]
        torch.save({"losses": losses, "params": engine.trainable_state(), "filled": filled,
                    "owner": engine.store.owner}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_nodes_shared_store_is_filled_from_the_shards_once(tmp_path):
    """A model built on the meta device and loaded from safetensors shards by two processes sharing the node's
    store: the first process (which made the store) fills the streamed blocks, the other fills only what it holds
    itself (its resident units) and waits; the run equals one process's over the model in memory."""
    single_losses, single_params, base = _single(offload=True)
    folder = tmp_path / "ckpt"
    _model().save_pretrained(folder)
    out, port = str(tmp_path / "rank"), _free_port()
    procs = [mp.get_context("spawn").Process(target=_fill_worker, args=(r, 2, port, str(folder), out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    _assert_matches(results, single_losses, single_params, base, exact=True)
    first, other = results
    assert first["owner"] and not other["owner"]
    assert 0 < other["filled"] < first["filled"]  # the embedding and head (resident) only

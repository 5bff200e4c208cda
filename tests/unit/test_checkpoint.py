"""Checkpoints: trajectory log (CRC, exact floats, torn tail, damage), atomic snapshots, fallback, replay."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from zo2.config.checkpoint import CheckpointConfig
from zo2.errors import CheckpointError, ConfigError
from zo2.optim.estimators import Update
from zo2.train import checkpoint as ckpt
from zo2.train.checkpoint import (CheckpointWarning, TrajectoryLog, latest_good_snapshot, list_snapshots,
                                  load_snapshot, make_record, read_log, repair_log, replay_updates,
                                  save_snapshot, snapshot_path)

AWKWARD_FLOATS = [0.1 + 0.2, 1e-308, 5e-324, -2.5e-7, 1 / 3, 123456789.98765433, float("inf"), -0.0]


def record(step: int, *, skipped: bool = False, coeff: float = 0.5) -> dict:
    update = Update(step, (2**63 - 1 - step, 7 * step), (coeff, -coeff / 3), 1e-6 * (step + 1))
    return make_record(update, data={"epoch": 0, "index": 8 * (step + 1)}, loss=2.0 + 1 / (step + 3),
                       projected_grad=coeff * 1.7, skipped=skipped)


def write_log(path, steps) -> None:
    with TrajectoryLog(path) as log:
        for s in steps:
            log.append(record(s))


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "n": torch.arange(6, dtype=torch.int64), "s": torch.tensor(3.5)}


# ----- config ------------------------------------------------------------------------------------------------

def test_checkpoint_config():
    c = CheckpointConfig()
    assert (c.save_every, c.keep_last, c.fsync) == (100, 2, True)
    assert CheckpointConfig(save_every=0).save_every == 0
    for bad in ({"save_every": -1}, {"keep_last": 0}, {"fsync": 1}, {"save_every": 2.5}):
        with pytest.raises(ConfigError, match=rf"checkpoint\.{next(iter(bad))}"):
            CheckpointConfig(**bad)


# ----- trajectory log ----------------------------------------------------------------------------------------

def test_log_round_trip_is_exact(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    records = [make_record(Update(i, (i, 2**64 - 1), (c, -c), c), data={"epoch": 1, "index": i}, loss=c,
                           projected_grad=c, skipped=False, note="é") for i, c in enumerate(AWKWARD_FLOATS)]
    records.append(make_record(Update(len(records), (1,), (0.0,), 0.0), data={}, loss=float("nan"),
                               projected_grad=float("nan"), skipped=True))
    with TrajectoryLog(path) as log:
        for r in records:
            log.append(r)
    back = read_log(path)
    assert back[:-1] == records[:-1]
    for r, b in zip(records, back):
        assert [math.copysign(1, x) for x in b["coeffs"]] == [math.copysign(1, x) for x in r["coeffs"]]
        assert Update.from_dict(b) == Update.from_dict(r)
    assert math.isnan(back[-1]["loss"]) and back[-1]["skipped"] is True
    line = path.read_text().splitlines()[0]
    assert line.startswith('{"crc":') and '"r":{"step":0' in line


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, range(5))
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # crash mid-write of the 5th line
    with pytest.warns(CheckpointWarning, match="torn last line"):
        assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3]
    with pytest.warns(CheckpointWarning):
        repair_log(path)
    assert path.read_bytes() == whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_log(path)) == 4
        with TrajectoryLog(path) as log:  # appends continue after the last good step
            assert log.next_step == 4
            log.append(record(4))
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3, 4]


def test_opening_a_torn_log_repairs_it(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, range(3))
    with open(path, "ab") as f:
        f.write(b'{"crc":00000')
    with pytest.warns(CheckpointWarning):
        log = TrajectoryLog(path)
    log.append(record(3))
    log.close()
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3]


def test_damage_in_the_middle_raises(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, range(5))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"loss":2.', b'"loss":3.')  # valid JSON, wrong CRC
    path.write_bytes(b"".join(lines))
    with pytest.raises(CheckpointError, match=r"damaged at line 2 of 5.*past the 1 step before it"):
        read_log(path)
    with pytest.raises(CheckpointError, match="line 2"):
        repair_log(path)
    with pytest.raises(CheckpointError):
        TrajectoryLog(path)


def test_log_lines_are_strict_json_and_non_finite_values_round_trip(tmp_path):
    """Any JSON reader takes the log (no zero-padded number, no bare NaN); NaN/inf come back as floats, and a log
    in the earlier format (CRC as a bare zero-padded number, bare NaN) still reads."""
    import json
    import math
    import zlib

    path = tmp_path / "log.jsonl"
    with TrajectoryLog(path, fsync=False) as log:
        log.append({**record(0), "loss": float("nan"), "projected_grad": float("inf"), "loss_minus": -math.inf})
        log.append(record(1))

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    for line in path.read_text().splitlines():
        parsed = json.loads(line, parse_constant=no_constants)
        assert isinstance(parsed["crc"], str) and set(parsed) == {"crc", "r"}
    got = read_log(path)
    assert math.isnan(got[0]["loss"]) and got[0]["projected_grad"] == math.inf and got[0]["loss_minus"] == -math.inf
    assert got[1] == json.loads(json.dumps(record(1)))
    payload = json.dumps({**record(2), "loss": float("nan")}, separators=(",", ":")).encode()
    old = tmp_path / "old.jsonl"
    old.write_bytes(b'{"crc":' + f"{zlib.crc32(payload):010d}".encode() + b',"r":' + payload + b"}\n")
    assert math.isnan(read_log(old)[0]["loss"])


def test_steps_must_be_consecutive(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, [3, 4])
    with TrajectoryLog(path) as log:
        with pytest.raises(CheckpointError, match="must be step 5, not 7"):
            log.append(record(7))
        with pytest.raises(ValueError, match="lacks"):
            log.append({"step": 5})
    with open(path, "ab") as f:
        f.write(ckpt.encode_line(record(9)))
    with pytest.raises(CheckpointError, match="jumps from step 4 to step 9 at line 3"):
        read_log(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_log(tmp_path / "missing.jsonl")


# ----- snapshots ---------------------------------------------------------------------------------------------

def test_snapshot_round_trip(tmp_path):
    tensors = sample_tensors()
    meta = {"data": {"epoch": 2, "index": 16}, "log_records": 40, "lr": 1e-7}
    path = save_snapshot(tmp_path, 40, tensors, meta)
    assert path == snapshot_path(tmp_path, 40) == tmp_path / "snapshots" / "step_00000040.safetensors"
    assert os.listdir(tmp_path / "snapshots") == ["step_00000040.safetensors"]
    loaded, back = load_snapshot(path)
    assert back == {**meta, "step": 40}
    header = ckpt.read_snapshot_meta(path)
    assert header["step"] == 40 and header["meta"] == meta and header["checksum"].startswith("crc32:")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_snapshot_is_written_to_a_temp_name_then_renamed(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        assert os.path.getsize(src) > 0 and not os.path.exists(dst)
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    final = save_snapshot(tmp_path, 1, sample_tensors(), {})
    (src, dst), = renames
    assert dst == str(final) and os.path.dirname(src) == os.path.dirname(dst) and src != dst
    assert sorted(os.listdir(final.parent)) == [final.name]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    save_snapshot(tmp_path, 1, sample_tensors(), {})
    folder = tmp_path / "snapshots"
    (folder / ".step_00000001.safetensors.tmp.999").write_bytes(b"stale")  # from an earlier crash

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(CheckpointError, match="No space left.*previous snapshots are untouched"):
        save_snapshot(tmp_path, 2, sample_tensors(), {})
    assert os.listdir(folder) == ["step_00000001.safetensors"]


def test_keep_last_prunes_older_snapshots(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_snapshot(tmp_path, step, sample_tensors(), {}, keep_last=2, fsync=False)
    assert [p.name for p in list_snapshots(tmp_path)] == ["step_00000040.safetensors", "step_00000050.safetensors"]
    save_snapshot(tmp_path, 60, sample_tensors(), {}, keep_last=1)
    assert [p.name for p in list_snapshots(tmp_path)] == ["step_00000060.safetensors"]
    assert list_snapshots(tmp_path / "nothing") == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_latest_snapshot_falls_back_to_previous(tmp_path, damage):
    good = sample_tensors()
    save_snapshot(tmp_path, 10, good, {"data": {"epoch": 0, "index": 80}})
    newest = save_snapshot(tmp_path, 20, {k: v + 1 for k, v in good.items()}, {})
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of tensor data
    newest.write_bytes({"flip": bytes(data), "truncate": bytes(data[:-10]), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="step_00000020.safetensors' is corrupt"):
        load_snapshot(newest)
    with pytest.warns(CheckpointWarning, match="Skipping snapshot step_00000020"):
        snap = latest_good_snapshot(tmp_path)
    assert snap.step == 10 and snap.meta == {"data": {"epoch": 0, "index": 80}, "step": 10}
    assert all(torch.equal(snap.tensors[k], good[k]) for k in good)


@pytest.mark.parametrize("damage", ["truncate", "empty", "junk"])
def test_rotation_sets_aside_an_unreadable_snapshot_and_counts_only_good_ones(tmp_path, damage):
    t = sample_tensors()
    save_snapshot(tmp_path, 10, t, {}, keep_last=2)
    bad = save_snapshot(tmp_path, 20, t, {}, keep_last=2)
    data = bad.read_bytes()
    damaged = {"truncate": data[:-10], "empty": b"", "junk": b"junk" * 64}[damage]
    bad.write_bytes(damaged)
    with pytest.warns(CheckpointWarning, match="moved to"):
        save_snapshot(tmp_path, 30, t, {}, keep_last=2)
    assert [p.name for p in list_snapshots(tmp_path)] == ["step_00000010.safetensors", "step_00000030.safetensors"]
    assert (tmp_path / "snapshots" / "corrupt" / "step_00000020.safetensors").read_bytes() == damaged
    save_snapshot(tmp_path, 40, t, {}, keep_last=2)  # the corrupt file is never counted or resurrected
    assert [p.name for p in list_snapshots(tmp_path)] == ["step_00000030.safetensors", "step_00000040.safetensors"]


def test_resume_sets_aside_a_corrupt_snapshot_only_when_asked(tmp_path):
    t = sample_tensors()
    save_snapshot(tmp_path, 10, t, {})
    newest = save_snapshot(tmp_path, 20, t, {})
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x01  # caught by the CRCs only
    newest.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="Skipping"):
        assert latest_good_snapshot(tmp_path).step == 10
    assert newest.is_file()  # read-only callers (zo2 eval, zo2 replay) leave the folder as it is
    with pytest.warns(CheckpointWarning, match="moved to"):
        assert latest_good_snapshot(tmp_path, set_aside_corrupt=True).step == 10
    assert not newest.exists() and (tmp_path / "snapshots" / "corrupt" / newest.name).is_file()


def test_no_good_snapshot(tmp_path):
    assert latest_good_snapshot(tmp_path) is None
    save_snapshot(tmp_path, 5, sample_tensors(), {}).write_bytes(b"junk")
    with pytest.warns(CheckpointWarning):
        assert latest_good_snapshot(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_snapshot(tmp_path / "snapshots" / "step_00000099.safetensors")
    from safetensors.torch import save_file

    foreign = tmp_path / "snapshots" / "step_00000006.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a zo2 snapshot"):
        load_snapshot(foreign)


# ----- replay ------------------------------------------------------------------------------------------------

def test_replay_applies_non_skipped_updates_in_order(tmp_path):
    records = [record(s, skipped=(s == 5)) for s in range(10)]
    seen: list[Update] = []
    assert replay_updates(seen.append, records, 3, 8) == 4
    assert [u.step for u in seen] == [3, 4, 6, 7]
    assert seen[0] == Update.from_dict(records[3])
    assert replay_updates(seen.append, records, 4, 4) == 0


def test_replay_range_errors():
    records = [record(s) for s in range(6)]
    applied: list[Update] = []
    with pytest.raises(CheckpointError, match="stops before step 6"):
        replay_updates(applied.append, records, 2, 8)
    with pytest.raises(CheckpointError, match="step 3 is expected but step 4"):
        replay_updates(applied.append, records[:3] + records[4:], 1, 5)
    with pytest.raises(CheckpointError, match="step 2 is expected but step 3"):
        replay_updates(applied.append, [records[3], records[2]], 2, 4)
    assert applied == []  # nothing applied when the range is not covered
    with pytest.raises(ValueError):
        replay_updates(applied.append, records, 4, 2)


def test_resume_recipe_reproduces_parameters(tmp_path):
    """Snapshot + log tail replay gives the parameters of the uninterrupted run, bit for bit."""
    def apply(theta: torch.Tensor, u: Update) -> None:
        for seed, c in zip(u.seeds, u.coeffs):
            z = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed % 2**62))
            theta.sub_(z * (u.lr * c))

    theta = torch.zeros(8)
    with TrajectoryLog(tmp_path / "log.jsonl") as log:
        for step in range(12):
            r = record(step, skipped=step == 7, coeff=0.3 * step - 1)
            log.append(r)
            if not r["skipped"]:
                apply(theta, Update.from_dict(r))
            if step + 1 == 8:
                save_snapshot(tmp_path, 8, {"theta": theta}, {"data": r["data"]})
    snap = latest_good_snapshot(tmp_path)
    records = read_log(tmp_path / "log.jsonl")
    resumed = snap.tensors["theta"].clone()
    replay_updates(lambda u: apply(resumed, u), records, snap.step, records[-1]["step"] + 1)
    assert torch.equal(resumed, theta)


def test_snapshots_of_views_of_one_buffer_are_written_without_copies_and_load_back(tmp_path):
    """A parameter store's tensors are views of one flat buffer (safetensors' own writer refuses them); the
    streaming writer stores them as they are, in a file safetensors reads."""
    from safetensors import safe_open

    from zo2.train.durable import write_safetensors

    flat = torch.arange(40, dtype=torch.float32)
    views = {"b.weight": flat[:12].view(3, 4), "a.bias": flat[16:21], "half": torch.ones(3, dtype=torch.bfloat16),
             "empty": flat[:0]}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, views, metadata={"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert sorted(f.keys()) == sorted(views)
        for name, t in views.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    save_snapshot(tmp_path / "run", 3, views, {"data": None})
    tensors, meta = load_snapshot(snapshot_path(tmp_path / "run", 3))
    assert meta["step"] == 3 and all(torch.equal(tensors[n], views[n]) for n in views)

"""The NVMe tier's file store and I/O engines (zo2.offload.nvme), on the CPU with files in a temporary folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from collections import namedtuple

import pytest
import torch

from zo2.errors import ConfigError, ResourceError
from zo2.offload import nvme, nvme_io
from zo2.offload.nvme import NvmeStore
from zo2.offload.nvme_io import PAGE, AioEngine, ThreadPoolEngine, aligned_empty, open_engine

ODD = [1, 1001, 4097, 12345]  # sizes that are not multiples of a page in any dtype


def aio_op_or_skip():
    op, reason = nvme_io.load_aio()
    if op is None:
        pytest.skip(f"AIO engine unavailable: {reason}")
    return op


def engines():
    """(name, factory) of every engine that runs here; the AIO one skips with the reason where it cannot."""
    return [pytest.param(lambda: ThreadPoolEngine(queue_depth=3, block_size=PAGE), id="threads"),
            pytest.param(lambda: AioEngine(aio_op_or_skip(), queue_depth=4, block_size=PAGE), id="aio")]


def values(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("make_engine", engines())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, make_engine, dtype):
    engine = make_engine()
    store = NvmeStore.from_numels(tmp_path, ODD, dtype, engine=engine)
    data = [values(n, dtype, seed=k) for k, n in enumerate(ODD)]
    for k, x in enumerate(data):
        store.write(k, x, step=10 + k)  # plain, unaligned tensors: through the bounce buffer
    for k, x in enumerate(data):
        plain = torch.full_like(x, 7)
        assert store.read(k, plain) == 10 + k
        assert torch.equal(plain.view(torch.uint8), x.view(torch.uint8))
        staged = store.staging(k)  # aligned staging buffers: no copy
        assert staged.data_ptr() % PAGE == 0 and staged.numel() == store.file_bytes(k)
        store.read(k, staged)
        assert torch.equal(store.typed(k, staged), x)
    for k, x in enumerate(data):  # and back through the aligned path, as the next version
        buf = store.staging(k)
        store.typed(k, buf).copy_(-x)
        store.write(k, buf, step=20 + k)
        out = torch.empty_like(x)
        assert store.read(k, out) == 20 + k and torch.equal(out, -x)
    for k in range(len(ODD)):
        assert store.path(k, "a").stat().st_size % PAGE == 0
        assert store.path(k, "a").stat().st_size == store.file_bytes(k) >= store.data_bytes(k)
    store.close()


def test_store_reopens_with_its_markers(tmp_path):
    engine = ThreadPoolEngine()
    store = NvmeStore.from_numels(tmp_path, [333, 5], torch.float32, engine=engine)
    x = values(333, torch.float32, 1)
    store.write(0, x, step=4)
    again = NvmeStore.from_numels(tmp_path, [333, 5], torch.float32, engine=engine)
    assert again.held(0) == 4 and again.held(1) is None
    out = torch.empty(333)
    again.read(0, out)
    assert torch.equal(out, x)
    with pytest.raises(Exception, match="never written"):
        again.read(1, torch.empty(5))
    with pytest.raises(Exception, match="another model's store"):
        NvmeStore.from_numels(tmp_path, [333 + 2048, 5], torch.float32, engine=engine)


def test_crash_before_the_marker_switch_keeps_the_previous_version(tmp_path, monkeypatch):
    store = NvmeStore.from_numels(tmp_path, [1001], torch.float32, engine=ThreadPoolEngine())
    old, new = values(1001, torch.float32, 1), values(1001, torch.float32, 2)
    store.write(0, old, step=5)
    store.write(0, old, step=6)  # the current version is now "b", "a" holds a stale copy
    assert store.current(0) == "b"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the marker switched")

    monkeypatch.setattr(store, "_switch", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write(0, new, step=7)  # the new data landed in "a", durably, but the marker never moved
    monkeypatch.undo()
    written = torch.empty(1001)
    written.view(torch.uint8).copy_(torch.from_file(str(store.path(0, "a")), size=4004, dtype=torch.uint8))
    assert torch.equal(written, new)  # the crash really happened after the data write

    reopened = NvmeStore.from_numels(tmp_path, [1001], torch.float32, engine=ThreadPoolEngine())
    out = torch.empty(1001)
    assert reopened.held(0) == 6 and reopened.read(0, out) == 6
    assert torch.equal(out, old)


def test_torn_new_version_and_stray_marker_file_do_not_matter(tmp_path):
    store = NvmeStore.from_numels(tmp_path, [4097], torch.bfloat16, engine=ThreadPoolEngine())
    x = values(4097, torch.bfloat16, 3)
    store.write(0, x, step=2)
    other = "b" if store.current(0) == "a" else "a"
    with open(store.path(0, other), "r+b") as f:  # a crash half-way through writing the other version
        f.truncate(PAGE)
    (tmp_path / "unit-0.json.tmp").write_text('{"version": "b", "st')  # and through writing the marker
    reopened = NvmeStore.from_numels(tmp_path, [4097], torch.bfloat16, engine=ThreadPoolEngine())
    out = torch.empty(4097, dtype=torch.bfloat16)
    assert reopened.held(0) == 2 and reopened.read(0, out) == 2
    assert torch.equal(out, x)
    assert reopened.path(0, other).stat().st_size == reopened.file_bytes(0)  # the torn file is sized again
    reopened.write(0, -x, step=3)  # and the next write goes into it
    assert reopened.current(0) == other and reopened.read(0, out) == 3 and torch.equal(out, -x)
    assert json.loads(reopened.marker_path(0).read_text())["step"] == 3


def test_a_failed_write_keeps_the_current_version(tmp_path, monkeypatch):
    store = NvmeStore.from_numels(tmp_path, [100], torch.float32, engine=ThreadPoolEngine())
    x = values(100, torch.float32, 4)
    store.write(0, x, step=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.engine, "submit_write", full)
    with pytest.raises(ResourceError, match=r"No space left on device.*previous version of unit 0 \(step 1\) is"):
        store.write(0, -x, step=2)
    out = torch.empty(100)
    assert store.held(0) == 1 and store.read(0, out) == 1 and torch.equal(out, x)


def test_disk_full_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    keep = tmp_path / "unit-0.a"
    keep.write_bytes(b"saved earlier")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(ResourceError) as info:
        NvmeStore.from_numels(tmp_path, [10**6, 10**6], torch.float32, engine=ThreadPoolEngine())
    message = str(info.value)
    assert str(tmp_path) in message and "0.02 GB more" in message and "0.00 GB is free" in message
    assert "nvme_path" in message and "Free space" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-0.a"]  # nothing created, nothing lost
    assert keep.read_bytes() == b"saved earlier"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**11))
    store = NvmeStore.from_numels(tmp_path, [10, 10], torch.float32, engine=ThreadPoolEngine())
    assert store.path(1, "b").stat().st_size == PAGE


def test_thread_pool_uses_o_direct_on_aligned_buffers(tmp_path, monkeypatch):
    flags = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, f, *a: flags.append(f) or real_open(path, f, *a))
    engine = ThreadPoolEngine(block_size=PAGE)
    buf = aligned_empty(3 * PAGE)
    buf.copy_(torch.arange(3 * PAGE) % 251)
    engine.submit_write(tmp_path / "f", 0, buf)
    engine.wait()
    back = aligned_empty(3 * PAGE)
    engine.submit_read(tmp_path / "f", 0, back)
    assert engine.wait() == 1 and torch.equal(back, buf)
    assert all(f & os.O_DIRECT for f in flags) or engine.buffered_folders  # ext4/xfs accept it; else logged
    engine.close()


def test_o_direct_refused_falls_back_and_says_so_once(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    caplog.set_level(logging.INFO, logger="zo2.offload")
    store = NvmeStore.from_numels(tmp_path, [777, 4096], torch.float32, engine=ThreadPoolEngine())
    xs = [values(777, torch.float32, 5), values(4096, torch.float32, 6)]
    for k, x in enumerate(xs):
        buf = store.staging(k)
        store.typed(k, buf).copy_(x)
        store.write(k, buf, step=k)
    for k, x in enumerate(xs):
        out = torch.empty_like(x)
        store.read(k, out)
        assert torch.equal(out, x)
    notes = [r.getMessage() for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert notes == [f"NVMe store: the file system of {tmp_path} refuses O_DIRECT; using buffered I/O there"]


def fake_deepspeed(monkeypatch, compatible: bool, handle_cls=None):
    """Install a stand-in ``deepspeed.ops.op_builder`` whose AsyncIOBuilder is (in)compatible."""
    class AsyncIOBuilder:
        def is_compatible(self, verbose=False):
            return compatible

        def load(self, verbose=False):
            return types.SimpleNamespace(aio_handle=handle_cls)

    module = types.ModuleType("deepspeed.ops.op_builder")
    module.AsyncIOBuilder = AsyncIOBuilder
    for name in ("deepspeed", "deepspeed.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", module)


class FileHandle:
    """A stand-in for DeepSpeed's aio_handle: the same calls, done with plain file I/O at wait()."""

    def __init__(self, block_size, queue_depth, single_submit, overlap_events, threads):
        self.args, self.queue = (block_size, queue_depth, single_submit, overlap_events, threads), []

    def async_pread(self, buffer, filename, offset=0):
        self.queue.append(("r", buffer, filename, offset))
        return 0

    def async_pwrite(self, buffer, filename, offset=0):
        self.queue.append(("w", buffer, filename, offset))
        return 0

    def wait(self):
        for kind, buffer, filename, offset in self.queue:
            with open(filename, "r+b" if kind == "w" else "rb") as f:
                f.seek(offset)
                if kind == "w":
                    f.write(buffer.numpy().tobytes())
                else:
                    buffer.copy_(torch.frombuffer(bytearray(f.read(buffer.numel())), dtype=torch.uint8))
        done, self.queue = len(self.queue), []
        return done


def test_engine_choice_logs_its_reason(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="zo2.offload")
    for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.op_builder"):  # imports fail as when not installed
        monkeypatch.setitem(sys.modules, name, None)
    assert isinstance(open_engine(), ThreadPoolEngine)
    assert caplog.records[-1].getMessage().startswith("NVMe I/O engine: thread pool (deepspeed not installed")
    with pytest.raises(ConfigError, match="deepspeed not installed"):
        open_engine("aio")

    fake_deepspeed(monkeypatch, compatible=False)
    assert isinstance(open_engine("auto"), ThreadPoolEngine)
    assert "libaio missing: AsyncIOBuilder not compatible" in caplog.records[-1].getMessage()

    fake_deepspeed(monkeypatch, compatible=True, handle_cls=FileHandle)
    engine = open_engine("auto", queue_depth=16, block_size=1 << 20)
    assert isinstance(engine, AioEngine) and engine.handle.args == (1 << 20, 16, False, True, 1)
    assert caplog.records[-1].getMessage() == "NVMe I/O engine: DeepSpeed aio (deepspeed async_io op loaded)"
    assert isinstance(open_engine("threads"), ThreadPoolEngine)
    assert "chosen in the config" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError):
        open_engine("fast")


def test_aio_engine_drives_the_store(tmp_path, monkeypatch):
    """The AioEngine's calls, checked against a stand-in handle (the real one runs in the parametrized test)."""
    fake_deepspeed(monkeypatch, compatible=True, handle_cls=FileHandle)
    store = NvmeStore.from_numels(tmp_path, [1001, 3], torch.bfloat16, engine=open_engine("aio"))
    x = values(1001, torch.bfloat16, 7)
    store.write(0, x, step=9)
    out = torch.empty_like(x)
    assert store.read(0, out) == 9 and torch.equal(out, x)
    store.engine.handle.wait = lambda: 0  # a request that never completes is an error, not silence
    store.engine.submit_read(store.path(0, "a"), 0, store.staging(0))
    with pytest.raises(OSError, match="completed 0 of 1"):
        store.engine.wait()


# ---------------------------------------------------------------------------------------------------- the folder lock
def _hold_lock(folder) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a running zo2 train or scheduler does)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; from zo2.offload.nvme import FolderLock; "
                             f"lock = FolderLock({str(folder)!r}); print('locked', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_owner_of_a_folder_is_refused_naming_the_holder_until_it_is_gone(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(ResourceError) as err:
            NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True)
        assert str(tmp_path) in str(err.value) and f"process {holder.pid}" in str(err.value)
        assert "nvme_path" in str(err.value)
        assert not list(tmp_path.glob("unit-*"))  # refused before any file was made
        mapped = NvmeStore.from_numels(tmp_path, [], torch.float32, engine=ThreadPoolEngine())  # no lock asked
        assert mapped.lock is None
    finally:
        holder.kill()
        holder.wait(timeout=60)
    store = NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True)
    assert (tmp_path / nvme.LOCK_FILE).read_text().strip() == str(os.getpid())  # the kernel dropped the dead lock
    with pytest.raises(ResourceError, match=f"process {os.getpid()}"):  # this process's live store holds it
        NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True)
    store.close()
    NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True).close()


def test_a_dropped_store_of_this_process_does_not_keep_its_folder_locked(tmp_path):
    NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True)  # never closed
    again = NvmeStore.from_numels(tmp_path, [1000], torch.float32, engine=ThreadPoolEngine(), lock=True)
    assert again.lock is not None


# ---------------------------------------------------------------------------------------------------- sliced files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_sliced_files_one_pair_per_unit_and_writer_each_writer_its_own(tmp_path):
    from zo2.offload.nvme_slices import SlicedNvme

    numels = {3: 4096, 5: 2048}  # unit index -> padded numel (a multiple of the 2 writers)
    owner = SlicedNvme(tmp_path, "zo2-node-1-abcdef01", numels, torch.float32, 2, engine=ThreadPoolEngine(),
                       pin=False, create=True)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == []  # nothing written yet
    assert len(list(tmp_path.glob("zo2-node-1-abcdef01-unit*-w*.[ab]"))) == 2 * 2 * 2
    flat = values(4096, torch.float32, 1)
    owner.write(3, flat, step=-1)
    assert owner.held(3) == [-1, -1] and owner.held(5) == [None, None]
    w1 = SlicedNvme(tmp_path, "zo2-node-1-abcdef01", numels, torch.float32, 2, engine=ThreadPoolEngine(),
                    pin=False, writer=1)  # maps: a worker's own slices
    assert w1.entries == [(3, 1), (5, 1)] and w1.bounds(3, 1) == (2048, 4096)
    w1.store.write(w1.entry(3, 1), -flat[2048:], step=0)  # writer 1 writes its slice back alone
    out = torch.empty(4096)
    owner.refresh()
    owner.read(3, out)
    assert owner.held(3) == [-1, 0]
    assert torch.equal(out[:2048], flat[:2048]) and torch.equal(out[2048:], -flat[2048:])
    with pytest.raises(ResourceError, match="creates the files"):
        SlicedNvme(tmp_path, "zo2-node-1-other000", numels, torch.float32, 2, engine=ThreadPoolEngine(), pin=False)
    owner.close(remove=True)
    assert [p.name for p in tmp_path.iterdir()] == [nvme.LOCK_FILE]


def test_files_cut_by_piece_hold_each_writers_share_of_every_piece_in_order(tmp_path):
    """One matrix at a time with several writers: writer w's file is its share of every piece, one after the
    other (what it uploads, updates and writes back of each piece is one range of it); a whole unit written and
    read through every writer's slices comes back as it was, and a writer rewriting its own shares changes only
    those."""
    from zo2.errors import ModelError
    from zo2.offload.nvme_slices import SlicedNvme, cuts_digest

    numels, writers = {2: 96}, 4
    cuts = {2: [(0, 32), (32, 40), (40, 96)]}  # three pieces, each a multiple of 4 long
    owner = SlicedNvme(tmp_path, "zo2-node-1-cafe0001", numels, torch.float32, writers, engine=ThreadPoolEngine(),
                       pin=False, create=True, cuts=cuts)
    flat = values(96, torch.float32, 3)
    owner.write(2, flat, step=4)
    for w in range(writers):
        mine = SlicedNvme(tmp_path, "zo2-node-1-cafe0001", numels, torch.float32, writers,
                          engine=ThreadPoolEngine(), pin=False, writer=w, cuts=cuts)
        held = torch.empty(24)
        mine.store.read(mine.entry(2, w), held)
        expected = torch.cat([flat[lo + w * (hi - lo) // 4 : lo + (w + 1) * (hi - lo) // 4] for lo, hi in cuts[2]])
        assert torch.equal(held, expected), w
        assert mine.parts(2, w) == [(w * 8, w * 8 + 8), (32 + 2 * w, 34 + 2 * w), (40 + 14 * w, 54 + 14 * w)]
        if w == 1:
            mine.store.write(mine.entry(2, 1), -held, step=5)
    out = torch.empty(96)
    owner.refresh()
    owner.read(2, out)
    changed = torch.zeros(96, dtype=torch.bool)
    for lo, hi in owner.parts(2, 1):
        changed[lo:hi] = True
    assert torch.equal(out[changed], -flat[changed]) and torch.equal(out[~changed], flat[~changed])
    assert owner.held(2) == [4, 5, 4, 4]
    assert cuts_digest(cuts) != cuts_digest({2: [(0, 40), (40, 96)]}) and cuts_digest(None) == ""
    with pytest.raises(ModelError, match="equal shares"):
        SlicedNvme(tmp_path, "zo2-node-1-cafe0002", numels, torch.float32, writers, engine=ThreadPoolEngine(),
                   pin=False, cuts={2: [(0, 30), (30, 96)]})
    owner.close(remove=True)


def test_an_owner_deletes_the_files_of_owners_that_died_and_keeps_the_living(tmp_path):
    from zo2.offload.nvme_slices import SlicedNvme

    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f"zo2-node-{dead}-0badf00d-unit2-w0.{s}" for s in ("a", "b", "json", "json.tmp")]
    live = [tmp_path / f"zo2-node-{alive}-00c0ffee-unit2-w0.{s}" for s in ("a", "b", "json")]
    other = tmp_path / "unit-0.a"  # a zo2 train store's file: not a shared store's
    for path in [*stale, *live, other]:
        path.write_bytes(b"x" * 100)
    owner = SlicedNvme(tmp_path, f"zo2-node-{alive}-12345678", {0: 16}, torch.float32, 1,
                       engine=ThreadPoolEngine(), pin=False, create=True)
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in [*live, other])
    owner.close(remove=True)
    assert all(p.exists() for p in [*live, other])

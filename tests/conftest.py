"""Test-wide settings: never touch the Hugging Face hub, and use two CPU threads (the CI machines' core count)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(2)


import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def mounts(tmp_path):
    """``mounts.read_only(folder)``: a read-only bind mount of ``folder``; ``mounts.small_disk(mb)``: a tmpfs of that
    size (a disk that fills). Both are real mounts (root cannot be kept out of a chmod-ed folder) and are unmounted
    afterwards; the test is skipped where this machine refuses to mount."""

    class Mounts:
        def __init__(self):
            self.targets: list[Path] = []

        def _mount(self, *cmds: list[str], target: Path) -> Path:
            target.mkdir()
            for cmd in cmds:
                done = subprocess.run([*cmd, str(target)], capture_output=True, text=True)
                if done.returncode != 0:
                    subprocess.run(["umount", str(target)], capture_output=True)
                    pytest.skip(f"cannot mount here ({done.stderr.strip()})")
            self.targets.append(target)
            return target

        def read_only(self, folder: Path) -> Path:
            return self._mount(["mount", "--bind", str(folder)], ["mount", "-o", "remount,ro,bind"],
                               target=tmp_path / f"ro{len(self.targets)}")

        def small_disk(self, mb: int) -> Path:
            return self._mount(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs"],
                               target=tmp_path / f"disk{len(self.targets)}")

    m = Mounts()
    yield m
    for target in reversed(m.targets):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`zo2 train` run in-process sets torch's thread count for its model (one thread for tiny ones): give the
    next test the count it started with."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)

"""Test-wide settings: never touch the Hugging Face hub, and use two CPU threads (the CI machines' core count)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(2)

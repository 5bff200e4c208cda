"""Training: the loop (trainer), its pieces (build), run folders (run_dir), replay, model building, data,
tokenizers, metrics, checkpoints.

The names below are imported lazily, so ``import zo2.train.data`` does not pull in the engine and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "zo2.train.trainer",
    "TrainSummary": "zo2.train.trainer",
    "train_job": "zo2.train.trainer",
    "replay_run": "zo2.train.replay",
    "load_resume_config": "zo2.train.run_dir",
    "read_metrics": "zo2.train.run_dir",
    "build_model": "zo2.train.model",
    "hf_config": "zo2.train.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zo2.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Integrations with other libraries' training loops (optional dependencies, imported on first use).

* :class:`~zo2.integrations.hf_trainer.ZOTrainer` — ``transformers.Trainer`` with zo2's engine underneath
  (needs ``accelerate``, as the Trainer does).

PEFT models need no integration module: :func:`zo2.models.adapter_for` sees through a ``PeftModel``
(zo2/models/peft_adapter.py) and the engine perturbs only the adapter's trainable parameters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ZOTrainer", "ZOTrainerMixin", "zo_config_from_args"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zo2.integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module 'zo2.integrations' has no attribute {name!r}")

"""zo2: zeroth-order fine-tuning of large language models that do not fit on the GPU."""

from zo2.numerics import settle_cpu_math

settle_cpu_math()  # before anything computes: CPU math must not depend on which thread first ran an op

from zo2.config.zo import ZOConfig
from zo2.engine import EvalResult, StepResult, ZOEngine

__all__ = ["ZOConfig", "ZOEngine", "StepResult", "EvalResult", "ZOTrainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``zo2.ZOTrainer`` imports transformers.Trainer (and accelerate) only when it is used."""
    if name == "ZOTrainer":
        from zo2.integrations.hf_trainer import ZOTrainer

        return ZOTrainer
    raise AttributeError(f"module 'zo2' has no attribute {name!r}")

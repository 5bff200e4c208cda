"""zo2: zeroth-order fine-tuning of large language models that do not fit on the GPU."""

from zo2.config.zo import ZOConfig
from zo2.engine import EvalResult, StepResult, ZOEngine

__all__ = ["ZOConfig", "ZOEngine", "StepResult", "EvalResult"]
__version__ = "0.1.0"

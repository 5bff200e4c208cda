"""Typed configs, one dataclass per component (see README for every field)."""

from zo2.config.checkpoint import CheckpointConfig
from zo2.config.data import DataConfig
from zo2.config.job import JobConfig, ModelConfig, RunConfig, TrainConfig
from zo2.config.offload import OffloadConfig
from zo2.config.loader import describe_config, job_from_dict, job_to_dict, load_config, load_saved_config, to_toml
from zo2.config.presets import get_preset, list_presets, parameter_count, preset_names
from zo2.config.zo import ZOConfig

__all__ = [
    "CheckpointConfig", "DataConfig", "JobConfig", "ModelConfig", "OffloadConfig", "RunConfig", "TrainConfig", "ZOConfig",
    "describe_config", "get_preset", "job_from_dict", "job_to_dict", "list_presets", "load_config",
    "load_saved_config", "parameter_count", "preset_names", "to_toml",
]

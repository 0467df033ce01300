"""Models for the CLI, the demo, the tests and the benchmarks: small random configs and real checkpoints."""

from .loading import add_model_arguments, encode, load, model_from_args
from .random_configs import ARCHITECTURES, random_config, random_model

__all__ = ["ARCHITECTURES", "add_model_arguments", "encode", "load", "model_from_args", "random_config", "random_model"]

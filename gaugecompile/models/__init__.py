"""Models for the CLI, the demo, the tests and the benchmarks: small random configs and real checkpoints."""

from .random_configs import ARCHITECTURES, random_config, random_model

__all__ = ["ARCHITECTURES", "random_config", "random_model"]

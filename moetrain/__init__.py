"""moetrain: Mixture-of-Experts language model training with expert parallelism."""

__version__ = "0.1.0"

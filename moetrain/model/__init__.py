"""The single-process model: Transformer, router, experts, MoE layer and balancing losses."""

from moetrain.model.moe import MoE
from moetrain.model.transformer import Transformer, num_params

__all__ = ["MoE", "Transformer", "num_params"]

"""Conversion to and from transformers' checkpoint formats (transformers itself not needed)."""

from moetrain.hf.convert import (export_hf, import_model_config, load_hf_model,
                                 load_hf_weights_)
from moetrain.hf.families import FAMILIES, family_for, hf_config, model_config_from_hf

__all__ = ["FAMILIES", "export_hf", "family_for", "hf_config", "import_model_config",
           "load_hf_model", "load_hf_weights_", "model_config_from_hf"]

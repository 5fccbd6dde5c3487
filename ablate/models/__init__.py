"""DiT models: one model file, a registry of conditioning blocks, a table of sizes."""
from .blocks import BLOCKS, Block, naive_attention, register_block
from .configs import (MODELS, SIZES, Size, create_model, dit_kwargs, model_name, parse_model_name,
                      register_size)
from .dit import DiT

__all__ = ["BLOCKS", "Block", "DiT", "MODELS", "SIZES", "Size", "create_model", "dit_kwargs", "model_name",
           "naive_attention", "parse_model_name", "register_block", "register_size"]

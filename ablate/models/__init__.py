"""DiT models: one model file, registries of conditioning blocks and of layer choices, a
table of sizes."""
from .blocks import BLOCKS, Block, layers_problem, naive_attention, register_block
from .configs import (MODELS, SIZES, Size, create_model, dit_kwargs, model_name, parse_model_name,
                      register_size)
from .dit import DiT
from .layers import MLPS, NORMS, POS_EMBEDS, Layers, register_mlp, register_norm, register_pos_embed

# The model's design choices a grid can set, each a registry of its values (``ablate ls``);
# qk_norm and long_skips are true or false.
DESIGN_CHOICES = {"block": BLOCKS, "norm": NORMS, "mlp": MLPS, "pos_embed": POS_EMBEDS}
SWITCHES = {"qk_norm": "RMSNorm over the head dim of q and k before attention (LightningDiT, SD3)",
            "long_skips": "U-ViT's long skips: block i's output joins block depth-1-i's input through Linear(2d, d)"}


def design_choices() -> list[tuple[str, str, str]]:
    """(setting, value, description) for every value of every design choice, defaults first."""
    def doc(obj) -> str:
        return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")

    rows = [(setting, name, doc(obj)) for setting, reg in DESIGN_CHOICES.items() for name, obj in reg.items()]
    rows += [(setting, value, text if value == "true" else "off (DiT)")
             for setting, text in SWITCHES.items() for value in ("false", "true")]
    return rows


__all__ = ["BLOCKS", "Block", "DESIGN_CHOICES", "DiT", "Layers", "MLPS", "MODELS", "NORMS", "POS_EMBEDS", "SIZES",
           "SWITCHES", "Size", "create_model", "design_choices", "dit_kwargs", "layers_problem", "model_name",
           "naive_attention", "parse_model_name", "register_block", "register_mlp", "register_norm",
           "register_pos_embed", "register_size"]

"""Building blocks shared by VGGT and MegaLoc (names follow the published checkpoints)."""

from .attention import Attention
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .rope import RotaryPositionEmbedding2D, patch_positions
from .vision_transformer import DinoVisionTransformer, dinov2

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "RotaryPositionEmbedding2D", "patch_positions",
           "DinoVisionTransformer", "dinov2"]

from moe_dist.model.moe import MoE, moe_layers
from moe_dist.model.router import Router, RouterOutput
from moe_dist.model.transformer import Transformer

__all__ = ["MoE", "Router", "RouterOutput", "Transformer", "moe_layers"]

from moe_dist.model.moe import MoE, moe_layers
from moe_dist.model.router import Router, RouterOutput
from moe_dist.model.transformer import Routing, Transformer

__all__ = ["MoE", "Router", "RouterOutput", "Routing", "Transformer", "moe_layers"]

from moe_dist.model.moe import MoE, moe_layers
from moe_dist.model.router import Router, RouterOutput
from moe_dist.model.transformer import Routing, Transformer, hidden_matrices

__all__ = ["MoE", "Router", "RouterOutput", "Routing", "Transformer", "hidden_matrices", "moe_layers"]

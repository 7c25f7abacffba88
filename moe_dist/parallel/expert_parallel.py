"""Expert parallelism: experts as DTensors sharded over "ep", tokens moved with all-to-all.

Each rank of an EP group owns `E / ep` consecutive experts. After the local permute, the rows for
destination rank p are contiguous (experts are sorted), so one uneven all-to-all sends them all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from kernels.routing import permute, plan_routing, unpermute
from moe_dist.model.moe import GroupedExperts, MoE
from moe_dist.model.router import RouterOutput


class AllToAllDispatcher:
    """Send each routed row to the rank owning its expert, run the local experts, send the results back."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep

    def __call__(self, tokens: Tensor, route: RouterOutput, experts: GroupedExperts) -> Tensor:
        plan = plan_routing(route.expert_ids, self.num_experts, route.keep)
        rows = permute(tokens, plan)

        # counts_in[s, j]: rows that rank s sends to my local expert j.
        counts_in = torch.empty_like(plan.counts)
        dist.all_to_all_single(counts_in, plan.counts, group=self.group)
        counts_in = counts_in.view(self.ep, self.num_local)
        send = plan.counts.view(self.ep, self.num_local).sum(1)
        # One host sync per layer: all_to_all_single needs the split sizes on the host.
        send_splits, recv_splits = torch.stack([send, counts_in.sum(1)]).tolist()
        received = funcol.all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)

        if self.num_local == 1:  # one local expert: the received rows are one group already
            outputs = experts(received, counts_in.sum(0))
        else:  # received rows are ordered (source rank, local expert): regroup them by local expert
            local_ids = torch.arange(self.num_local, device=tokens.device).repeat(self.ep)
            local_ids = torch.repeat_interleave(local_ids, counts_in.reshape(-1), output_size=sum(recv_splits))
            local_plan = plan_routing(local_ids.unsqueeze(1), self.num_local)
            outputs = unpermute(experts(permute(received, local_plan), local_plan.counts), local_plan)

        returned = funcol.all_to_all_single_autograd(outputs, send_splits, recv_splits, self.group)
        return unpermute(returned, plan, route.weights)


def apply_expert_parallel(moe: MoE, ep_mesh: DeviceMesh) -> None:
    """Shard `moe`'s experts over `ep_mesh` (DTensor Shard(0)) and swap in the all-to-all dispatcher."""
    experts = moe.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)  # same on all ranks
        setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    moe.dispatch = AllToAllDispatcher(ep_mesh, moe.router.num_experts)

"""Expert parallelism: experts as DTensors sharded over "ep", rows moved with all-to-all, overlapped.

Each rank of an EP group owns `E / ep` consecutive experts. The layer's tokens are cut into `chunks`
and its (token, choice) pairs are sorted by (chunk, local expert j, destination rank p), so that for
every (chunk, j) the rows for each rank are contiguous and one uneven all-to-all per (chunk, j) moves
them. They land ordered (j, source rank): grouped by local expert already, with no regroup.

The all-to-alls are asynchronous (`async_op` work handles; NCCL runs them on its own stream), so
while chunk c's experts compute, chunk c+1 is on its way there and chunk c-1 on its way back, and
the shared expert runs while chunk 0 is in flight. Backward mirrors this without extra code: the
autograd engine runs the ready node created last first, so it walks these nodes in reverse, and
each "start" becomes a wait and each "wait" a start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import Shard, distribute_tensor

from moe_dist.model.moe import MoE


@dataclass
class _Splits:
    """One chunk's rows per (local expert j, rank): what this rank sends, and what it receives."""

    send: list[list[int]]  # [j][p] rows for local expert j of rank p
    recv: list[list[int]]  # [j][s] rows for my local expert j from rank s
    group: dist.ProcessGroup

    def reverse(self) -> _Splits:
        return _Splits(self.recv, self.send, self.group)


class _InFlight:
    """The work handles of one chunk's transfer: forward's, then backward's with its landing buffer."""

    def __init__(self, splits: _Splits):
        self.splits = splits
        self.works: list[dist.Work] = []
        self.grad: Tensor | None = None


def _start(rows: Tensor, splits: _Splits) -> tuple[Tensor, list[dist.Work]]:
    """Start one all-to-all per local expert; the rows land in one buffer ordered (j, source rank)."""
    rows = rows.contiguous()
    landed = rows.new_empty(sum(map(sum, splits.recv)), rows.shape[1])
    works, sent, received = [], 0, 0
    for send, recv in zip(splits.send, splits.recv):
        n_send, n_recv = sum(send), sum(recv)
        works.append(dist.all_to_all_single(landed[received:received + n_recv], rows[sent:sent + n_send],
                                            recv, send, group=splits.group, async_op=True))
        sent, received = sent + n_send, received + n_recv
    return landed, works


class _Send(torch.autograd.Function):
    """Starts the transfer; its output is not valid before `_Land`. Backward: waits for the gradient."""

    @staticmethod
    def forward(ctx, rows: Tensor, flight: _InFlight) -> Tensor:
        ctx.flight = flight
        landed, flight.works = _start(rows, flight.splits)
        return landed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_landed: Tensor):
        flight = ctx.flight
        for work in flight.works:
            work.wait()
        grad, flight.grad, flight.works = flight.grad, None, []
        return grad, None


class _Land(torch.autograd.Function):
    """Waits for the transfer. Backward: starts the gradient's transfer the other way."""

    @staticmethod
    def forward(ctx, landed: Tensor, flight: _InFlight) -> Tensor:
        ctx.flight = flight
        for work in flight.works:
            work.wait()
        flight.works = []
        # Filled in place by the transfer: returned as itself, not as a view (which a wrapper such as FSDP
        # would have to treat as one an in-place op could detach from its hooks).
        ctx.mark_dirty(landed)
        return landed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        flight = ctx.flight
        flight.grad, flight.works = _start(grad, flight.splits.reverse())
        # The gradient lands in flight.grad, shaped like the sent rows; `_Send.backward`, this edge's only
        # consumer, waits for it and passes it on. Autograd wants this edge shaped like `landed`: `grad` is.
        return grad, None


def _transfer_start(rows: Tensor, splits: _Splits) -> tuple[Tensor, _InFlight]:
    flight = _InFlight(splits)
    return _Send.apply(rows, flight), flight


# parallel.ep_chunks = 0 (auto), on CPU: one chunk per this many bytes of rows a rank sends, at most
# MAX_AUTO_CHUNKS. Measured on the 2-core CPU (benchmarks/RESULTS.md): at 8 MiB a rank 4 chunks beat 2 and 2
# beat 1, at 4 MiB 2 chunks were best, at 2 MiB 1 and 2 tied, and below that (the tiny config: 0.5 MiB) one
# chunk won, where each extra all-to-all's latency outweighs what it hides.
AUTO_CHUNK_BYTES = 2 * 2**20
MAX_AUTO_CHUNKS = 4


def auto_chunks(device: torch.device, bytes_per_rank: int) -> int:
    """parallel.ep_chunks = 0: chunks for a layer whose ranks each send `bytes_per_rank` of rows."""
    if device.type != "cpu":
        # Not measured on GPUs yet (`make gpu-check` runs the overlap benchmark): unchunked until it says otherwise.
        return 1
    return max(1, min(MAX_AUTO_CHUNKS, bytes_per_rank // AUTO_CHUNK_BYTES))


class AllToAllExchange:
    """Send each chunk's grouped rows to the ranks owning their experts, compute there, send the results back.

    The number of chunks is fixed when the exchange is built, from the config alone: every rank must cut as
    many, whatever number of tokens it routes.
    """

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int, chunks: int):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep
        self.chunks = chunks

    def group_of(self, expert_ids: Tensor) -> tuple[Tensor, int]:
        """Pairs sorted by (chunk of their token, local expert, destination rank)."""
        num_tokens = expert_ids.shape[0]
        chunk = torch.arange(num_tokens, device=expert_ids.device).mul_(self.chunks).div_(
            max(num_tokens, 1), rounding_mode="floor").unsqueeze(1)
        rank, local = expert_ids.div(self.num_local, rounding_mode="floor"), expert_ids % self.num_local
        return (chunk * self.num_local + local) * self.ep + rank, self.chunks * self.num_experts

    @torch.compiler.disable
    def __call__(self, rows: Tensor, counts: Tensor, compute: Callable[[Tensor, Tensor], Tensor],
                 alongside: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]:
        send_PCJ = counts.view(self.chunks, self.num_local, self.ep).permute(2, 0, 1).contiguous()
        recv_PCJ = torch.empty_like(send_PCJ)
        dist.all_to_all_single(recv_PCJ, send_PCJ, group=self.group)
        # The exchange's one host sync: every chunk's split sizes at once.
        send, recv = torch.stack([send_PCJ, recv_PCJ]).permute(0, 2, 3, 1).tolist()  # [2][C][J][P]
        splits = [_Splits(send[c], recv[c], self.group) for c in range(self.chunks)]
        expert_counts_CJ = recv_PCJ.sum(0)
        chunk_rows = rows.split([sum(map(sum, s.send)) for s in splits])

        in_flight = [_transfer_start(chunk_rows[0], splits[0])]
        shared = alongside() if alongside is not None else None
        returning, returned = None, []
        for c in range(self.chunks):
            if c + 1 < self.chunks:
                in_flight.append(_transfer_start(chunk_rows[c + 1], splits[c + 1]))
            landed = _Land.apply(*in_flight[c])
            outputs = compute(landed, expert_counts_CJ[c])
            if returning is not None:
                returned.append(_Land.apply(*returning))
            returning = _transfer_start(outputs, splits[c].reverse())
        returned.append(_Land.apply(*returning))
        return (returned[0] if self.chunks == 1 else torch.cat(returned)), shared


def apply_expert_parallel(moe: MoE, ep_mesh: DeviceMesh, chunks: int) -> None:
    """Shard `moe`'s experts over `ep_mesh` (DTensor Shard(0)), every [E, ...] parameter alike (the weights, and
    the biases where there are), and swap in the all-to-all exchange."""
    experts = moe.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)  # same on all ranks
        setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    moe.exchange = AllToAllExchange(ep_mesh, moe.router.num_experts, chunks)

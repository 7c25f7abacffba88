"""Which rank orthogonalises each of Muon's matrices, and which pieces of it travel where.

Newton-Schulz needs a matrix whole, but FSDP2 holds each parameter cut over the ranks, and EP holds an expert
stack's experts on different ranks, each again cut over its dp_shard ranks. So each matrix (a 2-D weight, or one
expert of an [E, a, b] stack) gets one owner among the ranks that hold a piece of it, and is orthogonalised there
once in the world. An expert's holders are the ranks of its own dp_shard group, so it never leaves them.

Owners are picked longest first by Newton-Schulz FLOPs, each matrix to the least loaded of its holders (LPT
scheduling, within 4/3 of the best possible maximum), ties to the holder with the largest piece (the fewest bytes
to move). A step then moves each piece to its owner once and the owner's result back once, in bf16 (Newton-Schulz
casts to bf16 first, so the cast commutes with the cut): one all-to-all each way for all matrices at once.

The plan depends only on shapes and placements: every rank computes the same one without communicating, and a
simulated rank computes the whole world's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
# The per-coordinate form of DTensor's own shard arithmetic (the public one answers for this rank only): the plan
# needs every rank's box, including _StridedShard's (FSDP2 over an EP-sharded expert stack).
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

BF16_BYTES = 2


@dataclass(frozen=True)
class Piece:
    """The part of one matrix that one rank holds."""

    rank: int
    local: tuple  # its index in the holder's local tensor
    rows: slice  # where it sits in the matrix
    cols: slice

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Matrix:
    param: int  # index into the plan's parameters
    expert: int | None  # which expert of an [E, a, b] stack; None for a 2-D weight
    shape: tuple[int, int]
    pieces: list[Piece]
    owner: int = -1


def newton_schulz_flops(shape: tuple[int, int], steps: int) -> int:
    """FLOPs of torch's quintic Newton-Schulz on an [a, b] matrix, run on its wide form [m, n], m <= n: per step
    X X^T (2 m^2 n), the Gram polynomial (2 m^3) and its product with X (2 m^2 n)."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def _boxes(tensor: Tensor, rank: int) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(rank, local shape, global offset) of every rank's shard of `tensor`; a plain tensor is whole on `rank`."""
    if not isinstance(tensor, DTensor):
        yield rank, tuple(tensor.shape), (0,) * tensor.dim()
        return
    ranks = tensor.device_mesh.mesh
    for coordinate in itertools.product(*map(range, ranks.shape)):
        shape, offset = _compute_local_shape_and_global_offset(tensor.shape, ranks.shape, list(coordinate),
                                                               tensor.placements)
        yield int(ranks[coordinate]), tuple(shape), tuple(offset)


def _matrices(params: list[Tensor], rank: int) -> list[Matrix]:
    """Every matrix of `params` with the pieces each rank holds, in parameter order, then expert order."""
    matrices: dict[tuple[int, int | None], Matrix] = {}
    for i, param in enumerate(params):
        if param.dim() not in (2, 3):
            raise ValueError(f"Muon takes matrices and [E, a, b] expert stacks, not a tensor of shape "
                             f"{tuple(param.shape)}")
        stack = param.dim() == 3
        for e in range(param.shape[0] if stack else 1):
            key = (i, e if stack else None)
            matrices[key] = Matrix(i, key[1], tuple(param.shape[-2:]), [])
        for holder, shape, offset in _boxes(param, rank):
            if math.prod(shape) == 0:
                continue
            (r0, c0), (rows, cols) = offset[-2:], shape[-2:]
            block = (slice(r0, r0 + rows), slice(c0, c0 + cols))
            if not stack:
                matrices[(i, None)].pieces.append(Piece(holder, (slice(None), slice(None)), *block))
                continue
            for e in range(offset[0], offset[0] + shape[0]):
                matrices[(i, e)].pieces.append(Piece(holder, (e - offset[0],), *block))
    for m in matrices.values():
        if sum(p.numel for p in m.pieces) != math.prod(m.shape):
            raise ValueError(f"Muon: parameter {m.param}'s shards do not cut it into disjoint pieces (a replicated "
                             f"mesh dim?): only sharded placements are supported")
    return list(matrices.values())


def _assign_owners(matrices: list[Matrix], world: int, ns_steps: int) -> None:
    load = [0] * world
    for m in sorted(matrices, key=lambda m: -newton_schulz_flops(m.shape, ns_steps)):  # stable: ties in order
        owner = min(m.pieces, key=lambda p: (load[p.rank], -p.numel, p.rank)).rank
        m.owner = owner
        load[owner] += newton_schulz_flops(m.shape, ns_steps)


def _buckets(matrices: list[Matrix], numel: int) -> list[list[Matrix]]:
    """`matrices` in order, cut into runs of at most `numel` elements (or one matrix, where it is larger)."""
    buckets: list[list[Matrix]] = []
    size = numel
    for m in matrices:
        if size + math.prod(m.shape) > numel:
            buckets.append([])
            size = 0
        buckets[-1].append(m)
        size += math.prod(m.shape)
    return buckets


@dataclass
class Bucket:
    """One pair of all-to-alls: this rank's pieces of the bucket's matrices by owner, its own matrices' pieces by
    holder; both ends list a pair's pieces in the matrices' order."""

    sends: list[list[tuple[Matrix, Piece]]]
    recvs: list[list[tuple[Matrix, Piece]]]


# The matrices' elements one pair of all-to-alls carries: a step's transient memory is a bucket's, not every
# matrix's at once (at 8 ranks, 3.8B parameters a rank would hold 7 GiB of bf16 updates, and as much again in flight).
BUCKET_NUMEL = 2**26


@dataclass
class MuonPlan:
    """Owners of every matrix of `params` and this rank's part of the all-to-alls."""

    params: list[Tensor]
    rank: int
    world: int
    ns_steps: int
    bucket_numel: int = BUCKET_NUMEL
    matrices: list[Matrix] = field(init=False)

    def __post_init__(self):
        self.matrices = _matrices(self.params, self.rank)
        _assign_owners(self.matrices, self.world, self.ns_steps)
        # A matrix one rank holds whole is orthogonalised there, with no transfer.
        self.whole_here = [(m, m.pieces[0]) for m in self.matrices if len(m.pieces) == 1 and m.owner == self.rank]
        shared = [m for m in self.matrices if len(m.pieces) > 1]
        self.buckets = [Bucket([self._pieces(ms, owner=dest, holder=self.rank) for dest in range(self.world)],
                               [self._pieces(ms, owner=self.rank, holder=src) for src in range(self.world)])
                        for ms in _buckets(shared, self.bucket_numel)]

    @staticmethod
    def _pieces(matrices: list[Matrix], owner: int, holder: int) -> list[tuple[Matrix, Piece]]:
        return [(m, p) for m in matrices if m.owner == owner for p in m.pieces if p.rank == holder]

    def flops(self, rank: int) -> int:
        """Newton-Schulz FLOPs per step on `rank`."""
        return sum(newton_schulz_flops(m.shape, self.ns_steps) for m in self.matrices if m.owner == rank)

    def bytes_sent(self, rank: int) -> int:
        """What `rank` sends other ranks per step: its pieces to their owners, then its matrices' other pieces."""
        pieces = sum(p.numel for m in self.matrices for p in m.pieces
                     if p.rank != m.owner and rank in (p.rank, m.owner))
        return BF16_BYTES * pieces

    def ideal_bytes(self) -> int:
        """All ranks' bytes per step if every matrix were gathered once to the rank holding most of it and scattered
        back once, in bf16: what `bytes_sent` sums to over the ranks when the owners are those ranks."""
        return 2 * BF16_BYTES * sum(math.prod(m.shape) - max(p.numel for p in m.pieces) for m in self.matrices)

    def summary(self) -> str:
        """One line: Newton-Schulz FLOPs and bytes sent per rank, max / mean, and the bytes against the ideal."""
        flops = [self.flops(r) for r in range(self.world)]
        sent = [self.bytes_sent(r) for r in range(self.world)]
        mean_flops, mean_sent = sum(flops) / self.world, sum(sent) / self.world
        return (f"Muon: {len(self.matrices)} matrices over {self.world} ranks | Newton-Schulz per rank "
                f"{max(flops) / 1e9:.3g} GFLOP max, {mean_flops / 1e9:.3g} mean (max/mean "
                f"{max(flops) / mean_flops:.3f}) | sent per rank {max(sent) / 2**20:.3g} MiB max, "
                f"{mean_sent / 2**20:.3g} mean; all ranks {sum(sent) / max(self.ideal_bytes(), 1):.3f}x the ideal")

    def orthogonalise(self, update: Callable[[Matrix, Piece], Tensor],
                      newton_schulz: Callable[[Tensor], Tensor]) -> Iterator[tuple[Matrix, Piece, Tensor]]:
        """(matrix, piece, its orthogonalised part) for every piece this rank holds, bucket by bucket; `update`
        gives a piece's bf16 update from this rank's shards."""
        for m, p in self.whole_here:
            yield m, p, newton_schulz(update(m, p))
        for bucket in self.buckets:
            gathered = self._exchange([[update(m, p) for m, p in sends] for sends in bucket.sends],
                                      [[p for _, p in recvs] for recvs in bucket.recvs])
            whole: dict[int, Tensor] = {}
            for recvs, parts in zip(bucket.recvs, gathered):
                for (m, p), part in zip(recvs, parts):
                    if id(m) not in whole:
                        whole[id(m)] = part.new_empty(m.shape)
                    whole[id(m)][p.rows, p.cols] = part
            ortho = {key: newton_schulz(matrix) for key, matrix in whole.items()}
            returned = self._exchange([[ortho[id(m)][p.rows, p.cols] for m, p in recvs] for recvs in bucket.recvs],
                                      [[p for _, p in sends] for sends in bucket.sends])
            for sends, parts in zip(bucket.sends, returned):
                for (m, p), part in zip(sends, parts):
                    yield m, p, part

    def _exchange(self, outgoing: list[list[Tensor]], incoming: list[list[Piece]]) -> list[list[Tensor]]:
        """Send outgoing[r] (bf16 pieces) to each rank r; returns the pieces each rank r sends here, which
        incoming[r] names, shaped."""
        device = self.params[0].device
        flat = [t.reshape(-1) for pieces in outgoing for t in pieces]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.bfloat16, device=device)
        send_bytes = [BF16_BYTES * sum(t.numel() for t in pieces) for pieces in outgoing]
        recv_bytes = [BF16_BYTES * sum(p.numel for p in pieces) for pieces in incoming]
        recv = torch.empty(sum(recv_bytes) // BF16_BYTES, dtype=torch.bfloat16, device=device)
        # Moved as bytes: gloo's all-to-all takes neither bf16 nor int16.
        dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), recv_bytes, send_bytes)
        parts = iter(recv.split([p.numel for pieces in incoming for p in pieces]))
        return [[next(parts).view(p.shape) for p in pieces] for pieces in incoming]

"""A problem that one rank meets and every rank must stop on, together."""

from __future__ import annotations

import torch.distributed as dist


def first_problem(problem: str | None) -> str | None:
    """On every rank: the problem (a one-line message) of the first rank that has one, or None.

    Every rank calls it at the same point: a rank that stopped alone would leave the others waiting forever in
    their next collective, and the message reaches rank 0, which prints it, whichever rank met it.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)

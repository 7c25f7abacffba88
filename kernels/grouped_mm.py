"""Expert GEMMs over variable-size groups of rows, with the fastest backend that works.

Rows arrive grouped by expert (`counts[e]` consecutive rows for expert e); each projection may add a bias per
group, and the experts' gated activation is kernels/activation.py's. Backends:
- grouped_mm: `torch._grouped_mm`, one kernel for all groups (CUDA sm90/sm100 bf16, and CPU fp32/bf16).
  `grouped_swiglu` fuses the activation into its own backward and, on CPU, runs in chunks of rows.
- padded: scatter the groups into an [E, max_count, D] buffer and use one `bmm` per projection.
- loop: one matmul per expert; the reference and a fallback, never chosen by "auto".
"auto" follows a rule by device, compute capability, dtype and group size (`rule_backend`), and on CPU, where the
data says the rule is unsure, times both backends once per shape bucket and process until one clearly wins
(`select_backend`).
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from kernels.activation import SWIGLU, GatedActivation

BACKENDS = ("grouped_mm", "padded", "loop")


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # The answer is cached for the process: probe with autograd on even if the first caller has it off.
        # The first caller may be inside an activation-checkpointed block: identity saved-tensor hooks keep the
        # probe's own saved tensors out of that block's, which its recomputation (probe cached) would not save.
        # No random numbers either: the probe must not move the caller's RNG.
        with torch.inference_mode(False), torch.enable_grad(), saved_tensors_hooks(lambda t: t, lambda t: t):
            x = torch.ones(16, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
            _GroupedMM.apply(x, w, offsets).float().square().sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _aligned(*tensors: Tensor) -> bool:
    # torch._grouped_mm wants every row stride to be a multiple of 16 bytes.
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


# On CPU, while no group has more rows than this, the expert GEMMs are bound by reading the weights,
# not by FLOPs: one padded bmm (one batched BLAS call) beats torch._grouped_mm's call per group in
# spite of the padding (benchmarks/RESULTS.md). Bigger groups, or skewed ones, pay for the padding.
CPU_PADDED_MAX_ROWS = 64

# CUDA runs torch._grouped_mm as one grouped kernel only for bf16 on sm90 and sm100 (compute capability 9.x and
# 10.x); anywhere else (A100, L40S, fp32 on any GPU) it loops over the groups with one matmul each, after copying
# the offsets to the host. One padded bmm per projection beats that, and syncs with the host just the same.
CUDA_FAST_GROUPED_MM_MAJORS = (9, 10)


def rule_backend(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                 max_rows: int | None) -> str:
    """The rule's backend for operands on which torch._grouped_mm runs: from the device type, the CUDA compute
    capability (None off CUDA), the dtype and the largest group's rows (None where reading it costs a host sync)."""
    if device_type == "cuda":
        fast = capability is not None and capability[0] in CUDA_FAST_GROUPED_MM_MAJORS and dtype == torch.bfloat16
        return "grouped_mm" if fast else "padded"
    if device_type == "cpu" and max_rows is not None and max_rows <= CPU_PADDED_MAX_ROWS:
        return "padded"
    return "grouped_mm"


# Where the rule is unsure on CPU: in benchmarks/RESULTS.md and its JSON runs its pick lost to the
# other backend by 6-60%, in both directions, whenever the largest group had between about 20 and 300 rows
# (fwd and fwd+bwd often disagreeing, the crossover moving between runs and machines); it won or tied
# every row with more. There `auto` measures instead of guessing.
CPU_MEASURED_ROWS = (16, 512)  # (exclusive, inclusive) bounds on the largest group
# Below this many forward FLOPs a call takes a few ms and the backends are within noise of each other, so
# measuring cannot win back its cost. It also keeps the small shapes of tests and smoke runs (the tiny
# config: 1.5e8) on the rule, whose choice is the same in every process.
MEASURE_MIN_FLOPS = 2**28

MEASURED_BACKENDS: dict[tuple, str] = {}  # shape bucket -> backend, for the process (and its checkpoints)


def select_backend(x: Tensor, *weights: Tensor, counts: Tensor | None = None) -> str:
    """The fastest backend that works for `grouped_mm(x, w)` or `grouped_swiglu(x, w1, w3, w2)`; never "loop"."""
    if not (_aligned(x, *weights) and _grouped_mm_runs(x.device.type, x.dtype)):
        return "padded"
    device_type = x.device.type
    if counts is None or device_type != "cpu":
        # No timing off CPU: none in RESULTS.md says the rule is wrong there, and padded syncs with the host on
        # every call, a cost that a synchronized one-off timing would not charge it for.
        # ROCm reports its gfx9 parts as capability 9.x: only NVIDIA's sm90 / sm100 have torch's grouped kernel.
        nvidia = device_type == "cuda" and torch.version.hip is None
        capability = torch.cuda.get_device_capability(x.device) if nvidia else None
        return rule_backend(device_type, capability, x.dtype, None)
    max_rows = int(counts.max())  # reading counts is a host sync, free on CPU only
    rule = rule_backend(device_type, None, x.dtype, max_rows)
    low, high = CPU_MEASURED_ROWS
    flops = 2 * x.shape[0] * sum(w[0].numel() for w in weights)
    if not (low < max_rows <= high and flops >= MEASURE_MIN_FLOPS):
        return rule
    # The best backend differs between forward and forward+backward.
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
    key = (x.device.type, x.dtype, *(tuple(w.shape) for w in weights), _pow2(x.shape[0]), _pow2(max_rows), backward)
    if key not in MEASURED_BACKENDS:
        MEASURED_BACKENDS[key] = _measured_choice(rule, x, weights, counts, backward)
    return MEASURED_BACKENDS[key]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# How much faster the other backend must be to override the rule.
CLEAR_WIN = 1.05
# Timed rounds: one call of each backend, after WARMUP_ROUNDS untimed ones (first calls pay for allocations and
# page faults; on CPU one round was not enough). On a shared machine one call in three can be 2-3x slow, and a
# median of three rounds picked a backend 1.5x slower (benchmarks/RESULTS.md): rounds go on until the margin is
# clear, and the rule stands where it never is.
WARMUP_ROUNDS = 2
MIN_ROUNDS, MAX_ROUNDS = 3, 11


def _measured_choice(rule: str, x: Tensor, weights: tuple[Tensor, ...], counts: Tensor, backward: bool) -> str:
    """The other backend where it is clearly faster than the rule's on these operands, else the rule's."""
    other = "grouped_mm" if rule == "padded" else "padded"
    call = _backend_call(x, weights, counts, backward)
    ratios: list[float] = []  # per round: the other backend's time over the rule's
    # The first call may come from an activation-checkpointed block: as for the probe above, identity hooks keep
    # what the timing saves out of that block's saved tensors.
    with saved_tensors_hooks(lambda t: t, lambda t: t):
        for _ in range(WARMUP_ROUNDS):
            call(rule)
            call(other)
        for r in range(MAX_ROUNDS):
            # Alternate the order: drift, and the state one backend leaves for the next, fall on both alike.
            seconds = _time_round(call, (rule, other) if r % 2 else (other, rule))
            ratios.append(seconds[other] / seconds[rule])
            choice = _clear_choice(rule, other, ratios)
            if choice is not None:
                return choice
    return rule


def _clear_choice(rule: str, other: str, ratios: list[float]) -> str | None:
    """The backend the ratios (other / rule, one per round) clearly favour, or None while they are unsure."""
    if len(ratios) < MIN_ROUNDS:
        return None
    # A confidence interval of the median ratio from order statistics: a quarter of the rounds at either end
    # may be outliers (a slow call of either backend) without moving it. Paired ratios rather than each
    # backend's own times: a stretch of contention slows both calls of a round alike.
    ordered = sorted(ratios)
    trim = len(ordered) // 4
    low, high = ordered[trim], ordered[-1 - trim]
    if high * CLEAR_WIN < 1:
        return other
    # Overriding only on a clear win keeps near-ties on the rule, so that noise flips fewer choices between
    # processes (another backend changes the numbers in their last bits; a resumed run takes its checkpoint's
    # choices, but a fresh run measures afresh).
    if low * CLEAR_WIN >= 1:
        return rule
    return None


def _time_round(call: Callable[[str], None], order: tuple[str, str]) -> dict[str, float]:
    """Seconds of one call of each backend, in this order."""
    seconds = {}
    for backend in order:
        start = time.perf_counter()
        call(backend)
        seconds[backend] = time.perf_counter() - start
    return seconds


def _backend_call(x: Tensor, weights: tuple[Tensor, ...], counts: Tensor, backward: bool) -> Callable[[str], None]:
    """call(backend): the experts on these operands, forward or forward+backward, leaving the caller's state alone."""
    op = grouped_swiglu if len(weights) == 3 else grouped_mm

    def call(backend: str) -> None:
        if not backward:
            with torch.no_grad():
                op(x, *weights, counts, backend)
            return
        # Detached copies: the caller's graph and grads stay as they were. Ones, not random numbers: the
        # caller's RNG must not move.
        with torch.inference_mode(False), torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (x, *weights)]
            out = op(*inputs, counts, backend)
            out.backward(torch.ones_like(out))

    return call


class _GroupedMM(torch.autograd.Function):
    """torch._grouped_mm with an explicit backward (its own needs contiguous gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, w.transpose(-2, -1), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x.t(), grad_out, offs=offsets)
        return grad_x, grad_w, None


# On CPU the grouped SwiGLU goes through its rows in chunks whose [rows, hidden] intermediates are
# about this big, so that they stay in cache between the GEMMs and the activation instead of
# streaming [N, hidden] tensors through memory several times (benchmarks/RESULTS.md).
CPU_CHUNK_BYTES = 8 * 2**20


@dataclass
class _Chunk:
    rows: slice  # rows of the grouped input
    experts: slice  # the experts owning them
    offsets: Tensor  # int32 [experts]: cumulative row counts within the chunk, as torch._grouped_mm takes


def _chunks(counts: Tensor, num_rows: int, chunk_rows: int) -> list[_Chunk]:
    """Cut the grouped rows into chunks of at most `chunk_rows`; one chunk, without a host sync, if they fit."""
    if num_rows <= chunk_rows:
        return [_Chunk(slice(0, num_rows), slice(0, counts.numel()), torch.cumsum(counts, 0).to(torch.int32))]
    ends = torch.cumsum(counts, 0).tolist()  # host sync: chunks are only cut on CPU
    chunks = []
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        first, last = bisect.bisect_right(ends, start), bisect.bisect_left(ends, stop)  # experts in [start, stop)
        offsets = [min(end, stop) - start for end in ends[first:last + 1]]
        chunks.append(_Chunk(slice(start, stop), slice(first, last + 1),
                             torch.tensor(offsets, dtype=torch.int32, device=counts.device)))
    return chunks


def _chunk_rows(x: Tensor, hidden: int) -> int:
    if x.device.type != "cpu":
        return max(x.shape[0], 1)
    return max(1, CPU_CHUNK_BYTES // (hidden * x.element_size()))


class _GroupedSwiGLU(torch.autograd.Function):
    """Gated experts through torch._grouped_mm, chunk by chunk; saves the pre-activations h1 and h3 only (autograd
    would also keep the activation's intermediates) and recomputes the activation in backward. Biases (b1 [E, H],
    b3 [E, H], b2 [E, D]) are added per row from `group_of_row` [N], given with them; all or none."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, b1: Tensor | None, b3: Tensor | None,
                b2: Tensor | None, chunks: list[_Chunk], act: GatedActivation, group_of_row: Tensor | None) -> Tensor:
        out = None if len(chunks) == 1 else x.new_empty(x.shape[0], w2.shape[-1])
        hidden = []
        for c in chunks:
            rows = x[c.rows]
            h1 = torch._grouped_mm(rows, w1[c.experts], offs=c.offsets)
            h3 = torch._grouped_mm(rows, w3[c.experts], offs=c.offsets)
            groups = None if group_of_row is None else group_of_row[c.rows]
            if groups is not None:
                h1.add_(b1.index_select(0, groups))
                h3.add_(b3.index_select(0, groups))
            chunk_out = torch._grouped_mm(act.apply_(h1, h3), w2[c.experts], offs=c.offsets)
            if groups is not None:
                chunk_out.add_(b2.index_select(0, groups))
            if out is None:
                out = chunk_out
            else:
                out[c.rows] = chunk_out  # while it is still in cache
            hidden += [h1, h3]
        ctx.chunks, ctx.act, ctx.bias_dtype = chunks, act, None if b1 is None else b1.dtype
        ctx.save_for_backward(x, w1, w3, w2, group_of_row, *hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w1, w3, w2, group_of_row, *hidden = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        whole = len(ctx.chunks) == 1
        grad_x = None if whole else torch.empty_like(x)
        grad_w = [None] * 3 if whole else [torch.zeros_like(w) for w in (w1, w3, w2)]
        grad_b = [None] * 3
        if group_of_row is not None:
            # Summed per group in fp32 whatever the dtype: a bias's gradient sums over all its expert's rows.
            grad_b = [x.new_zeros(w.shape[0], w.shape[-1], dtype=torch.float32) for w in (w1, w3, w2)]
        for c, h1, h3 in zip(ctx.chunks, hidden[0::2], hidden[1::2]):
            rows, grad, e, offs = x[c.rows], grad_out[c.rows], c.experts, c.offsets
            grad_act = torch._grouped_mm(grad, w2[e].transpose(-2, -1), offs=offs)
            # The activation's derivatives in fp32 for half types, as autograd's own kernels do.
            act, grad_h1f, grad_h3f = ctx.act.derivatives(
                *(t.to(torch.promote_types(t.dtype, torch.float32)) for t in (h1, h3, grad_act)))
            act, grad_h1, grad_h3 = (t.to(x.dtype) for t in (act, grad_h1f, grad_h3f))
            grad_rows = torch._grouped_mm(grad_h1, w1[e].transpose(-2, -1), offs=offs).add_(
                torch._grouped_mm(grad_h3, w3[e].transpose(-2, -1), offs=offs))
            if whole:
                grad_x = grad_rows
            else:
                grad_x[c.rows] = grad_rows
            parts = (torch._grouped_mm(rows.t(), grad_h1, offs=offs), torch._grouped_mm(rows.t(), grad_h3, offs=offs),
                     torch._grouped_mm(act.t(), grad, offs=offs))
            for i, part in enumerate(parts):
                if whole:
                    grad_w[i] = part
                else:
                    grad_w[i][e] += part
            if group_of_row is not None:
                groups = group_of_row[c.rows]
                for g, part in zip(grad_b, (grad_h1f, grad_h3f, grad)):
                    g.index_add_(0, groups, part.float())
        grad_b = [g if g is None else g.to(ctx.bias_dtype) for g in grad_b]
        return grad_x, *grad_w, *grad_b, None, None, None


class PaddedGroups:
    """Index maps between grouped rows [N, D] and a zero-padded [E, capacity, D] layout."""

    def __init__(self, counts: Tensor, num_rows: int):
        self.num_groups = counts.numel()
        self.capacity = int(counts.max())  # one host sync per call
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(self.num_groups, device=counts.device), counts,
                                        output_size=num_rows)
        position = torch.arange(num_rows, device=counts.device) - starts[group]
        self.index = group * self.capacity + position

    def pad(self, rows: Tensor) -> Tensor:
        padded = rows.new_zeros(self.num_groups * self.capacity, rows.shape[1])
        return padded.index_copy(0, self.index, rows).view(self.num_groups, self.capacity, rows.shape[1])

    def unpad(self, padded: Tensor) -> Tensor:
        return padded.reshape(self.num_groups * self.capacity, padded.shape[-1]).index_select(0, self.index)


def _loop(x: Tensor, w: Tensor, counts: Tensor, bias: Tensor | None = None) -> Tensor:
    groups = x.split(counts.tolist())
    if bias is None:
        return torch.cat([g @ w_e for g, w_e in zip(groups, w.unbind(0))])
    return torch.cat([torch.addmm(b_e, g, w_e) for g, w_e, b_e in zip(groups, w.unbind(0), bias.unbind(0))])


def _bmm(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """[E, C, K] @ [E, K, M] (+ bias [E, M] on every row of its group)."""
    return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)


def _group_of_row(counts: Tensor, num_rows: int) -> Tensor:
    """[N] the group of each grouped row; no host sync."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=num_rows)


# Variable-size groups run eagerly under torch.compile: the padded path syncs with the host, and
# dynamo's shape rules for torch._grouped_mm accept only bf16 while the CPU kernel also takes fp32.
@torch.compiler.disable
def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, backend: str = "auto", bias: Tensor | None = None) -> Tensor:
    """`x [N, K]` grouped by `counts [E]`, `w [E, K, M]` -> `[N, M]`: group e times w[e] (+ bias[e], bias [E, M])."""
    if backend == "auto":
        backend = select_backend(x, w, counts=counts)
    if backend == "grouped_mm":
        out = _GroupedMM.apply(x, w, torch.cumsum(counts, 0).to(torch.int32))
        return out if bias is None else out + bias.index_select(0, _group_of_row(counts, x.shape[0]))
    if backend == "padded":
        groups = PaddedGroups(counts, x.shape[0])
        return groups.unpad(_bmm(groups.pad(x), w, bias))
    if backend == "loop":
        return _loop(x, w, counts, bias)
    raise ValueError(f"grouped_mm: unknown backend {backend!r} (valid: auto, {', '.join(BACKENDS)})")


@torch.compiler.disable
def grouped_swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, counts: Tensor, backend: str = "auto", *,
                   biases: tuple[Tensor, Tensor, Tensor] | None = None, act: GatedActivation = SWIGLU) -> Tensor:
    """Gated experts on grouped rows: `act(x w1[e] + b1[e], x w3[e] + b3[e]) w2[e] + b2[e]` for each group e
    (`biases` = (b1 [E, H], b3 [E, H], b2 [E, D]), or none); `act` defaults to SwiGLU, silu(h1) * h3."""
    if backend == "auto":
        backend = select_backend(x, w1, w3, w2, counts=counts)
    b1, b3, b2 = biases if biases is not None else (None, None, None)
    if backend == "padded":  # pad once for all three projections
        groups = PaddedGroups(counts, x.shape[0])
        padded = groups.pad(x)
        # The padding rows come out as act(b1, b3) w2 + b2, not 0: unpad drops them, and their gradient is 0.
        hidden = act(_bmm(padded, w1, b1), _bmm(padded, w3, b3))
        return groups.unpad(_bmm(hidden, w2, b2))
    if backend == "grouped_mm":
        chunks = _chunks(counts, x.shape[0], _chunk_rows(x, w1.shape[-1]))
        group_of_row = None if biases is None else _group_of_row(counts, x.shape[0])
        return _GroupedSwiGLU.apply(x, w1, w3, w2, b1, b3, b2, chunks, act, group_of_row)
    hidden = act(grouped_mm(x, w1, counts, backend, b1), grouped_mm(x, w3, counts, backend, b3))
    return grouped_mm(hidden, w2, counts, backend, b2)

"""Gradient accumulation weighted by samples, on one process or summed across ranks.

The one accumulation of the project: :func:`accumulate_gradients` is what the ``nft_update`` stage calls
for every optimizer step, and what the tests check.

Derivation. An optimizer step sees micro-batches ``m = 1..M`` (on one rank, or spread over ranks) of
``n_m`` samples each, ``N = sum_m n_m`` in all. Each micro-batch's loss is the mean of its per-sample
losses, ``L_m = (1 / n_m) sum_{i in m} l_i``. The target is the gradient of the mean loss over all
samples::

    grad (1/N) sum_i l_i  =  sum_m (n_m / N) grad L_m

so each micro-batch is back-propagated with weight ``n_m / N`` and the gradients add up in ``.grad``.
Weighting every micro-batch by ``1 / M`` instead (the earlier inline accumulation) is only equal when all
``n_m`` are equal; with unequal micro-batches it over-weights the samples of the small ones.

Across ranks. Rank ``k`` holds micro-batches with ``N_k`` samples; ``N = sum_k N_k`` is all-reduced
first (one integer), every rank back-propagates ``(n_m / N) L_m`` of its own micro-batches, and the
gradients are all-reduced with a SUM::

    sum_k sum_{m on k} (n_m / N) grad L_m  =  sum_m (n_m / N) grad L_m

i.e. "the sum of sample-weighted gradients divided by the sum of sample counts", with the division done
before the backward (the same numbers as the single process sees, no large intermediate sums, and the
fp16 loss scale applies unchanged). The result equals the single-process accumulation over the union of
the samples. Every rank must call it (it holds collectives), with at least one micro-batch or none.

Under FSDP2 the model's backward does the cross-rank SUM itself (a reduce-scatter into each rank's gradient
shard, with the gradient divide factor set to 1: :func:`astrolabe.parallel.sum_gradients_across_ranks`), so
``model_sums_gradients=True`` skips the all-reduce. Every forward and backward of an FSDP model is a
collective, so every rank must run as many micro-batches as the others: a rank with fewer passes
``padding``, loss closures back-propagated with weight 0 after its own micro-batches (they add nothing).

Exactness. The identity holds for losses that are means of per-sample terms (the NFT policy term). A
term averaged over a subset of a micro-batch (the selective KL averages over the flagged samples of the
micro-batch, :func:`astrolabe.rl.nft.selective_kl`) enters with the micro-batch's weight ``n_m / N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from astrolabe.rl.optim import StepStats
    from astrolabe.rl.state import TrainingState

T = TypeVar("T")

__all__ = ["accumulate_gradients", "accumulate_step", "all_reduce_gradients", "global_sample_count",
           "sample_weights", "shuffled_steps"]


def sample_weights(sizes: Sequence[int], total: int) -> list[float]:
    """``n_m / N`` of every micro-batch (module docstring); ``total`` is N over every rank."""
    if any(n < 1 for n in sizes):
        raise ValueError(f"micro-batch sizes must be >= 1, got {list(sizes)}")
    if total < sum(sizes) or total < 1:
        raise ValueError(f"total sample count {total} is smaller than this rank's {sum(sizes)} samples")
    return [n / total for n in sizes]


def _distributed(across_ranks: bool | None) -> bool:
    """``across_ranks=None``: sum across ranks iff a process group is initialised."""
    if across_ranks is None:
        return dist.is_available() and dist.is_initialized()
    if across_ranks and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("across_ranks=True needs an initialised torch.distributed process group")
    return across_ranks


def global_sample_count(local: int, group: Any = None) -> int:
    """``N = sum_k N_k`` over the ranks of ``group`` (all-reduce SUM of one int64)."""
    t = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], group: Any = None) -> None:
    """SUM every parameter's ``.grad`` across ranks (a missing grad takes part as zeros, then stays set).

    The gradients are flattened into one buffer per dtype (one collective each) and copied back.
    """
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])  # (sum numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def accumulate_gradients(
    state: TrainingState,
    loss_fn: Callable[[T], torch.Tensor],
    micro_batches: Sequence[T],
    sizes: Sequence[int],
    *,
    across_ranks: bool | None = None,
    group: Any = None,
    model_sums_gradients: bool = False,
    padding: Sequence[Callable[[], torch.Tensor]] = (),
) -> float:
    """Back-propagate ``(n_m / N) * loss_fn(mb_m)`` for every micro-batch; returns the sample-weighted mean loss.

    ``loss_fn(mb)`` returns the *mean* loss (a scalar) of micro-batch ``mb``, which holds ``sizes[m]``
    samples. ``across_ranks`` (None = when torch.distributed is initialised): ``N`` is the sample count of
    every rank of ``group`` and the gradients of ``state``'s trainable parameters are summed across ranks
    (module docstring). A stage that runs on one rank while the others wait passes ``across_ranks=False``.
    ``model_sums_gradients``: the backward already summed them (FSDP2); ``padding``: zero-weight loss closures
    run after the micro-batches, so that every rank runs the same number of forwards and backwards (FSDP2).
    """
    if len(sizes) != len(micro_batches):
        raise ValueError(f"{len(sizes)} sizes given for {len(micro_batches)} micro-batches")
    distributed = _distributed(across_ranks)
    total = global_sample_count(sum(sizes), group) if distributed else sum(sizes)
    if total == 0:
        raise ValueError("no micro-batches to accumulate (0 samples on every rank)")
    loss_sum = torch.zeros((), dtype=torch.float64)
    for mb, w in zip(micro_batches, sample_weights(sizes, total), strict=True):
        with state.autocast():
            loss = loss_fn(mb)
        state.backward(loss * w)
        loss_sum += float(loss.detach()) * w
    for pad in padding:
        with state.autocast():
            loss = pad()
        state.backward(loss * 0.0)
    if distributed and not model_sums_gradients:
        all_reduce_gradients(state.params, group)
    if distributed:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM, group=group)
    return float(loss_sum)


def accumulate_step(
    state: TrainingState, loss_fn: Callable[[T], torch.Tensor], micro_batches: Sequence[T], sizes: Sequence[int],
    **reduction: Any,
) -> tuple[float, StepStats]:
    """:func:`accumulate_gradients` (``reduction``: its ``across_ranks`` / ``group``) and one optimizer step."""
    loss = accumulate_gradients(state, loss_fn, micro_batches, sizes, **reduction)
    return loss, state.optimizer_step()


def shuffled_steps(n: int, epochs: int, per_step: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Indices into ``n`` micro-batches (or groups) of each optimizer step: ``epochs`` passes, each one
    ``torch.randperm(n, generator)`` cut into chunks of ``per_step`` (the last chunk of a pass may be shorter)."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, per_step):
            yield order[start : start + per_step]

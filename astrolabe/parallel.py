"""Parallelism applied to a built model (torchtitan style): activation checkpointing, then DDP or FSDP2.

:func:`parallelize` ``(model, cfg, mesh=None)`` applies, in this order:

1. **Activation checkpointing** (``cfg.activation_checkpointing``): every DiT block's forward is
   recomputed in backward (``torch.utils.checkpoint``, non-reentrant, per block), so a block keeps only its
   input for backward instead of every intermediate activation. It is the DiT's own per-block switch
   (:class:`astrolabe.models.wan.dit.WanDiT`), which engages when the module is in train mode with grad
   enabled: the update runs the trained policy's forward in train mode
   (:func:`astrolabe.rl.streaming_update.train_mode`), the no-grad forwards in eval mode. The values and
   gradients are unchanged; only memory and time change.
2. **Data parallelism** (``cfg.strategy``):

   - ``"none"``: the model itself (one process, or a stage that runs on one rank).
   - ``"ddp"``: :class:`torch.nn.parallel.DistributedDataParallel` over the mesh's process group (the
     default group without a mesh). Every rank holds the whole model; in backward the gradients are
     averaged over the ranks, so ranks that each take an equal share of a global batch with a mean loss
     take the same step as one process on the whole batch. For the 1.3B LoRA training.
   - ``"fsdp"``: FSDP2 ``fully_shard`` on every DiT block, then on the root, with
     ``MixedPrecisionPolicy(param_dtype=cfg.fsdp_param_dtype, reduce_dtype=float32)`` (no input cast: the DiT
     casts its inputs itself, and the cast would copy a KV cache passed in): parameters are
     sharded across ranks and gathered block by block in ``cfg.fsdp_param_dtype`` (bf16), gradients are
     reduce-scattered in float32. For the 14B model.

The model is changed in place (AC flag, FSDP's module classes) and the module to call is returned (the
DDP wrapper, or the same object). A ``model`` wrapped by peft (LoRA) is fine: the DiT is found inside it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.models.wan.dit import WanDiT

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

__all__ = ["ParallelConfig", "dit_of", "parallelize", "set_activation_checkpointing", "sum_gradients_across_ranks"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ParallelConfig(Frozen):
    """How the update's model is parallelised (applied by :func:`parallelize` after it is built)."""

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="'none': one process; 'ddp': replicated model, gradients averaged (1.3B LoRA); "
        "'fsdp': FSDP2 fully_shard per DiT block + root, bf16 params, fp32 reduction (14B)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute every DiT block in backward (non-reentrant torch.utils.checkpoint): "
        "less activation memory, ~1 more forward of compute; same values."
    )
    fsdp_param_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="FSDP mixed-precision parameter dtype (reduction is always float32); float32 "
        "only for CPU/gloo runs and equality tests."
    )


def dit_of(model: nn.Module) -> WanDiT:
    """The one :class:`WanDiT` inside ``model`` (the model itself, or wrapped by peft / DDP)."""
    found = [m for m in model.modules() if isinstance(m, WanDiT)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one WanDiT inside {type(model).__name__}, found {len(found)}")
    return found[0]


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> bool:
    """Switch per-block activation checkpointing of the DiT inside ``model``; returns the previous setting."""
    dit = dit_of(model)
    before = bool(dit.gradient_checkpointing)
    dit.gradient_checkpointing = enabled
    return before


def _require_process_group(strategy: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"parallel.strategy={strategy!r} needs an initialised torch.distributed process group (run under "
            "torchrun: astrolabe.distributed.init_distributed); use parallel.strategy=none in one process"
        )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ddp_class() -> type[nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    class AttributeForwardingDDP(DistributedDataParallel):
        """DDP that answers attribute look-ups it lacks from the wrapped module (``model.config`` ...), as peft does."""

        def __getattr__(self, name: str) -> object:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return AttributeForwardingDDP


def apply_ddp(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """:class:`DistributedDataParallel` over ``mesh``'s group (default group when None); attributes of the
    wrapped model (``config``, ...) stay readable on the wrapper."""
    _require_process_group("ddp")
    device = _device_of(model)
    return _ddp_class()(
        model,
        device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
        process_group=mesh.get_group() if mesh is not None else None,
        forward_sync_buffers=False,  # a collective in every forward: ranks may run different numbers of forwards
    )


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype, mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2 ``fully_shard`` on every DiT block, then the root, bf16/fp32 params with fp32 reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _require_process_group("fsdp")
    if mesh is None:
        mesh = init_device_mesh(_device_of(model).type, (dist.get_world_size(),))
    # No input cast: the DiT casts its inputs to its weights' dtype itself, and FSDP's cast would rebuild a
    # KVCache (a dataclass) passed in, so the blocks would write their keys into a copy.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in dit_of(model).blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def sum_gradients_across_ranks(model: nn.Module) -> None:
    """Make FSDP2's gradient reduce-scatter a SUM over ranks instead of the mean (divide factor 1 on every
    ``fully_shard``-ed module): for losses already weighted by ``n_m / N`` over all ranks
    (:func:`astrolabe.rl.accumulation.accumulate_gradients` with ``model_sums_gradients=True``)."""
    from torch.distributed.fsdp import FSDPModule

    found = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no fully_shard-ed module: apply parallelize(strategy='fsdp') first"
        )
    for m in found:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; the factor is 1 anyway)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None = None) -> nn.Module:
    """Activation checkpointing, then DDP or FSDP2 (module docstring); returns the module to call."""
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.strategy == "ddp":
        model = apply_ddp(model, mesh)
    elif cfg.strategy == "fsdp":
        model = apply_fsdp(model, _DTYPES[cfg.fsdp_param_dtype], mesh)
    log.debug("parallelize: strategy=%s activation_checkpointing=%s", cfg.strategy, cfg.activation_checkpointing)
    return model

"""The policies of NFT training on one peft model: trained, old (sampling), KL reference, EMA.

Adapters held by one :class:`peft.PeftModel` (same LoRA layout, see :mod:`astrolabe.rl.lora`):

- ``default``: the trained policy theta; the only parameters that ever require grad.
- ``old``: the sampling policy. After a training phase ``theta_old <- d * theta_old + (1 - d) * theta``
  with ``d = old_policy_decay(n, kind)``, ``n`` = completed iterations (:mod:`astrolabe.rl.schedules`, reference
  5.2(G)).
- ``ref``: the KL reference, only for ``reference="lagging"``: a snapshot of ``default`` refreshed by
  :class:`ReferenceRefresher` (KL above a threshold or older than N iterations; reference 5.5). With
  ``reference="base"`` there is no ``ref`` adapter: the reference is the base model, i.e. every adapter
  disabled (``PeftModel.disable_adapter()``).
- EMA: a float32 shadow of ``default`` kept as plain tensors (not an adapter). From ``ema_start_step`` on,
  ``ema <- d * ema + (1 - d) * theta`` with ``d = ema_decay(step, ema_max_decay)``; at exactly
  ``ema_start_step`` the shadow is first reset to theta (the release's ``sync_with_model``).

All blends go through :func:`astrolabe.rl.schedules.blend_into_` (float32 arithmetic, cast back).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.rl.lora import (
    LoRAConfig,
    LoraMismatchError,
    add_lora_adapter,
    adapter_parameters,
    adapter_state_dict,
    apply_lora,
    check_lora_compatible,
    check_same_keys,
    lora_config_of,
    copy_adapter_,
    copy_into_adapter_,
    full_tensor,
)
from astrolabe.rl.schedules import (
    PolicyAveragingConfig,
    ReferenceRefreshConfig,
    ReferenceRefresher,
    blend_into_,
    ema_decay,
    old_policy_decay,
)

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

TRAINED, OLD, REF = "default", "old", "ref"
PolicyName = Literal["default", "old", "ref", "ema"]
ReferenceKind = Literal["base", "lagging"]


class PolicyConfig(Frozen):
    """Old-policy decay, EMA and KL reference of the training policies."""

    averaging: PolicyAveragingConfig = Field(
        default_factory=PolicyAveragingConfig, description="Old-policy decay kind and EMA (on/off, max decay)."
    )
    ema_start_step: int = Field(0, ge=0, description="First optimizer step that updates the EMA (release: 0).")
    reference: ReferenceKind = Field(
        "base", description="KL reference: 'base' = adapters disabled (release default), 'lagging' = refreshed snapshot."
    )
    refresh: ReferenceRefreshConfig = Field(
        default_factory=ReferenceRefreshConfig, description="When the lagging reference is refreshed (unused for 'base')."
    )


class PolicySet:
    """Trained / old / reference adapters and the EMA shadow on one ``PeftModel`` (module docstring).

    ``model`` must hold the ``default`` adapter built from ``lora``; the ``old`` (and, for a lagging
    reference, ``ref``) adapters are added here as exact copies of ``default``, so all policies start equal.
    """

    def __init__(self, model: PeftModel, lora: LoRAConfig, cfg: PolicyConfig, start_iteration: int = 0) -> None:
        if TRAINED not in model.peft_config:
            raise ValueError(f"the peft model has no {TRAINED!r} adapter; build it with apply_lora(model, cfg)")
        check_lora_compatible(lora, lora_config_of(model, TRAINED), "the 'default' adapter")
        self.model = model
        self.lora = lora
        self.cfg = cfg
        self._adapters = [TRAINED, OLD] + ([REF] if cfg.reference == "lagging" else [])
        for name in self._adapters[1:]:
            if name not in model.peft_config:
                add_lora_adapter(model, lora, name)
            copy_adapter_(model, TRAINED, name)
        extra = sorted(set(model.peft_config) - set(self._adapters))
        if extra:
            raise ValueError(f"the peft model holds unexpected adapters {extra}; PolicySet manages {self._adapters}")
        self._params = {name: adapter_parameters(model, name) for name in self._adapters}
        self.refresher: ReferenceRefresher | None = (
            ReferenceRefresher(cfg.refresh, start_iteration) if cfg.reference == "lagging" else None
        )
        self.ema: dict[str, torch.Tensor] | None = (
            {k: p.detach().float().clone() for k, p in self._params[TRAINED].items()} if cfg.averaging.ema else None
        )
        self._activate(TRAINED)
        frozen_leak = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        if frozen_leak:
            raise ValueError(f"base parameters require grad ({frozen_leak[:3]}...); freeze the base model before LoRA")

    @classmethod
    def build(
        cls, base: nn.Module, lora: LoRAConfig, cfg: PolicyConfig, generator: torch.Generator, start_iteration: int = 0
    ) -> PolicySet:
        """Wrap ``base`` (a WanDiT, modified in place) with LoRA and create every policy."""
        return cls(apply_lora(base, lora, generator=generator), lora, cfg, start_iteration)

    # ------------------------------------------------------------------ access
    @property
    def base_model(self) -> nn.Module:
        """The inner WanDiT."""
        return self.model.get_base_model()

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapters held: ('default', 'old') or ('default', 'old', 'ref')."""
        return tuple(self._adapters)

    def parameters_of(self, adapter: str) -> dict[str, nn.Parameter]:
        """LoRA parameters of one adapter by canonical key."""
        if adapter not in self._params:
            raise KeyError(f"no adapter {adapter!r}; held: {self._adapters}")
        return self._params[adapter]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ``default`` LoRA parameters (the only ones that require grad), in canonical-key order."""
        return list(self._params[TRAINED].values())

    @torch.no_grad()
    def rebind_parameters(self) -> None:
        """Take up the model's parameters again after they were replaced in place.

        FSDP2's ``fully_shard`` (:func:`astrolabe.parallel.parallelize`) swaps every parameter for a new
        sharded ``DTensor`` one: the adapter handles are re-read, and the EMA shadow is sharded like the
        trained parameters (same values: each rank keeps its own shard).
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        self._params = {name: adapter_parameters(self.model, name) for name in self._adapters}
        if self.ema is not None:
            trained = self._params[TRAINED]
            check_same_keys(trained, self.ema, "EMA")
            for k, p in trained.items():
                if isinstance(p, DTensor) and not isinstance(self.ema[k], DTensor):
                    self.ema[k] = distribute_tensor(self.ema[k].to(p.device), p.device_mesh, p.placements)
        self._activate(TRAINED)

    # ------------------------------------------------------------------ switching
    def _activate(self, adapter: str) -> None:
        """``set_adapter`` and then restore the grad flags (peft's set_adapter makes the active adapter
        trainable and freezes the others; here only ``default`` is ever trainable)."""
        self.model.set_adapter(adapter)
        for name, params in self._params.items():
            for p in params.values():
                p.requires_grad_(name == TRAINED)

    @contextmanager
    def use(self, policy: PolicyName) -> Iterator[PeftModel]:
        """Run ``self.model`` as ``policy`` inside the block; the previous adapter is restored on exit.

        - ``default`` / ``old``: that adapter is active.
        - ``ref``: the ``ref`` adapter (lagging) or the base model with every adapter disabled (base).
        - ``ema``: the EMA weights are swapped into ``default`` (no grad, for evaluation only) and the
          trained weights restored on exit. Never enter it with a pending backward through ``default``.

        Gradients: only ``default`` parameters require grad, so forwards under ``old``/``ref`` build no
        graph into LoRA weights; wrap them in ``torch.no_grad()`` to save memory.
        """
        if policy not in ("default", "old", "ref", "ema"):
            raise ValueError(f"unknown policy {policy!r}: use 'default', 'old', 'ref' or 'ema'")
        previous = self.model.active_adapter
        try:
            if policy == "ref" and self.cfg.reference == "base":
                with self.model.disable_adapter():
                    yield self.model
            elif policy == "ema":
                with self._ema_swapped():
                    self._activate(TRAINED)
                    yield self.model
            else:
                self._activate(policy)
                yield self.model
        finally:
            self._activate(previous)

    @contextmanager
    def _ema_swapped(self) -> Iterator[None]:
        if self.ema is None:
            raise ValueError("EMA is disabled (averaging.ema=False); enable it to evaluate the EMA policy")
        live = adapter_state_dict(self.model, TRAINED)
        copy_into_adapter_(self.model, TRAINED, self.ema, what="EMA")
        try:
            yield
        finally:
            copy_into_adapter_(self.model, TRAINED, live, what="live weights")

    # ------------------------------------------------------------------ updates
    def sync_old(self) -> None:
        """``theta_old <- theta``."""
        copy_adapter_(self.model, TRAINED, OLD)

    def update_old(self, iterations: int) -> float:
        """``theta_old <- d * theta_old + (1 - d) * theta`` with ``d = old_policy_decay(iterations, kind)``.

        Call it once after each training phase with ``iterations`` = training phases completed, this one
        included (the release calls it after ``global_step += 1``, one optimizer step per epoch). Returns ``d``.
        """
        d = old_policy_decay(iterations, self.cfg.averaging.old_policy_decay)
        blend_into_(self._params[OLD].values(), self._params[TRAINED].values(), d)
        return d

    def refresh_ref(self, iteration: int) -> None:
        """``theta_ref <- theta`` and record the refresh at ``iteration`` (lagging reference only)."""
        if self.refresher is None:
            raise ValueError("reference='base' has no snapshot to refresh; set reference='lagging'")
        copy_adapter_(self.model, TRAINED, REF)
        self.refresher.mark_refreshed(iteration)

    def maybe_refresh_ref(self, iteration: int, kl_value: float | None) -> bool:
        """Refresh the lagging reference at the start of ``iteration`` (= completed iterations) when
        :class:`ReferenceRefresher` says so; False for 'base'."""
        if self.refresher is None or not self.refresher.should_refresh(iteration, kl_value):
            return False
        self.refresh_ref(iteration)
        return True

    def update_ema(self, step: int) -> float | None:
        """EMA update after optimizer step ``step`` (0-based, the release's ``global_step`` before increment).

        Nothing before ``ema_start_step``; at it, ``ema <- theta`` first. Then
        ``ema <- d * ema + (1 - d) * theta``, ``d = ema_decay(step, ema_max_decay)``. Returns ``d`` or None.
        """
        if self.ema is None or step < self.cfg.ema_start_step:
            return None
        trained = self._params[TRAINED]
        if step == self.cfg.ema_start_step:
            blend_into_(self.ema.values(), trained.values(), 0.0)
        d = ema_decay(step, self.cfg.averaging.ema_max_decay)
        blend_into_(self.ema.values(), trained.values(), d)
        return d

    # ------------------------------------------------------------------ state
    def tensors(self, policy: PolicyName) -> dict[str, torch.Tensor]:
        """Detached CPU copies of a policy's LoRA tensors (canonical keys); ``ema`` = the float32 shadow."""
        if policy == "ema":
            if self.ema is None:
                raise ValueError("EMA is disabled (averaging.ema=False)")
            return {k: full_tensor(v.detach()).to("cpu", copy=True) for k, v in self.ema.items()}
        self.parameters_of(policy)  # validates the name
        return adapter_state_dict(self.model, policy)

    def load_tensors(self, policy: PolicyName, state: dict[str, torch.Tensor]) -> None:
        """Strictly overwrite a policy's tensors (keys and shapes must match exactly)."""
        if policy == "ema":
            if self.ema is None:
                raise ValueError("EMA is disabled (averaging.ema=False); cannot load an EMA")
            check_same_keys(self.ema, state, "EMA")
            for k, v in self.ema.items():
                v.copy_(state[k].to(device=v.device, dtype=v.dtype))
            return
        if policy not in self._params:
            raise LoraMismatchError(f"no adapter {policy!r} to load into; held: {self._adapters}")
        copy_into_adapter_(self.model, policy, state, what=f"adapter {policy!r}")

    def stored_policies(self) -> tuple[str, ...]:
        """The non-trained policies a checkpoint must hold: 'old', then 'ref' (lagging), then 'ema' (enabled)."""
        return tuple([OLD] + ([REF] if self.refresher is not None else []) + (["ema"] if self.ema is not None else []))

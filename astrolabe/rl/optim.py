"""AdamW over the trained LoRA, its LR schedule, and what one optimizer step reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from astrolabe.configbase import Frozen


class OptimConfig(Frozen):
    """AdamW over the trained LoRA (reference 5.4: lr 1e-5, betas (0.9, 0.999), wd 1e-4, eps 1e-8, clip 1.0)."""

    lr: float = Field(1e-5, gt=0.0, description="Peak learning rate (release: 1e-5; 2e-5 for two Causal Forcing configs).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")
    weight_decay: float = Field(1e-4, ge=0.0, description="Decoupled weight decay.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Global grad-norm clip; None = no clipping.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps: lr * min(1, (s + 1) / warmup_steps).")
    schedule: Literal["constant"] = Field("constant", description="LR schedule after warm-up (release: constant).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="Autocast precision of training forwards; 'fp16' enables the GradScaler."
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas={v}: each beta must lie in [0, 1)")
        return v


def lr_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at scheduler step ``step``: ``min(1, (step + 1) / warmup_steps)``, 1 without warm-up."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters: the 'default' LoRA adapter is empty")
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup))


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    step: int  # optimizer steps taken, after this one
    grad_norm: float  # global norm of the (unscaled) gradient before clipping
    lr: float  # lr used by this step
    ema_decay: float | None  # EMA decay applied, None when no EMA update happened
    skipped: bool  # fp16 only: the GradScaler skipped the step (inf/NaN gradients)

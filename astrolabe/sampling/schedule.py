"""Flow matching with a shifted sigma table and the few-step warped schedules of the distilled models.

Convention (``models-reference.md`` section 4):

    x_sigma = (1 - sigma) x0 + sigma * eps,    v = eps - x0,    x0 = x_sigma - sigma * v,   t = 1000 sigma

The table: sigma_i = 1 - i/1000 (i = 0..999, float32), shifted sigma' = s sigma / (1 + (s - 1) sigma),
timesteps = 1000 sigma'. A raw step list S is warped to t_k = T_ext[1000 - S_k] with T_ext the table
with a trailing 0. With shift 5: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]. The shift has no
default: every model family states it (all four use 5.0; a loader that forgets it and falls back to
the wrapper's 8.0 would silently produce [1000, 960, 888.9, 727.3]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class FlowSchedule:
    shift: float
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """Shifted sigma table (1000,), float32, descending from 1."""
        n = self.num_train_timesteps
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        return self.shift * base / (1 + (self.shift - 1) * base)

    @cached_property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas * self.num_train_timesteps

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Raw step list (e.g. [1000, 750, 500, 250]) -> warped timesteps t_k = T_ext[1000 - S_k]."""
        ext = torch.cat([self.timesteps, torch.zeros(1)])
        out = []
        for s in steps:
            idx = self.num_train_timesteps - int(round(float(s)))
            if not 0 <= idx <= self.num_train_timesteps:
                raise ValueError(f"step {s} outside [0, {self.num_train_timesteps}]")
            out.append(float(ext[idx]))
        return out

    def sigma_of(self, t: float) -> float:
        """sigma for timestep t by nearest table entry (as the distilled models' wrappers do); t = 0 -> 0."""
        if t == 0:
            return 0.0
        idx = int(torch.argmin((self.timesteps - float(t)).abs()))
        return float(self.sigmas[idx])


@dataclass(frozen=True)
class StepSchedule:
    """The few-step denoising schedule of one block: warped timesteps and their sigmas."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    context_timestep: float = 0.0  # timestep of the clean-context pass that writes the cache

    @staticmethod
    def from_steps(schedule: FlowSchedule, steps: Sequence[float], warp: bool = True, context_timestep: float = 0.0):
        ts = schedule.warp(steps) if warp else [float(s) for s in steps]
        return StepSchedule(tuple(ts), tuple(schedule.sigma_of(t) for t in ts), context_timestep)

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ValueError("a step schedule needs at least one timestep")
        if len(self.timesteps) != len(self.sigmas):
            raise ValueError("timesteps and sigmas differ in length")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps; ``sigma`` scalar or broadcastable (e.g. (B, 1, 1, 1, 1))."""
    return (1 - sigma) * x0 + sigma * noise


def flow_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x0 = x_sigma - sigma v, computed in float64 as the reference wrappers do, cast back."""
    sig = sigma.double() if isinstance(sigma, torch.Tensor) else sigma
    return (x_t.double() - sig * v.double()).to(v.dtype)


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """v = (x_sigma - x0) / sigma (sigma > 0)."""
    return (x_t - x0) / sigma

"""Negative-aware fine-tuning (NFT) loss: the forward-process RL objective of DiffusionNFT / Astrolabe.

Notation (one micro-batch of ``B`` samples, ``D`` elements per sample):

- ``x0``: the clean rollout latent; ``x_t = (1 - sigma) * x0 + sigma * eps`` its noised version.
- ``f``: the current policy's x0 prediction at ``x_t`` (with gradient).
- ``o``: the old (sampling) policy's x0 prediction at the same ``x_t`` (detached).
- ``g``: the KL reference's x0 prediction at the same ``x_t`` (detached).
- ``r`` in [0, 1]: the optimality of each sample (see :mod:`astrolabe.rl.advantages`).
- ``beta``: the NFT strength (``NFTConfig.beta``; 0.1 in every shipped Astrolabe experiment).

Implicit policies (linear in the predictions, so identical whether formed in x0 or velocity space)::

    p = beta * f + (1 - beta) * o          # positive policy
    n = (1 + beta) * o - beta * f          # negative policy

Per-sample loss, each squared error a mean over the D elements of the sample::

    L_i = r_i * mean((p_i - x0_i)^2) + (1 - r_i) * mean((n_i - x0_i)^2)
    policy = mean_i L_i

Gradient (per element, dropping the 1/D and 1/B of the means). Since dp/df = beta and dn/df = -beta::

    dL/df = 2 * beta * [ r * (p - x0) - (1 - r) * (n - x0) ]

At ``f = o`` we have ``p = n = o``, so ``dL/df = 2 * beta * (2r - 1) * (o - x0)``: zero at r = 0.5 (no
preference), a pull of ``f`` toward ``x0`` at r = 1 (gradient descent moves f against ``o - x0``), and
a push away from ``x0`` at r = 0.

Velocity space. The flow-matching model predicts ``v = eps - x0``, and ``x0_hat = x_t - sigma * v``, so
``v(x0_hat) = (x_t - x0_hat) / sigma`` and the target velocity is ``v* = (x_t - x0) / sigma``. Hence
``v(pred) - v* = (x0 - pred) / sigma`` and every x0-space squared error equals ``sigma^2`` times the
velocity-space one. With ``space="x0"`` (the release) the loss is therefore implicitly weighted by
``sigma^2`` relative to ``space="velocity"``.

DiffusionNFT options (both off in the Astrolabe release, section 5.3 of the reference):

- ``adaptive_weighting``: each per-sample squared error is divided by the detached
  ``w_i = max(mean|pred_i - target_i|, 1e-5)``, computed separately for the positive (pred = p) and the
  negative (pred = n) branch, in the loss space.
- ``scale_by_inverse_beta``: ``policy = adv_clip_max * mean_i(L_i / beta)``, i.e. the policy loss is
  multiplied by ``adv_clip_max / beta`` (= 5 / 0.1 = 50 with the defaults).

KL term (an MSE surrogate): ``kl_i = mean((f_i - g_i)^2)`` in ``kl_space``; with a boolean mask it is
averaged over the flagged samples only (``0 * sum`` when none is flagged, which keeps the graph);
``loss = policy + kl_weight * kl``.

Numerics: all squared errors are computed in float32 (the release computed them in bf16), the loss is
a float32 scalar.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from astrolabe.configbase import Frozen

logger = logging.getLogger(__name__)

ADAPTIVE_WEIGHT_MIN = 1e-5  # DiffusionNFT's clip of the adaptive weight


class NFTConfig(Frozen):
    """The NFT objective.

    ``train_sigmas`` chooses the training noise level:

    - ``"rollout_warped"``: uniformly one of the (warped) sigmas the rollout sampler used, i.e. the
      levels the distilled generator was trained for (fix of reference 10.5).
    - ``"release_unwarped"``: the release's behaviour: uniformly one of the *un-warped* sigmas
      ``{1.0, 0.75, 0.5, 0.25}`` (the raw denoising step list / 1000), recovered from the warped list
      by inverting the timestep shift.
    - ``"uniform"``: continuous ``U[lo, hi]`` with ``(lo, hi) = uniform_sigma_range``, or the range of
      the rollout sigmas when that is None.
    """

    beta: float = Field(0.1, gt=0.0, le=1.0, description="NFT strength beta in (0, 1].")
    space: Literal["x0", "velocity"] = Field(
        "x0", description="Space of the policy squared errors; 'x0' is the release (= sigma^2 * velocity)."
    )
    adaptive_weighting: bool = Field(
        False, description="DiffusionNFT's per-sample 1/max(mean|pred - target|, 1e-5) weight (pos and neg)."
    )
    scale_by_inverse_beta: bool = Field(
        False, description="DiffusionNFT's policy scale adv_clip_max / beta; off in the release."
    )
    adv_clip_max: float = Field(
        5.0, gt=0.0, description="The A in the adv_clip_max / beta scale; keep equal to AdvantageConfig.clip."
    )
    train_sigmas: Literal["rollout_warped", "uniform", "release_unwarped"] = Field(
        "rollout_warped", description="How training noise levels are drawn (see the class docstring)."
    )
    uniform_sigma_range: tuple[float, float] | None = Field(
        None, description="(lo, hi) for train_sigmas='uniform'; None = range of the rollout sigmas."
    )
    kl_weight: float = Field(1e-4, ge=0.0, description="Weight of the KL (MSE) term (release: train.beta).")
    kl_space: Literal["x0", "velocity"] = Field("x0", description="Space of the KL MSE; the release uses 'x0'.")

    @model_validator(mode="after")
    def _check_range(self) -> NFTConfig:
        if self.uniform_sigma_range is not None:
            lo, hi = self.uniform_sigma_range
            if not 0.0 < lo < hi <= 1.0:
                raise ValueError(
                    f"uniform_sigma_range={self.uniform_sigma_range} must satisfy 0 < lo < hi <= 1; "
                    "set e.g. [0.2, 1.0] or null to use the range of the rollout sigmas"
                )
        return self


# ----------------------------------------------------------------------------------- sigma sampling


def unwarp_sigma(sigma: float, shift: float) -> float:
    """Invert the timestep shift ``sigma = shift*s / (1 + (shift-1)*s)``: ``s = sigma / (shift - (shift-1)*sigma)``.

    With shift 5 the warped rollout sigmas (1, 0.9375, 0.8333, 0.625) map back to (1, 0.75, 0.5, 0.25).
    """
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0 (the flow-matching timestep shift, e.g. 5.0)")
    return sigma / (shift - (shift - 1.0) * sigma)


def _check_sigmas(warped_sigmas: Sequence[float]) -> list[float]:
    sigmas = [float(s) for s in warped_sigmas]
    if not sigmas:
        raise ValueError(
            "warped_sigmas is empty: pass the rollout's denoising sigmas, e.g. [1.0, 0.9375, 0.8333, 0.625]"
        )
    bad = [s for s in sigmas if not (0.0 < s <= 1.0) or math.isnan(s)]
    if bad:
        raise ValueError(f"warped_sigmas must lie in (0, 1]; got {bad}")
    return sigmas


def _candidate_sigmas(cfg: NFTConfig, warped_sigmas: Sequence[float], shift: float | None) -> list[float]:
    sigmas = _check_sigmas(warped_sigmas)
    if cfg.train_sigmas == "release_unwarped":
        if shift is None:
            raise ValueError("train_sigmas='release_unwarped' needs shift= (the schedule's timestep shift, e.g. 5.0)")
        return [unwarp_sigma(s, shift) for s in sigmas]
    return sigmas


def sample_train_sigmas(
    cfg: NFTConfig,
    warped_sigmas: Sequence[float],
    generator: torch.Generator,
    batch_size: int,
    *,
    shift: float | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` training noise levels (float64 CPU tensor ``(B,)``) as chosen by ``cfg.train_sigmas``.

    ``warped_sigmas`` are the sigmas the rollout sampler used (after the timestep shift); ``shift`` is only
    needed for ``"release_unwarped"``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if cfg.train_sigmas == "uniform":
        sigmas = _check_sigmas(warped_sigmas)
        lo, hi = cfg.uniform_sigma_range or (min(sigmas), max(sigmas))
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)  # (B,)
        return lo + (hi - lo) * u
    levels = torch.tensor(_candidate_sigmas(cfg, warped_sigmas, shift), dtype=torch.float64)  # (L,)
    idx = torch.randint(len(levels), (batch_size,), generator=generator)  # (B,)
    return levels[idx]


def sample_train_sigma(
    cfg: NFTConfig,
    warped_sigmas: Sequence[float],
    generator: torch.Generator,
    *,
    shift: float | None = None,
) -> float:
    """One training noise level shared by a whole micro-batch (the release's choice)."""
    return float(sample_train_sigmas(cfg, warped_sigmas, generator, 1, shift=shift)[0])


# ----------------------------------------------------------------------------------- loss pieces


def implicit_policies(f: torch.Tensor, o: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = beta*f + (1-beta)*o`` and ``n = (1+beta)*o - beta*f`` (``o`` is detached here)."""
    o = o.detach()
    return beta * f + (1.0 - beta) * o, (1.0 + beta) * o - beta * f


def _sigma_view(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 tensor broadcastable to ``like`` (B, ...): scalar or per-sample (B,)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 1:
        if s.shape[0] != like.shape[0]:
            raise ValueError(f"per-sample sigma has {s.shape[0]} entries for a batch of {like.shape[0]}")
        s = s.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)
    elif s.ndim != 0:
        raise ValueError(f"sigma must be a float or a (B,) tensor, got shape {tuple(s.shape)}")
    if not bool(torch.all(s > 0)):
        raise ValueError("sigma must be > 0 for velocity-space terms (v = (x_t - x0_pred) / sigma)")
    return s


def x0_to_velocity(x0_pred: torch.Tensor, x_t: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``v = (x_t - x0_pred) / sigma``: the velocity that maps ``x_t`` to ``x0_pred`` (``x0 = x_t - sigma*v``)."""
    return (x_t - x0_pred) / _sigma_view(sigma, x0_pred)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def adaptive_weight(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiffusionNFT's detached weight ``w_i = max(mean|pred_i - target_i|, 1e-5)``, shape ``(B,)``."""
    with torch.no_grad():
        return per_sample_mean((pred.double() - target.double()).abs()).clamp_min(ADAPTIVE_WEIGHT_MIN).float()


def _in_space(
    space: str, preds: Sequence[torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor | None, sigma: float | torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Express x0-space predictions and the target in ``space`` (float32)."""
    if space == "x0":
        return [p.float() for p in preds], x0.float()
    if x_t is None:
        raise ValueError("velocity-space terms need x_t (the noised input): pass x_t=... or use space='x0'")
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t must match x0's shape {tuple(x0.shape)}, got {tuple(x_t.shape)}")
    xt = x_t.float()
    return [x0_to_velocity(p.float(), xt, sigma) for p in preds], x0_to_velocity(x0.float(), xt, sigma)


def _check_inputs(f: torch.Tensor, o: torch.Tensor, x0: torch.Tensor, r: torch.Tensor) -> None:
    if f.shape != o.shape or f.shape != x0.shape:
        shapes = [tuple(t.shape) for t in (f, o, x0)]
        raise ValueError(f"f, o and x0 must share a shape (B, ...): got {shapes}")
    if r.shape != (f.shape[0],):
        raise ValueError(f"r must have shape (B,) = ({f.shape[0]},), got {tuple(r.shape)}")
    if not bool(torch.all((r >= 0) & (r <= 1))):
        raise ValueError("r must lie in [0, 1] (NaN optimality: drop those samples before the loss)")


def selective_kl(per_sample_kl: torch.Tensor, kl_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_sample_kl`` (B,) over flagged samples; all samples if ``kl_mask`` is None.

    When no sample is flagged it returns ``0 * sum(per_sample_kl)``: zero, but still attached to the graph
    (so DDP sees every parameter take part).
    """
    if kl_mask is None:
        return per_sample_kl.mean()
    mask = kl_mask.to(device=per_sample_kl.device, dtype=torch.bool)
    if mask.shape != per_sample_kl.shape:
        raise ValueError(f"kl_mask must have shape (B,) = {tuple(per_sample_kl.shape)}, got {tuple(mask.shape)}")
    if not bool(mask.any()):
        return 0.0 * per_sample_kl.sum()
    return per_sample_kl[mask].mean()


def nft_loss(
    f: torch.Tensor,
    o: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    sigma: float | torch.Tensor,
    x_t: torch.Tensor | None = None,
    *,
    cfg: NFTConfig,
    kl_ref: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The NFT loss of one micro-batch (module docstring for the math and the gradient).

    Args:
        f: current policy x0 prediction, with grad. ``(B, ...)``, e.g. ``(B, F, C, H, W)``.
        o: old policy x0 prediction (detached here). ``(B, ...)``.
        x0: clean rollout latent. ``(B, ...)``.
        r: optimality in [0, 1]. ``(B,)``.
        sigma: training noise level, a float or a per-sample ``(B,)`` tensor (used in velocity space).
        x_t: the noised input ``(B, ...)``; required when ``cfg.space`` or ``cfg.kl_space`` is "velocity".
        cfg: the NFT config.
        kl_ref: reference x0 prediction ``g`` (detached here); None = no KL term.
        kl_mask: ``(B,)`` bool, KL only on flagged samples; None = KL on every sample.

    Returns:
        ``(loss, metrics)``: a float32 scalar with grad, and floats namespaced ``loss/...``, ``kl/...``,
        ``nft/...``.
    """
    r = torch.as_tensor(r, device=f.device).float()  # (B,)
    _check_inputs(f, o, x0, r)
    f, o, x0 = f.float(), o.detach().float(), x0.float()  # float32 math whatever the model dtype
    p, n = implicit_policies(f, o, cfg.beta)  # (B, ...) each
    (p_s, n_s), target = _in_space(cfg.space, [p, n], x0, x_t, sigma)
    sq_pos = per_sample_mean((p_s - target) ** 2)  # (B,)
    sq_neg = per_sample_mean((n_s - target) ** 2)  # (B,)
    metrics: dict[str, float] = {}
    if cfg.adaptive_weighting:
        w_pos, w_neg = adaptive_weight(p_s, target), adaptive_weight(n_s, target)  # (B,) each
        sq_pos, sq_neg = sq_pos / w_pos, sq_neg / w_neg
        metrics["nft/adaptive_weight_pos"] = float(w_pos.mean())
        metrics["nft/adaptive_weight_neg"] = float(w_neg.mean())
    per_sample = r * sq_pos + (1.0 - r) * sq_neg  # (B,)
    policy = per_sample.mean()
    if cfg.scale_by_inverse_beta:
        policy = policy * (cfg.adv_clip_max / cfg.beta)

    kl = torch.zeros((), device=f.device, dtype=torch.float32)
    flagged = 0.0
    if kl_mask is not None:
        kl_mask = torch.as_tensor(kl_mask, device=f.device, dtype=torch.bool)  # (B,)
    if kl_ref is not None:
        if kl_ref.shape != f.shape:
            raise ValueError(f"kl_ref must match f's shape {tuple(f.shape)}, got {tuple(kl_ref.shape)}")
        (f_k, g_k), _ = _in_space(cfg.kl_space, [f, kl_ref.detach()], x0, x_t, sigma)
        kl = selective_kl(per_sample_mean((f_k - g_k) ** 2), kl_mask)  # scalar
        flagged = 1.0 if kl_mask is None else float(kl_mask.float().mean())
        with torch.no_grad():
            metrics["kl/old_ref_mse"] = float(((o - kl_ref.float()) ** 2).mean())
    loss = policy + cfg.kl_weight * kl

    with torch.no_grad():
        metrics.update(
            {
                "loss/total": float(loss),
                "loss/policy": float(policy),
                "loss/kl": float(kl),
                "loss/pos": float(sq_pos.mean()),
                "loss/neg": float(sq_neg.mean()),
                "kl/flagged_fraction": flagged,
                "nft/x0_norm": float((x0**2).mean()),
                "nft/old_deviation": float(((f - o) ** 2).mean()),
                "nft/r_mean": float(r.mean()),
            }
        )
    return loss, metrics

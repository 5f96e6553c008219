"""AR-CoPO loss: the Neighbor-GRPO clipped surrogate on the pivot chunk (``ar-copo-reference.md`` 1.3-1.6, 2.2-2.4).

Notation, for one group of ``G`` branches forked at the pivot chunk (:mod:`astrolabe.sampling.pivot`)
and one denoising step ``t`` of that chunk:

- ``c_i = x0_hat_old^(i)_t``: candidate i, the old policy's x0 prediction from branch i's own input
  ``x_t^(i)`` against the shared prefix cache (data, no gradient).
- ``a = x0_hat_theta_t``: the anchor, the *current* policy's x0 prediction from anchor branch k's input
  ``x_t^(k)`` against the detached prefix cache (the only tensor with a gradient).
- ``a_old``: the old policy's prediction from the same anchor input (no gradient).
- ``A_i``: the advantage of branch i (:func:`arcopo_advantages`).

Surrogate "leaping" policy over the G candidates (distances in x0 space, as AR-CoPO prescribes for
consistency-model generators)::

    d_i(a)      = mean_D (c_i - a)^2                           per-element mean over the chunk's D elements
    log pi(i)   = log_softmax_i(-d_i(a) / tau)                 current policy
    log pi_o(i) = log_softmax_i(-d_i(a_old) / tau)             old policy
    rho_i       = exp(log pi(i) - log pi_o(i))
    J           = mean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)      (paper Eq. 9, PPO clip)
    loss        = -mean over (anchor k, step t, candidate i) of the per-term surrogate

Gradient. Writing ``p = pi(. | a)``, ``d log pi(i) / d a = (2 / (tau D)) [(c_i - a) - sum_j p_j (c_j - a)]``,
so an unclipped term ``rho_i A_i`` with ``A_i > 0`` pulls the anchor toward ``c_i`` (relative to the
p-weighted mean of the candidates), and one with ``A_i < 0`` pushes it away. At the first update step
(current == old) every ratio is exactly 1. A clipped term (``A_i > 0, rho_i > 1 + eps`` or
``A_i < 0, rho_i < 1 - eps``) contributes no gradient: the clip (``eps = 1e-4`` as reported) is the only
trust region.

Advantages: ``A_i = (r_i - mean r) / (std r + eps)`` over the group (Algorithm 1, line 7), or the quasi-norm
reweighting ``A_i = sqrt(G) (r_i - mean r) / (sum_j |r_j - mean r|^p)^(1/p)`` (Neighbor GRPO Eq. 11 with the
sqrt(G) convention of [S9], so that p = 2 equals the std normalisation with eps = 0 exactly). For p < 2,
``||c||_p >= ||c||_2``, with equality for a one-hot deviation and the largest ratio ``G^(1/p - 1/2)`` for a
flat group: the quasi-norm damps groups whose rewards differ by many small amounts.

Assumption: distances are the per-element *mean* squared distance (not the sum, which would make the
softmax one-hot at latent sizes), with ``tau`` a config value (default 1.0; the paper does not give it,
reference U1). Log the entropy of pi_old and tune tau so it sits between log 2 and log G.

Assumption: the candidates are the old policy's x0 predictions of all G branches at the same step t, the
anchor's own branch included (reference 2.4, U2); the anchor input is anchor k's own ``x_t^(k)`` with the same
prefix cache.

Assumption: the old anchor prediction ``a_old`` defaults to candidate k itself (``candidates[k]``): with
theta_old frozen for the iteration (reference U6) or pi_old = pi_ref for the semi-on-policy adapter (U7), the
old policy's prediction from the anchor's input *is* the anchor branch's candidate.

Assumption: reduction is the mean over candidates i, steps t and anchors k (reference U10; Eq. 9 sums
over i, which only rescales the loss by G).

Assumption: no KL term (reference U5).

Assumption: the std of the advantages is the population std of the group's G rewards with ``eps`` added;
a group of equal rewards gets A = 0 (no contrast, no signal), in both modes.

Numerics: distances in float32, the softmax, ratios and surrogate in float64 (the clip band 1e-4 is
narrow), the loss a float32 scalar.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.rl.advantages import group_index
from astrolabe.rl.arcopo_semi import MergeConfig, SemiOnPolicyConfig


class ArCoPOConfig(Frozen):
    """AR-CoPO (Neighbor GRPO on the pivot chunk). Paper values as defaults; every unknown labelled.

    The group size G is ``rollout.group_size`` (12 in the paper's preset).
    """

    sigma: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Pivot perturbation radius s: eps_i = sqrt(1 - s^2) eps* + s d_i (unit variance). Paper: 0.5.",
    )
    tau: float = Field(
        1.0, gt=0.0,
        description="Temperature of the surrogate softmax over -mean_sq_dist / tau. Assumption: the paper gives no "
        "value; 1.0 on per-element mean distances (tune so the old policy's entropy is between log 2 and log G).",
    )
    clip_eps: float = Field(
        1e-4, gt=0.0, lt=1.0, description="Ratio clip eps: clip(rho, 1 - eps, 1 + eps). Paper: 1e-4."
    )
    anchors: int = Field(
        4, ge=1, description="Anchors B per group and step (symmetric anchor sampling, B <= G). Paper: 4."
    )
    advantage_norm: Literal["std", "quasi"] = Field(
        "std", description="'std': (r - mean) / (std + eps) (the paper's Algorithm 1); 'quasi': Neighbor GRPO's "
        "sqrt(G) (r - mean) / ||r - mean||_p. Assumption: the paper uses 'std'."
    )
    quasi_norm_p: float = Field(0.8, gt=0.0, le=2.0, description="p of the quasi-norm (Neighbor GRPO's best: 0.8).")
    advantage_eps: float = Field(
        1e-4, ge=0.0, description="Added to the group std in 'std' mode. Assumption: the paper does not give it."
    )
    semi: SemiOnPolicyConfig | None = Field(
        None, description="Semi-on-policy adapter on a replay buffer of reference rollouts (astrolabe.rl.arcopo_semi); "
        "None = on-policy only.",
    )
    merge: MergeConfig = Field(
        MergeConfig(), description="Evaluation sweep of W0 + dW_semi + s dW_on and the choice of s (semi only)."
    )


ARCOPO_LABEL_KEYS = frozenset({"advantage_norm", "quasi_norm_p", "advantage_eps"})  # what the label stage reads

# ----------------------------------------------------------------------------------- advantages


def arcopo_advantages(
    rewards: torch.Tensor,  # (..., G)
    mode: Literal["std", "quasi"] = "std",
    *,
    p: float = 0.8,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages of each group's G branches (module docstring), float64 ``(..., G)``; equal rewards -> 0."""
    r = torch.as_tensor(rewards).double()
    if r.ndim < 1 or r.shape[-1] < 2:
        raise ValueError(f"rewards must be (..., G) with G >= 2 branches per group, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf: drop failed groups before computing AR-CoPO advantages")
    c = r - r.mean(dim=-1, keepdim=True)  # (..., G)
    if mode == "std":
        denom = c.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps
    elif mode == "quasi":
        if not 0.0 < p <= 2.0:
            raise ValueError(f"quasi-norm p={p} must lie in (0, 2] (arcopo.quasi_norm_p)")
        denom = c.abs().pow(p).sum(dim=-1, keepdim=True).pow(1.0 / p) / math.sqrt(r.shape[-1])
    else:
        raise ValueError(f"advantage mode {mode!r}: use 'std' or 'quasi' (arcopo.advantage_norm)")
    return torch.where(denom > 0, c / torch.where(denom > 0, denom, 1.0), torch.zeros_like(c))


def grouped_advantages(
    combined: np.ndarray,  # (N,) combined reward per record, NaN = failed
    group_ids: Sequence[Hashable],  # (N,) the record's group (one pivot group = one prompt x pivot)
    cfg: ArCoPOConfig,
) -> tuple[np.ndarray, dict[str, int]]:
    """:func:`arcopo_advantages` of each group's records, float32 ``(N,)``, in record order (the label payload).

    A group with a NaN reward, or fewer than 2 records, gets NaN advantages (dropped by the update: the
    surrogate needs every candidate's advantage). Returns the advantages and counts ``nan_groups`` and
    ``zero_std_groups`` (groups of equal rewards: A = 0, no signal).
    """
    x = np.asarray(combined, dtype=np.float64)
    gid, n_groups = group_index(group_ids)
    adv = np.full(x.shape, np.nan)
    counts = {"n_nan_groups": 0, "n_zero_std_groups": 0}
    for g in range(n_groups):
        rows = np.flatnonzero(gid == g)
        if len(rows) < 2 or not np.isfinite(x[rows]).all():
            counts["n_nan_groups"] += 1
            continue
        a = arcopo_advantages(torch.from_numpy(x[rows]), cfg.advantage_norm, p=cfg.quasi_norm_p, eps=cfg.advantage_eps)
        adv[rows] = a.numpy()
        counts["n_zero_std_groups"] += int(np.ptp(x[rows]) == 0)
    return adv.astype(np.float32), counts


# ----------------------------------------------------------------------------------- anchors


def choose_anchors(group_size: int, anchors: int, generator: torch.Generator) -> list[int]:
    """Symmetric anchor sampling: ``anchors`` distinct branch indices of ``range(group_size)``, drawn uniformly."""
    if not 1 <= anchors <= group_size:
        raise ValueError(f"arcopo.anchors={anchors} must lie in [1, group size {group_size}]")
    return [int(i) for i in torch.randperm(group_size, generator=generator)[:anchors]]


def gather_candidates(
    pivot_x0: torch.Tensor,  # (T, G, *latent): old-policy x0 predictions per step and branch
    anchors: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss inputs for anchors x steps, row ``n = a * T + t`` (anchor a = ``anchors[a]``, step t).

    Returns ``candidates`` (B*T, G, *latent) (an expanded view, no copy per anchor) and the default old anchor
    predictions (B*T, *latent) = ``pivot_x0[t, k]`` (the module's assumption on ``a_old``).
    """
    t_steps, g = pivot_x0.shape[:2]
    if not anchors or any(not 0 <= k < g for k in anchors):
        raise ValueError(f"anchors {list(anchors)} must be branch indices in [0, {g})")
    b = len(anchors)
    cand = pivot_x0.unsqueeze(0).expand(b, *pivot_x0.shape).reshape(b * t_steps, *pivot_x0.shape[1:])
    old_anchor = torch.stack([pivot_x0[t, k] for k in anchors for t in range(t_steps)])
    return cand, old_anchor


# ----------------------------------------------------------------------------------- surrogate policy


def mean_sq_dist(candidates: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``d_{n,i} = mean_D (candidates[n, i] - anchor[n])^2``, float32 ``(N, G)``."""
    if candidates.shape[0] != anchor.shape[0] or candidates.shape[2:] != anchor.shape[1:]:
        raise ValueError(
            f"candidates must be (N, G, *latent) and anchors (N, *latent): got {tuple(candidates.shape)} and "
            f"{tuple(anchor.shape)}"
        )
    diff = candidates.float() - anchor.float().unsqueeze(1)  # (N, G, *latent)
    return diff.pow(2).flatten(2).mean(dim=2)


def neighbor_log_probs(candidates: torch.Tensor, anchor: torch.Tensor, tau: float) -> torch.Tensor:
    """``log_softmax_i(-d_{n,i} / tau)``, float64 ``(N, G)``."""
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0 (arcopo.tau)")
    return torch.log_softmax(-mean_sq_dist(candidates, anchor).double() / tau, dim=1)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's elementwise ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` (to be maximised)."""
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps) * adv)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_i p_i log p_i`` per row, ``(N,)``."""
    return -(log_probs.exp() * log_probs).sum(dim=1)


def arcopo_loss(
    anchor_pred: torch.Tensor,
    candidates: torch.Tensor,
    advantages: torch.Tensor,
    *,
    cfg: ArCoPOConfig,
    old_anchor_pred: torch.Tensor | None = None,
    anchor_index: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The AR-CoPO loss of N (anchor, step) pairs of one or more groups (module docstring for the math).

    Args:
        anchor_pred: the current policy's x0 predictions from the anchors' inputs, with grad. ``(N, *latent)``.
        candidates: the G branches' old-policy x0 predictions at the same steps (detached here). ``(N, G, *latent)``.
        advantages: per-branch advantages ``(N, G)``, or ``(G,)`` shared by every row (detached here).
        cfg: the AR-CoPO config (``tau``, ``clip_eps``).
        old_anchor_pred: the old policy's predictions from the anchors' inputs ``(N, *latent)`` (detached here);
            None = ``candidates[n, anchor_index[n]]`` (the module's assumption).
        anchor_index: ``(N,)`` branch index of each row's anchor; needed when ``old_anchor_pred`` is None.

    Returns:
        ``(loss, metrics)``: a float32 scalar with grad, and floats ``loss/policy``, ``arcopo/entropy``,
        ``arcopo/entropy_old``, ``arcopo/clip_fraction``, ``arcopo/ratio_{mean,min,max}``, ``arcopo/adv_abs_mean``.
    """
    n, g = candidates.shape[:2]
    candidates = candidates.detach()
    if old_anchor_pred is None:
        if anchor_index is None:
            raise ValueError("pass old_anchor_pred, or anchor_index to use candidates[n, anchor_index[n]]")
        idx = torch.as_tensor(anchor_index, device=candidates.device, dtype=torch.long)
        if idx.shape != (n,) or bool(((idx < 0) | (idx >= g)).any()):
            raise ValueError(f"anchor_index must be (N,) = ({n},) branch indices in [0, {g}), got {idx.tolist()}")
        old_anchor_pred = candidates[torch.arange(n, device=idx.device), idx]  # (N, *latent)
    adv = torch.as_tensor(advantages, device=anchor_pred.device).detach().double()
    adv = adv.expand(n, g) if adv.shape == (g,) else adv
    if adv.shape != (n, g):
        raise ValueError(f"advantages must be (N, G) = ({n}, {g}) or (G,), got {tuple(adv.shape)}")

    log_p = neighbor_log_probs(candidates, anchor_pred, cfg.tau)  # (N, G), grad through anchor_pred
    with torch.no_grad():
        log_p_old = neighbor_log_probs(candidates, old_anchor_pred.detach(), cfg.tau)  # (N, G)
    ratio = torch.exp(log_p - log_p_old)  # (N, G)
    loss = -clipped_surrogate(ratio, adv, cfg.clip_eps).mean().float()

    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "loss/policy": float(loss),
            "arcopo/entropy": float(entropy(log_p.detach()).mean()),
            "arcopo/entropy_old": float(entropy(log_p_old).mean()),
            "arcopo/clip_fraction": float(((r - 1.0).abs() > cfg.clip_eps).double().mean()),
            "arcopo/ratio_mean": float(r.mean()),
            "arcopo/ratio_min": float(r.min()),
            "arcopo/ratio_max": float(r.max()),
            "arcopo/adv_abs_mean": float(adv.abs().mean()),
        }
    return loss, metrics

"""AR-CoPO semi-on-policy training and the adapter merge (``ar-copo-reference.md`` 2.5).

Semi-on-policy: a replay buffer of groups rolled out *once* by the reference policy pi_ref (the base
model, adapters off), scored and labelled, is persisted as a content-keyed artifact and reused by every
run with the same key. A second LoRA adapter (``dW_semi``, its own training state) is trained on batches
of buffer groups with the same clipped Neighbor-GRPO objective, with pi_old = pi_ref throughout: the
clip is the trust region that keeps it near the reference.

Merge at evaluation::

    W(s) = W0 + dW_semi + s * dW_on            s in merge.scales

and the paper's choice rule (:func:`choose_merge_scale`): the largest ``s`` whose merged model beats the
base model on *both* the in-domain metric (the training reward; VideoAlign in the paper) and the held-out
metric (VBench in the paper). On the paper's Table 3 (Self-Forcing) this picks s = 0.8.

Assumptions (labelled, the paper is silent):

- U7: pi_old of the semi adapter is pi_ref; the buffer's stored x0 predictions (made by pi_ref) are the
  candidates, and the old anchor prediction is recomputed by pi_ref in the update.
- U8: the buffer stores the clean prefix latents, not the KV cache; the cache is rebuilt by pi_ref on replay
  (identical, pi_ref is fixed).
- U9: ``groups_per_iteration`` buffer groups per semi phase (one per GPU in the paper's reading), the same
  ``rl.epochs`` passes and optimizer as the on-policy adapter.
- U12: the semi adapter's rewards are configurable (``reward_weights``; the paper's released semi adapter
  was probably trained on text alignment only); None = the run's reward weights.
- The buffer is built in parts of ``groups_per_part`` groups, each a cached rollout -> score -> label chain,
  so an interrupted build resumes at the first missing part.
- "Beats the base" is a strict ``>`` on both metrics; when no scale qualifies the rule returns None and the
  evaluation reports ``s = 0`` (the semi adapter alone).
- The two adapters are trained as two training states (``state/`` and ``state_semi/`` of the update output),
  each a complete :class:`astrolabe.rl.state.TrainingState`, rather than two adapters of one peft model:
  the policy set and its checkpoint format stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from pydantic import Field, model_validator

from astrolabe.configbase import Frozen

log = logging.getLogger(__name__)

SEMI_STATE_SUBDIR = "state_semi"


class SemiOnPolicyConfig(Frozen):
    """The semi-on-policy adapter and its replay buffer (module docstring)."""

    groups: int = Field(100, ge=1, description="Buffer size in groups (paper: 100), rolled out once by pi_ref.")
    groups_per_part: int = Field(
        10, ge=1, description="Groups per buffer part (one cached rollout/score/label chain; resume granularity)."
    )
    seed: int = Field(1, description="Rollout seed of the buffer (prompts, pivots, noise); part j = iteration j.")
    groups_per_iteration: int = Field(
        1, ge=1, description="Buffer groups per semi phase. Assumption (U9): one per GPU per step."
    )
    reward_weights: dict[str, float] | None = Field(
        None, description="Reward weights of the buffer's labels; None = the run's. Assumption (U12): the paper's "
        "semi adapter probably used text alignment only.",
    )

    @model_validator(mode="after")
    def _parts(self) -> SemiOnPolicyConfig:
        if self.groups % self.groups_per_part:
            raise ValueError(
                f"arcopo.semi.groups ({self.groups}) must be a multiple of arcopo.semi.groups_per_part "
                f"({self.groups_per_part}): the buffer is built in equal parts"
            )
        return self

    @property
    def parts(self) -> int:
        return self.groups // self.groups_per_part


class MergeConfig(Frozen):
    """The evaluation sweep over ``W0 + dW_semi + s dW_on`` and the choice of ``s``."""

    scales: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0), min_length=1, description="Values of s evaluated (each a full evaluation)."
    )
    in_domain_metric: str = Field(
        "combined/mean", description="Evaluation metric standing for the training reward (VideoAlign in the paper)."
    )
    held_out_metric: str = Field(
        "combined/mean", description="Evaluation metric standing for the held-out benchmark (VBench in the paper)."
    )

    @model_validator(mode="after")
    def _scales(self) -> MergeConfig:
        if any(s < 0 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"arcopo.merge.scales must be distinct values >= 0, got {list(self.scales)}")
        return self


# ----------------------------------------------------------------------------------- choice rule


def choose_merge_scale(
    table: Mapping[float, Mapping[str, float | None]],
    base: Mapping[str, float | None],
    in_domain: str,
    held_out: str,
) -> float | None:
    """The largest ``s`` of ``table`` (s -> metrics) that beats ``base`` on both metrics (strict ``>``).

    A missing or None metric never beats anything. Returns None when no scale qualifies.
    """
    for name in (in_domain, held_out):
        if base.get(name) is None:
            raise KeyError(f"the base metrics have no value for {name!r} (have {sorted(base)}); check arcopo.merge")

    def beats(m: Mapping[str, float | None], name: str) -> bool:
        v = m.get(name)
        return v is not None and float(v) > float(base[name])  # type: ignore[arg-type]

    ok = [s for s, m in table.items() if beats(m, in_domain) and beats(m, held_out)]
    return max(ok) if ok else None


def report_merge_scale(
    table: Mapping[float, Mapping[str, float | None]], base: Mapping[str, float | None] | None, mc: MergeConfig
) -> tuple[float, float | None]:
    """``(reported s, the rule's choice)``: the rule's ``s`` (:func:`choose_merge_scale`), or, when no scale
    qualifies or there is no ``base``, ``s = 0`` (the semi adapter alone; the smallest scale if 0 is not swept)."""
    chosen = choose_merge_scale(table, base, mc.in_domain_metric, mc.held_out_metric) if base is not None else None
    reported = chosen if chosen is not None else (0.0 if 0.0 in table else min(table))
    return reported, chosen


def scale_name(s: float) -> str:
    """``s<s>`` (``s0.5``): the directory and metric segment of merge scale ``s`` (MLflow-safe)."""
    return f"s{s:g}"


def merge_metrics(
    table: Mapping[float, Mapping[str, float | None]], reported: float, chosen: float | None, mc: MergeConfig
) -> dict[str, float | None]:
    """``merge/s`` (reported), ``merge/s_rule`` (the rule's choice, None when none) and
    ``merge/s<s>/<metric>`` for both choice metrics and every scale."""
    out: dict[str, float | None] = {"merge/s": reported, "merge/s_rule": chosen}
    for s, m in table.items():
        for name in dict.fromkeys((mc.in_domain_metric, mc.held_out_metric)):
            out[f"merge/{scale_name(s)}/{name}"] = m.get(name)
    return out


# ----------------------------------------------------------------------------------- merging


def lora_delta_scaled(tensors: Mapping[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """An adapter's tensors with ``dW = scale * B A`` multiplied by ``s`` (only the ``lora_B`` factors scaled)."""
    if not any("lora_B" in k for k in tensors):
        raise ValueError("the adapter has no lora_B tensors; it is not a LoRA adapter in canonical keys")
    return {k: (v * s if "lora_B" in k else v) for k, v in tensors.items()}


def merge_adapters(dit: torch.nn.Module, adapters: Sequence[tuple[Path, float]]) -> torch.nn.Module:
    """``W0 + sum_j s_j dW_j``: each training-state directory's trained adapter (``lora/``) merged in turn.

    Returns the merged module (eval mode, no grad). ``s_j = 0`` skips the adapter.
    """
    from astrolabe.rl.lora import apply_lora, copy_into_adapter_, read_adapter_tensors, read_lora_config

    for path, s in adapters:
        if s == 0:
            continue
        model = apply_lora(dit, read_lora_config(path), adapter_name="default")
        copy_into_adapter_(model, "default", lora_delta_scaled(read_adapter_tensors(path), s),
                           what=f"adapter {path} x {s}")
        dit = model.merge_and_unload()
    return dit.eval().requires_grad_(False)

"""The ``nft_update`` stage with ``rl.algorithm: arcopo`` (dispatched from :func:`stages.nft_update.run`).

Inputs as for NFT: ``rollout`` (pivot-group shards, :mod:`astrolabe.rl.arcopo_rollout`), ``labels``
(``labels.zarr``: the per-group AR-CoPO ``advantage``), ``checkpoint`` (iteration k - 1) and, with
``arcopo.semi`` set, ``buffer`` (the :mod:`stages.arcopo_buffer` output). Outputs:

- ``state/``: the on-policy adapter's :class:`~astrolabe.rl.state.TrainingState` (``old`` = the trained
  adapter after the phase, i.e. the next rollout's sampling policy);
- ``state_semi/`` (semi only): the semi-on-policy adapter's training state, trained on
  ``arcopo.semi.groups_per_iteration`` buffer groups drawn by its ``buffer`` generator.

The update itself is :func:`astrolabe.rl.arcopo_update.arcopo_phase`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from astrolabe.config import RunConfig
from astrolabe.data.arrays import read_columns
from astrolabe.models.factory import build_dit, stream_spec
from astrolabe.models.registry import get_base_model
from astrolabe.rl.arcopo_semi import SEMI_STATE_SUBDIR
from astrolabe.rl.arcopo_update import ARCOPO_GENERATORS, OldPolicy, PivotGroupData, arcopo_phase, read_pivot_groups
from stages.base import StageResult
from stages.label_uncertainty import LABELS_FILE
from stages.nft_update import STATE_SUBDIR, build_training_state, encode_prompts

log = logging.getLogger(__name__)

PARTS_FILE = "parts.json"  # = stages.arcopo_buffer.PARTS_FILE (written there)


def read_labelled_groups(rollout: Path, labels: Path) -> tuple[list[PivotGroupData], int]:
    """The pivot groups of a rollout with their advantages from ``labels.zarr``."""
    keys, cols, _ = read_columns(Path(labels) / LABELS_FILE)
    if "advantage" not in cols:
        raise KeyError(f"{labels}/{LABELS_FILE} has no column 'advantage'; rerun the label_uncertainty stage")
    return read_pivot_groups(Path(rollout), keys, cols["advantage"])


def read_buffer(buffer: Path) -> list[PivotGroupData]:
    """Every labelled group of the replay buffer (the parts listed in ``<buffer>/parts.json``), in part order."""
    parts = json.loads((Path(buffer) / PARTS_FILE).read_text(encoding="utf-8"))["parts"]
    groups: list[PivotGroupData] = []
    for part in parts:
        groups += read_labelled_groups(Path(part["rollout"]), Path(part["labels"]))[0]
    if not groups:
        raise ValueError(f"the replay buffer {buffer} holds no group with finite advantages; rebuild it")
    return groups


def train_adapter(cfg: RunConfig, groups: Sequence[PivotGroupData], contexts: Mapping[str, torch.Tensor],
                  checkpoint: Path | None, out: Path, iteration: int, old_policy: OldPolicy,
                  extra_generators: Sequence[str] = (), pick: int | None = None) -> dict[str, float]:  # fmt: skip
    """Build (or restore from ``checkpoint``) one adapter's training state, run a phase, save it to ``out``.

    ``pick``: train on that many groups drawn without replacement by the state's ``buffer`` generator.
    """
    base = get_base_model(cfg.model.base)
    state = build_training_state(cfg, build_dit(cfg.model, base))
    for i, name in enumerate((*ARCOPO_GENERATORS, *extra_generators)):
        if name not in state.generators:
            state.register_generator(name, torch.Generator().manual_seed(cfg.rl.lora_seed + 101 + i))
    if checkpoint is not None:
        state.load(checkpoint)
    elif iteration > 0:
        raise FileNotFoundError(f"nft_update (arcopo) at iteration {iteration} needs inputs['checkpoint']")
    if pick is not None:
        order = torch.randperm(len(groups), generator=state.generators["buffer"]).tolist()
        groups = [groups[i] for i in order[: min(pick, len(groups))]]
    metrics = arcopo_phase(state, groups, contexts, stream_spec(cfg.model, base), cfg.arcopo, epochs=cfg.rl.epochs,
                           accumulation_steps=cfg.rl.accumulation_steps, old_policy=old_policy,
                           checkpointing=cfg.rl.update.gradient_checkpointing)
    state.extra = {"iteration": iteration, "trained_groups": len(groups), "old_policy": old_policy}
    state.save(out)
    return metrics


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int) -> StageResult:
    t0 = time.perf_counter()
    groups, skipped = read_labelled_groups(Path(inputs["rollout"]), Path(inputs["labels"]))
    if not groups:
        raise ValueError(f"no trainable group in {inputs['labels']}: every group has a NaN advantage ({skipped} "
                         "skipped); check the score stage and rerun score and label_uncertainty")
    semi = cfg.arcopo.semi
    if semi is not None and "buffer" not in inputs:
        raise KeyError("arcopo.semi is set: the nft_update stage needs inputs['buffer'] (the arcopo_buffer output)")
    buffer = read_buffer(Path(inputs["buffer"])) if semi is not None else []
    contexts = encode_prompts(cfg, [g.prompt for g in [*groups, *buffer]])
    ckpt = Path(inputs["checkpoint"]) if "checkpoint" in inputs else None
    t_build = time.perf_counter() - t0

    t1 = time.perf_counter()
    metrics = train_adapter(cfg, groups, contexts, ckpt / STATE_SUBDIR if ckpt else None, out_dir / STATE_SUBDIR,
                            iteration, old_policy="old")
    if semi is not None:
        semi_metrics = train_adapter(cfg, buffer, contexts, ckpt / SEMI_STATE_SUBDIR if ckpt else None,
                                     out_dir / SEMI_STATE_SUBDIR, iteration, old_policy="ref",
                                     extra_generators=("buffer",), pick=semi.groups_per_iteration)
        metrics |= {f"semi/{k}": v for k, v in semi_metrics.items()}
    t_train = time.perf_counter() - t1
    log.info("nft_update it%d (arcopo): %d groups, loss %.4g, entropy %.3g, clip fraction %.3g", iteration,
             len(groups), metrics["loss/policy"], metrics["arcopo/entropy"], metrics["arcopo/clip_fraction"])
    extra: dict[str, Any] = {"metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
                             "algorithm": "arcopo"}
    return StageResult(
        counts={"groups": len(groups) + skipped, "trained_groups": len(groups), "skipped_nan_groups": skipped,
                "optimizer_steps": int(metrics["update/optimizer_steps"]), "buffer_groups": len(buffer)},
        seeds={"lora_seed": cfg.rl.lora_seed, "from_checkpoint": str(ckpt) if ckpt else None},
        timings={"build": t_build, "train": t_train},
        extra=extra,
    )

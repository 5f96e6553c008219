"""The training states of the update stage: NFT's (:func:`build_training_state`) and AR-CoPO's adapters.

A :class:`~astrolabe.rl.state.TrainingState` holds the policies (LoRA adapters seeded by ``rl.lora_seed``), the
optimizer, the selective-KL controller and the named generators of the update. The generator seeds are fixed
offsets of ``rl.lora_seed``, so every rank (and a resumed run) builds the same streams:

    NFT       sigma, noise, shuffle                  lora_seed + 1, + 2, + 3
    AR-CoPO   those, then ARCOPO_GENERATORS, extra   lora_seed + 101 + i, i the name's index in that list
                                                     (a name already registered keeps its stream)

AR-CoPO trains one adapter per state: the on-policy one (``old_policy="old"``) and, with ``arcopo.semi``, the
semi-on-policy one (``old_policy="ref"``, trained on ``pick`` groups of the replay buffer drawn without
replacement by its ``buffer`` generator). The stage (``stages/nft_update.py``) reads the groups and writes the
manifest; this module builds, trains and saves the states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from astrolabe.build import build_dit, stream_config
from astrolabe.config import RLConfig, RunConfig
from astrolabe.distributed import dist_rank_world
from astrolabe.models.registry import get_base_model
from astrolabe.rl.arcopo_update import ARCOPO_GENERATORS, OldPolicy, PivotGroupData, arcopo_phase
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.selective_kl import FractionController
from astrolabe.rl.state import TrainingState

__all__ = [
    "GENERATORS",
    "arcopo_adapter_phase",
    "build_arcopo_state",
    "build_training_state",
    "train_arcopo_adapter",
]

GENERATORS = ("sigma", "noise", "shuffle")  # NFT's update generators, in seed order


def build_training_state(rl: RLConfig, dit: torch.nn.Module) -> TrainingState:
    """Fresh policies (LoRA from ``rl.lora_seed``) and optimizer with the update's generators registered."""
    policy_cfg = PolicyConfig(averaging=rl.averaging, ema_start_step=rl.ema_start_step, reference=rl.reference,
                              refresh=rl.reference_refresh)
    policies = PolicySet.build(dit, rl.lora, policy_cfg, generator=torch.Generator().manual_seed(rl.lora_seed))
    controller = FractionController(rl.selective_kl) if rl.selective_kl is not None else None
    state = TrainingState(policies, rl.optim, controller)
    for i, name in enumerate(GENERATORS):
        state.register_generator(name, torch.Generator().manual_seed(rl.lora_seed + 1 + i))
    return state


def build_arcopo_state(cfg: RunConfig, checkpoint: Path | None, iteration: int,
                       extra_generators: Sequence[str] = ()) -> TrainingState:  # fmt: skip
    """One AR-CoPO adapter's training state: fresh (iteration 0) or restored from ``checkpoint`` (a state
    directory), with the update's generators (:data:`ARCOPO_GENERATORS` and ``extra_generators``) registered."""
    base = get_base_model(cfg.model.base)
    state = build_training_state(cfg.rl, build_dit(cfg.model, base))
    for i, name in enumerate((*ARCOPO_GENERATORS, *extra_generators)):
        if name not in state.generators:
            state.register_generator(name, torch.Generator().manual_seed(cfg.rl.lora_seed + 101 + i))
    if checkpoint is not None:
        state.load(checkpoint)
    elif iteration > 0:
        raise FileNotFoundError(f"nft_update (arcopo) at iteration {iteration} needs inputs['checkpoint']")
    return state


def arcopo_adapter_phase(cfg: RunConfig, state: TrainingState, groups: Sequence[PivotGroupData],
                         contexts: Mapping[str, torch.Tensor], iteration: int, old_policy: OldPolicy,
                         pick: int | None = None) -> dict[str, float]:  # fmt: skip
    """One iteration of one adapter on ``state`` (every rank, the same arguments); ``pick``: train on that many
    groups drawn without replacement by the state's ``buffer`` generator."""
    if pick is not None:
        order = torch.randperm(len(groups), generator=state.generators["buffer"]).tolist()
        groups = [groups[i] for i in order[: min(pick, len(groups))]]
    metrics = arcopo_phase(state, groups, contexts, stream_config(cfg.model, get_base_model(cfg.model.base)),
                           cfg.arcopo, epochs=cfg.rl.epochs, accumulation_steps=cfg.rl.accumulation_steps,
                           old_policy=old_policy, parallel=cfg.parallel)
    state.extra = {"iteration": iteration, "trained_groups": len(groups), "old_policy": old_policy}
    return metrics


def train_arcopo_adapter(cfg: RunConfig, groups: Sequence[PivotGroupData], contexts: Mapping[str, torch.Tensor],
                         checkpoint: Path | None, out: Path, iteration: int, old_policy: OldPolicy,
                         extra_generators: Sequence[str] = (), pick: int | None = None,
                         ) -> dict[str, float]:  # fmt: skip
    """Build (or restore from ``checkpoint``) one adapter's training state, run a phase
    (:func:`arcopo_adapter_phase`), and save it to ``out`` (rank 0; every rank holds the same state)."""
    state = build_arcopo_state(cfg, checkpoint, iteration, extra_generators)
    metrics = arcopo_adapter_phase(cfg, state, groups, contexts, iteration, old_policy, pick)
    if dist_rank_world()[0] == 0:
        state.save(out)
    return metrics

"""``astrolabe bench noise``: how much the NFT update's gradient depends on its own noise draw, on a real run.

For one iteration of a finished run (its rollout, labels and the policy the rollout used), the update's full
gradient (one pass over every micro-batch, accumulated, no optimizer step) is computed ``draws`` times, each
with fresh training noise (sigma and eps generators reseeded). Two settings of ``rl.update.noise_per`` are
compared on the same data:

- ``sample``: one eps per candidate (the release; ``rl.micro_batch_size`` as the run has it);
- ``micro_batch``: one eps shared by a micro-batch of one group, with ``rl.micro_batch_size`` raised to the
  group size so the whole group shares it (:mod:`astrolabe.rl.streaming_update`, "Shared noise").

Per setting: ``agreement`` = mean pairwise cosine of the ``draws`` gradients (1 = the noise draw does not
matter, 0 = the gradient is noise) and ``grad_norm`` = their mean norm. ``agreement_ratio`` =
shared / per-sample agreement, measured in one run (NaN when the per-sample agreement is not positive: then
every per-sample gradient is noise, and a ratio means nothing). Both settings have the same expected gradient; a higher
agreement means less of each step is noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from astrolabe.artifacts.stagedir import find_current
from astrolabe.build import build_dit, stream_config
from astrolabe.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from astrolabe.models.registry import get_base_model
from astrolabe.rl.optim import StepStats
from astrolabe.rl.update_states import build_training_state
from flows.run import load_run_config
from stages import nft_update

__all__ = ["NOISE_MODES", "agreement", "gradient_agreement", "gradient_draws"]

NOISE_MODES = ("sample", "micro_batch")


def agreement(grads: list[torch.Tensor]) -> float:
    """Mean pairwise cosine of flat gradients ``grads`` (each (P,)); NaN for fewer than two."""
    pairs = list(itertools.combinations(grads, 2))
    if not pairs:
        return math.nan
    return sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)


def _variant(cfg: RunConfig, noise_per: str) -> RunConfig:
    """``cfg`` with one accumulated pass per update and the noise setting (whole groups share a draw)."""
    data = config_to_dict(cfg)
    rl = data["rl"]
    rl["epochs"], rl["update"]["noise_per"] = 1, noise_per
    rl["accumulation_steps"] = max(1, cfg.rollout.prompts_per_iteration) * cfg.rollout.group_size  # one step a pass
    if noise_per == "micro_batch":
        rl["micro_batch_size"] = max(cfg.rl.micro_batch_size, cfg.rollout.group_size)
    return config_from_dict(data, source=f"bench noise ({noise_per})")


def _inputs(run: Path, iteration: int) -> dict[str, Path]:
    """The rollout, labels and (after iteration 0) checkpoint the update of ``iteration`` read."""
    found = {name: find_current(run, stage, iteration) for name, stage in (("rollout", "rollout"),
                                                                          ("labels", "label_uncertainty"))}  # fmt: skip
    if iteration > 0:
        found["checkpoint"] = find_current(run, "nft_update", iteration - 1)
    missing = [name for name, cur in found.items() if cur is None]
    if missing:
        raise ConfigError(f"run {run} iteration {iteration} has no complete {missing}: pick an iteration that "
                          f"`astrolabe status {run}` lists as done (--iteration), or train it first")  # fmt: skip
    return {name: cur.path for name, cur in found.items()}


def gradient_draws(cfg: RunConfig, inputs: dict[str, Path], iteration: int, draws: int,
                   progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """``draws`` flat gradients (P,) of one update pass over ``inputs``' candidates, draw ``k`` with the
    sigma / noise generators seeded ``k``; ``progress(done, draws)`` after each."""
    cands, _ = nft_update.read_candidates(inputs["rollout"], inputs["labels"])
    if not cands:
        raise ConfigError(f"{inputs['labels']} has no trainable sample (every r is NaN); rerun its score stage")
    base = get_base_model(cfg.model.base)
    contexts = nft_update.encode_prompts(cfg, [c.prompt for c in cands] + [s.prompt for c in cands for s in c.scenes])
    state = build_training_state(cfg.rl, build_dit(cfg.model, base))
    nft_update.restore_or_start(cfg, state, inputs.get("checkpoint"), iteration)
    steps: list[torch.Tensor] = []  # the accumulated gradient of each "optimizer step" of the current pass

    def keep_gradient() -> StepStats:  # stands in for the optimizer step: the weights never move
        steps.append(torch.cat([p.grad.flatten() for p in state.params if p.grad is not None]).double())
        state.optimizer.zero_grad(set_to_none=True)
        return StepStats(step=state.step, grad_norm=float(steps[-1].norm()), lr=0.0, ema_decay=None, skipped=False)

    state.optimizer_step = keep_gradient
    stream = stream_config(cfg.model, base)
    grads = []
    for k in range(draws):
        state.generators["sigma"].manual_seed(k)
        state.generators["noise"].manual_seed(10_000 + k)
        steps.clear()
        nft_update.train_phase(cfg, state, cands, contexts, stream, base.flow_shift)
        grads.append(torch.stack(steps).sum(dim=0))  # (P,): the whole pass, however it was cut into steps
        if progress is not None:
            progress(k + 1, draws)
    return grads


def gradient_agreement(run: Path, iteration: int = 0, draws: int = 4,
                       progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Agreement and gradient norm per ``rl.update.noise_per`` setting on ``run``'s ``iteration`` (module
    docstring); ``progress(mode, done, draws)``."""
    if draws < 2:
        raise ConfigError(f"--draws {draws}: the agreement compares draws; use at least 2 (e.g. 4)")
    cfg = load_run_config(Path(run))
    if cfg.rl.algorithm != "nft":
        raise ConfigError(f"run {run} trains with rl.algorithm={cfg.rl.algorithm!r}; the noise bench measures the NFT update")
    inputs = _inputs(Path(run), iteration)
    out: dict[str, Any] = {"run": str(run), "iteration": iteration, "draws": draws}
    for mode in NOISE_MODES:
        variant = _variant(cfg, mode)
        grads = gradient_draws(variant, inputs, iteration, draws,
                               None if progress is None else lambda d, n, m=mode: progress(m, d, n))  # fmt: skip
        out[mode] = {"agreement": agreement(grads), "grad_norm": sum(float(g.norm()) for g in grads) / len(grads),
                     "micro_batch_size": variant.rl.micro_batch_size}  # fmt: skip
    alone = out["sample"]["agreement"]
    out["agreement_ratio"] = out["micro_batch"]["agreement"] / alone if alone > 0 else math.nan
    return out

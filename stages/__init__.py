"""The stages of a training run, one module each: ``run(cfg, inputs, out_dir, iteration) -> StageResult``.

The six of every run, and ``arcopo_buffer`` (AR-CoPO's semi-on-policy replay buffer, planned only with
``rl.algorithm: arcopo`` and ``arcopo.semi``).

:data:`STAGES` (name -> module, in plan order) is the registry the run engine
(:mod:`astrolabe.artifacts.plan`, :mod:`astrolabe.artifacts.engine`) is given; it never imports this package.
"""

from __future__ import annotations

from stages import arcopo_buffer, evaluate, filter_prompts, label_uncertainty, nft_update, rollout, score

STAGES: dict[str, StageModule] = {
    m.STAGE.name: m for m in (filter_prompts, arcopo_buffer, rollout, score, label_uncertainty, nft_update, evaluate)
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)

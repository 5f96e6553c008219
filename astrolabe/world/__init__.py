"""The tiny procedural world: captioned videos of one moving shape, an analytic detector, verifiable rewards.

- :mod:`.grammar`   caption grammar, palette, train / held-out caption split, prompt files
- :mod:`.render`    deterministic rendering of captions and scene prompts (:class:`WorldConfig`)
- :mod:`.detector`  background, object mask, colour, shape and track read off decoded pixels
- :mod:`.rewards`   ``world_alignment``, ``world_quality``, ``world_motion`` (registered lazily by
  :mod:`astrolabe.rewards`)
- :mod:`.dataset`   (caption, frames) training pairs from the train captions, by seed
- :mod:`.preview`   a captioned contact sheet of videos for a person to look at
"""

from __future__ import annotations

from astrolabe.world.grammar import (
    WorldCaption,
    WorldCaptionError,
    heldout_captions,
    parse_caption,
    train_captions,
    try_parse_caption,
)
from astrolabe.world.render import SceneVideo, WorldConfig, WorldVideo, render, render_caption, render_scene_prompt

__all__ = [
    "SceneVideo",
    "WorldCaption",
    "WorldCaptionError",
    "WorldConfig",
    "WorldVideo",
    "heldout_captions",
    "parse_caption",
    "render",
    "render_caption",
    "render_scene_prompt",
    "train_captions",
    "try_parse_caption",
]

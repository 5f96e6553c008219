"""Scene prompts: ``p1 | p2``, ``p1[5s] | p2[15s]``, ``p1[10s#] | p2``.

Grammar: scenes are separated by ``|``; a scene may end with a duration ``[<seconds>s]``; a ``#``
inside the brackets (``[10s#]``) makes the transition *after* that scene a hard cut (the KV cache is
flushed), otherwise the switch is soft (history kept, cached frames re-encoded under the new prompt).
A bare ``#`` without a duration is written ``[#]``. ``#`` elsewhere in the text is plain text (the
authors' release turned any ``#`` into a cut).

Durations map to blocks: latent frames = seconds * fps / 4 (the VAE's temporal stride), rounded to
whole blocks. Scenes without a duration share the remaining blocks equally (earlier scenes get the
remainder). Malformed syntax raises :class:`ScenePromptError` pointing at the offending character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ScenePromptError(ValueError):
    def __init__(self, text: str, pos: int, message: str) -> None:
        self.text, self.pos = text, pos
        super().__init__(f"{message} at character {pos}:\n  {text}\n  {' ' * pos}^")


@dataclass(frozen=True)
class Scene:
    prompt: str
    seconds: float | None = None
    hard_cut_after: bool = False


@dataclass(frozen=True)
class SceneSegment:
    prompt: str
    start_block: int
    end_block: int  # exclusive
    hard_cut_before: bool  # transition into this segment flushes the cache


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*(#)?\s*$")


def parse_scene_prompt(text: str) -> list[Scene]:
    """Parse a (scene) prompt line into scenes; a plain prompt is one scene."""
    if not text.strip():
        raise ScenePromptError(text, 0, "empty prompt")
    scenes: list[Scene] = []
    start = 0
    parts = text.split("|")
    for i, part in enumerate(parts):
        offset = start
        start += len(part) + 1
        prompt, seconds, cut = part, None, False
        lb = part.find("[")
        if lb >= 0:
            rb = part.find("]", lb)
            if rb < 0:
                raise ScenePromptError(text, offset + lb, "unclosed '['")
            if part[rb + 1 :].strip():
                raise ScenePromptError(text, offset + rb + 1, "text after the duration bracket")
            m = _DURATION.match(part[lb + 1 : rb])
            if m is None or (m.group(1) is None and m.group(2) is None):
                raise ScenePromptError(text, offset + lb + 1, "expected a duration like [5s], [5s#] or [#]")
            seconds = float(m.group(1)) if m.group(1) else None
            if seconds is not None and seconds <= 0:
                raise ScenePromptError(text, offset + lb + 1, "duration must be positive")
            cut = m.group(2) is not None
            prompt = part[:lb]
        elif "]" in part:
            raise ScenePromptError(text, offset + part.find("]"), "']' without '['")
        prompt = " ".join(prompt.split())
        if not prompt:
            raise ScenePromptError(text, offset, "empty scene")
        if cut and i == len(parts) - 1:
            raise ScenePromptError(text, offset + lb + 1, "'#' on the last scene: there is no next scene to cut to")
        scenes.append(Scene(prompt, seconds, cut))
    return scenes


def latent_frames_for_seconds(seconds: float, fps: float, temporal_stride: int = 4) -> float:
    return seconds * fps / temporal_stride


def plan_scenes(scenes: list[Scene], num_blocks: int, fps: float, block_frames: int) -> list[SceneSegment]:
    """Assign whole blocks to scenes; every scene gets at least one block."""
    if num_blocks < len(scenes):
        raise ValueError(f"{len(scenes)} scenes need at least {len(scenes)} blocks, the video has {num_blocks}")
    fixed = {
        i: max(1, round(latent_frames_for_seconds(s.seconds, fps) / block_frames))
        for i, s in enumerate(scenes)
        if s.seconds is not None
    }
    free = [i for i, s in enumerate(scenes) if s.seconds is None]
    remaining = num_blocks - sum(fixed.values())
    if remaining < len(free):
        raise ValueError(
            f"scene durations need {sum(fixed.values())} blocks but the video has {num_blocks} "
            f"({num_blocks * block_frames} latent frames); lengthen the video (--num-frames) or shorten the scenes"
        )
    blocks = dict(fixed)
    for j, i in enumerate(free):
        blocks[i] = remaining // len(free) + (1 if j < remaining % len(free) else 0)
    segments, cursor = [], 0
    for i, s in enumerate(scenes):
        end = cursor + blocks[i]
        segments.append(SceneSegment(s.prompt, cursor, end, i > 0 and scenes[i - 1].hard_cut_after))
        cursor = end
    if cursor < num_blocks:  # all scenes had durations: the last scene runs to the end
        last = segments[-1]
        segments[-1] = SceneSegment(last.prompt, last.start_block, num_blocks, last.hard_cut_before)
    return segments

"""Scene prompts: ``p1 | p2``, ``p1[5s] | p2[15s]``, ``p1[10s#] | p2``.

Grammar: scenes are separated by ``|``; a scene may end with a duration ``[<seconds>s]``; a ``#``
inside the brackets (``[10s#]``) makes the transition *after* that scene a hard cut (the KV cache is
flushed), otherwise the switch is soft (history kept, cached frames re-encoded under the new prompt).
A bare ``#`` without a duration is written ``[#]``. ``#`` elsewhere in the text is plain text (the
authors' release turned any ``#`` into a cut).

Durations map to blocks as the authors' release does (``SceneCausalInferencePipeline``):
``blocks = max(1, int(seconds * fps / (4 * block_frames)))`` (4 = the VAE's temporal stride; at 16 fps
with 3-frame blocks ``[10s]`` -> 13 blocks). A scene without a duration lasts the release's default,
:data:`DEFAULT_SCENE_BLOCKS` = 14 blocks (10.5 s at 16 fps with 3-frame blocks). Scenes follow each other
at these cumulative block counts and the last scene runs to the end of the video. A video must hold every
scene in full (:func:`required_blocks`): generation grows to fit or refuses a too-short ``--num-frames``
before generating anything (the release silently dropped scenes past the end). Malformed syntax raises
:class:`ScenePromptError` pointing at the offending character.
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


DEFAULT_SCENE_BLOCKS = 14  # the release's default_blocks_per_scene ("14 blocks = 10.5s at 16 fps")
VAE_TEMPORAL_STRIDE = 4


class ScenePlanError(ValueError):
    """The video is too short for a prompt's scenes; ``blocks_needed`` is the shortest plan that fits."""

    def __init__(self, message: str, blocks_needed: int) -> None:
        self.blocks_needed = blocks_needed
        super().__init__(message)


def latent_frames_for_seconds(seconds: float, fps: float, temporal_stride: int = VAE_TEMPORAL_STRIDE) -> float:
    return seconds * fps / temporal_stride


def pixel_frames_for_latent(latent_frames: int, temporal_stride: int = VAE_TEMPORAL_STRIDE) -> int:
    """Pixel frames whose every latent frame is shown: ``1 + stride * (latent - 1)`` (21 -> 81, 234 -> 933)."""
    return 1 + temporal_stride * (latent_frames - 1)


def blocks_for_seconds(seconds: float, fps: float, block_frames: int) -> int:
    """The release's conversion: ``max(1, int(seconds * fps / (4 * block_frames)))`` (floor, not round)."""
    return max(1, int(latent_frames_for_seconds(seconds, fps) / block_frames))


def scene_blocks(scene: Scene, fps: float, block_frames: int) -> int:
    """Blocks of one scene: its duration, or :data:`DEFAULT_SCENE_BLOCKS` without one."""
    if scene.seconds is None:
        return DEFAULT_SCENE_BLOCKS
    return blocks_for_seconds(scene.seconds, fps, block_frames)


def required_blocks(scenes: list[Scene], fps: float, block_frames: int) -> int:
    """Blocks a video needs to show every scene in full: the sum of the scenes' blocks, except that a last
    scene without a duration needs one block (it simply runs to the end, as a plain prompt does)."""
    counts = [scene_blocks(s, fps, block_frames) for s in scenes]
    if scenes[-1].seconds is None:
        counts[-1] = 1
    return sum(counts)


def plan_scenes(scenes: list[Scene], num_blocks: int, fps: float, block_frames: int) -> list[SceneSegment]:
    """Whole blocks per scene (see the module docstring); the last scene runs to ``num_blocks``."""
    need = required_blocks(scenes, fps, block_frames)
    if num_blocks < need:
        latent = need * block_frames
        raise ScenePlanError(
            f"the scenes need {need} blocks ({latent} latent frames) but the video has {num_blocks}; lengthen the "
            f"video (--num-frames {pixel_frames_for_latent(latent)} or more) or shorten the scenes",
            need,
        )
    segments, cursor = [], 0
    for i, s in enumerate(scenes):
        end = num_blocks if i == len(scenes) - 1 else cursor + scene_blocks(s, fps, block_frames)
        segments.append(SceneSegment(s.prompt, cursor, end, i > 0 and scenes[i - 1].hard_cut_after))
        cursor = end
    return segments


def segment_at(segments: list[SceneSegment], block: int) -> SceneSegment:
    """The segment that holds ``block``."""
    for seg in segments:
        if seg.start_block <= block < seg.end_block:
            return seg
    raise ValueError(f"block {block} lies outside the scene plan (blocks 0 .. {segments[-1].end_block - 1})")


def single_scene_starts(segments: list[SceneSegment], window_blocks: int) -> list[int]:
    """First blocks ``s`` of the windows ``[s, s + window_blocks)`` that lie inside one segment (a window never
    straddles a scene switch, so one text conditions it and one caption judges it)."""
    return [s for seg in segments for s in range(seg.start_block, seg.end_block - window_blocks + 1)]


def switches_until(segments: list[SceneSegment], block: int) -> list[SceneSegment]:
    """The segments a stream switches into at or before ``block`` (every segment but the first that starts at
    a block ``<= block``): the prompt switches that shaped the KV cache a window starting at ``block`` sees."""
    return [seg for seg in segments[1:] if seg.start_block <= block]


def replay_forwards(segments: list[SceneSegment], window_start_block: int) -> int:
    """No-grad forwards that replaying the cache of a window at ``window_start_block`` takes
    (:func:`~astrolabe.sampling.streaming.rebuild_context`): a context pass per prefix block and a re-cache per
    soft switch (a switch follows at least one block of the previous scene, so the cache is never empty then)."""
    return window_start_block + sum(not seg.hard_cut_before for seg in switches_until(segments, window_start_block))

"""The world's caption grammar, its palette, and the train / held-out caption split.

Grammar (case-insensitive, whitespace-normalised, an optional final ``.``)::

    caption    := article [colour] shape [motion] [background]
    article    := "a" | "an"
    colour     := "red" | "green" | "blue" | "yellow" | "purple" | "white"
    shape      := "circle" | "square" | "triangle"
    motion     := "moving" direction [speed] | "staying still"
    direction  := "left" | "right" | "up" | "down"
    speed      := "slowly" | "quickly"                       (slow / fast)
    background := "on a" colour "background"                  (a colour other than the object's)

e.g. ``a red circle moving left slowly on a blue background``, ``a green triangle staying still on a
white background``. The canonical captions of the train and held-out sets name every attribute;
shorter captions (``a red circle moving left``) are valid too: what they do not name is drawn at
random when rendered and not judged by ``world_alignment``. ``direction`` is ``"still"`` for
``staying still`` (then ``speed`` is None).

Split: the held-out set is every canonical caption whose (colour, shape, direction) triple is held
out. For each of the 18 (colour, shape) pairs exactly one direction is held out (18 of 90 triples),
the directions balanced over the pairs and drawn with a fixed seed such that every (colour, direction)
and (shape, direction) pair still occurs in train: held-out captions are new *combinations* of values
and pairs all seen in training.

Scene prompts for long videos (:func:`scene_prompts`) chain two captions of one set, ``p1[3s] | p2``
(:mod:`astrolabe.sampling.scenes`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astrolabe.artifacts.atomic import write_text
from astrolabe.data.prompts import PromptFilterConfig, jaccard, shingles

__all__ = [
    "COLORS",
    "DIRECTIONS",
    "MOVING_DIRECTIONS",
    "PALETTE",
    "SHAPES",
    "SPEEDS",
    "SCENE_FIRST_SECONDS",
    "SPLIT_SEED",
    "WorldCaption",
    "WorldCaptionError",
    "all_captions",
    "heldout_captions",
    "heldout_triples",
    "parse_caption",
    "scene_prompts",
    "train_captions",
    "try_parse_caption",
    "write_prompt_files",
    "write_scene_prompt_files",
]

#: Named colours, RGB in [0, 1]. Pairwise RGB distances are >= 0.44 (blue - purple), so the nearest
#: named colour is unambiguous after mp4 coding, noise or blur.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.67, 0.24),
    "blue": (0.16, 0.31, 0.86),
    "yellow": (0.92, 0.82, 0.16),
    "purple": (0.59, 0.24, 0.78),
    "white": (0.94, 0.94, 0.94),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOVING_DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DIRECTIONS: tuple[str, ...] = (*MOVING_DIRECTIONS, "still")
SPEEDS: tuple[str, ...] = ("slow", "fast")
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}
SPLIT_SEED = 0
SCENE_FIRST_SECONDS = 3.0  # 4 blocks of 3 latent frames at 16 fps (astrolabe.sampling.scenes.blocks_for_seconds)

_WORD_SPEEDS = {word: speed for speed, word in SPEED_WORDS.items()}
_COLOR_RE = "|".join(COLORS)
_CAPTION_RE = re.compile(
    rf"^an? (?:(?P<color>{_COLOR_RE}) )?(?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?:moving (?P<direction>{'|'.join(MOVING_DIRECTIONS)})(?: (?P<speed>slowly|quickly))?|(?P<still>staying still)))?"
    rf"(?: on an? (?P<background>{_COLOR_RE}) background)?$"
)


class WorldCaptionError(ValueError):
    """A text that is not a caption of the world's grammar."""


@dataclass(frozen=True)
class WorldCaption:
    """The attributes of a world caption; None = not named (drawn at random when rendered). A shape is
    always named.

    ``direction`` is one of :data:`DIRECTIONS` (``"still"`` for ``staying still``); ``speed`` is one of
    :data:`SPEEDS` and only set for moving objects.
    """

    shape: str
    color: str | None = None
    direction: str | None = None
    speed: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise WorldCaptionError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        checks = (("color", COLORS), ("direction", DIRECTIONS), ("speed", SPEEDS), ("background", COLORS))
        for name, allowed in checks:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise WorldCaptionError(f"{name} must be one of {allowed} or None, got {value!r}")
        if self.speed is not None and self.direction in (None, "still"):
            raise WorldCaptionError(f"a speed needs a moving direction, got direction {self.direction!r}")
        if self.color is not None and self.color == self.background:
            raise WorldCaptionError(f"object and background colours must differ, both are {self.color!r}")

    @property
    def text(self) -> str:
        """The caption in the grammar's words, e.g. ``a red circle moving left slowly on a blue background``."""
        words = ["a"]
        if self.color is not None:
            words.append(self.color)
        words.append(self.shape)
        if self.direction == "still":
            words.append("staying still")
        elif self.direction is not None:
            words.append(f"moving {self.direction}")
            if self.speed is not None:
                words.append(SPEED_WORDS[self.speed])
        if self.background is not None:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    @property
    def named(self) -> dict[str, str]:
        """The attributes the caption names: name -> value (in field order)."""
        fields = ("color", "shape", "direction", "speed", "background")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    @property
    def complete(self) -> bool:
        """Every attribute named (``speed`` only for moving objects)."""
        needed = 5 if self.direction in MOVING_DIRECTIONS else 4
        return len(self.named) == needed

    @property
    def triple(self) -> tuple[str | None, str | None, str | None]:
        """``(colour, shape, direction)``: the unit of the train / held-out split."""
        return (self.color, self.shape, self.direction)


def parse_caption(text: str) -> WorldCaption:
    """Parse one caption of the grammar (module docstring); raise :class:`WorldCaptionError` otherwise."""
    normalised = " ".join(text.lower().split()).rstrip(".").strip()
    match = _CAPTION_RE.match(normalised)
    if match is None:
        raise WorldCaptionError(
            f"{text!r} is not a world caption; expected e.g. 'a red circle moving left slowly on a blue background' "
            f"(colours {COLORS}, shapes {SHAPES}, directions {MOVING_DIRECTIONS} or 'staying still', speeds slowly/quickly)"
        )
    groups = match.groupdict()
    direction = "still" if groups["still"] else groups["direction"]
    speed = _WORD_SPEEDS[groups["speed"]] if groups["speed"] else None
    return WorldCaption(groups["shape"], groups["color"], direction, speed, groups["background"])


def try_parse_caption(text: str) -> WorldCaption | None:
    """:func:`parse_caption`, or None if ``text`` is not a world caption."""
    try:
        return parse_caption(text)
    except WorldCaptionError:
        return None


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------


def _pairs_all_in_train(held: dict[tuple[str, str], str]) -> bool:
    """Every (colour, direction) and (shape, direction) pair keeps at least one train triple."""
    color_dirs = {(c, d) for c, s in itertools.product(COLORS, SHAPES) for d in DIRECTIONS if held[(c, s)] != d}
    shape_dirs = {(s, d) for c, s in itertools.product(COLORS, SHAPES) for d in DIRECTIONS if held[(c, s)] != d}
    return len(color_dirs) == len(COLORS) * len(DIRECTIONS) and len(shape_dirs) == len(SHAPES) * len(DIRECTIONS)


def heldout_triples(seed: int = SPLIT_SEED) -> frozenset[tuple[str, str, str]]:
    """The held-out (colour, shape, direction) triples: one direction per (colour, shape) pair.

    The 18 pairs are shuffled with ``numpy.random.default_rng(seed)`` and given directions cyclically
    (``DIRECTIONS[i % 5]``, so each direction is held out 3 or 4 times); shuffles are drawn again
    until every (colour, direction) and (shape, direction) pair keeps a train triple.
    """
    rng = np.random.default_rng(seed)
    pairs = list(itertools.product(COLORS, SHAPES))
    for _ in range(1000):
        order = rng.permutation(len(pairs))
        held = {pairs[j]: DIRECTIONS[i % len(DIRECTIONS)] for i, j in enumerate(order)}
        if _pairs_all_in_train(held):
            return frozenset((c, s, d) for (c, s), d in held.items())
    raise RuntimeError("no held-out assignment keeps every attribute pair in train")  # pragma: no cover


def all_captions() -> list[WorldCaption]:
    """Every complete caption: 6 colours x 3 shapes x (4 directions x 2 speeds + still) x 5 backgrounds = 810."""
    out = []
    for color, shape, direction in itertools.product(COLORS, SHAPES, DIRECTIONS):
        speeds: tuple[str | None, ...] = SPEEDS if direction != "still" else (None,)
        for speed, background in itertools.product(speeds, COLORS):
            if background != color:
                out.append(WorldCaption(shape, color, direction, speed, background))
    return out


def _split(heldout: bool, seed: int) -> list[WorldCaption]:
    held = heldout_triples(seed)
    chosen = [c for c in all_captions() if (c.triple in held) == heldout]
    order = np.random.default_rng([seed, int(heldout)]).permutation(len(chosen))
    return [chosen[i] for i in order]  # shuffled: any prefix is a varied subset


def train_captions(seed: int = SPLIT_SEED) -> list[WorldCaption]:
    """Complete captions whose (colour, shape, direction) triple is not held out, in a fixed shuffled order."""
    return _split(False, seed)


def heldout_captions(seed: int = SPLIT_SEED) -> list[WorldCaption]:
    """Complete captions of the held-out triples (:func:`heldout_triples`), in a fixed shuffled order."""
    return _split(True, seed)


def write_prompt_files(directory: str | Path, seed: int = SPLIT_SEED) -> tuple[Path, Path]:
    """Write ``world_train.txt`` and ``world_heldout.txt`` (one caption per line) into ``directory``.

    The packaged files (``builtin:world/train.txt``, ``builtin:world/heldout.txt``) are this
    function's output for the default seed; a test checks that they still are.
    """
    directory = Path(directory)
    paths = directory / "world_train.txt", directory / "world_heldout.txt"
    for path, captions in zip(paths, (train_captions(seed), heldout_captions(seed))):
        write_text(path, "".join(c.text + "\n" for c in captions))
    return paths



def scene_prompts(
    captions: list[WorldCaption], seed: int = SPLIT_SEED, first_seconds: float = SCENE_FIRST_SECONDS
) -> list[str]:
    """One two-scene prompt ``p1[<first_seconds>s] | p2`` per caption ``p1`` of ``captions`` (in their order).

    ``p2`` is drawn from the same ``captions`` with ``numpy.random.default_rng([seed, 2])`` among those whose
    colour *and* direction differ from ``p1``'s, so the switch is visible, and drawn again while the line would
    be a near duplicate of an earlier one (the prompt filter's rule: ``a p1 | b p2`` and ``b p1' | a p2'`` share
    most word 3-grams), so the filter keeps every line. Both scenes come from one set, so held-out scene prompts
    are made of held-out captions only. The second scene runs to the end of the video.
    """
    rng = np.random.default_rng([seed, 2])
    threshold = PromptFilterConfig().near_duplicate_threshold
    seconds = f"{first_seconds:g}s"
    out: list[str] = []
    kept: list[frozenset] = []
    for first in captions:
        others = [c for c in captions if c.color != first.color and c.direction != first.direction]
        for _ in range(100):
            line = f"{first.text}[{seconds}] | {others[int(rng.integers(len(others)))].text}"
            grams = shingles(line)
            if all(jaccard(grams, k) < threshold for k in kept):
                break
        else:  # pragma: no cover - 100 near duplicates in a row
            raise RuntimeError(f"no second scene for {first.text!r} that is not a near duplicate")
        out.append(line)
        kept.append(grams)
    return out


def write_scene_prompt_files(directory: str | Path, seed: int = SPLIT_SEED) -> tuple[Path, Path]:
    """Write ``world_train_scenes.txt`` and ``world_heldout_scenes.txt`` (:func:`scene_prompts` of the train and
    held-out captions, one per line) into ``directory``; the packaged ``builtin:world/train_scenes.txt`` and
    ``builtin:world/heldout_scenes.txt`` are this function's output for the default seed (tested)."""
    directory = Path(directory)
    paths = directory / "world_train_scenes.txt", directory / "world_heldout_scenes.txt"
    for path, captions in zip(paths, (train_captions(seed), heldout_captions(seed))):
        write_text(path, "".join(line + "\n" for line in scene_prompts(captions, seed)))
    return paths

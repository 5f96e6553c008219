"""Prompt sets: read txt / jsonl / csv prompt files, normalise them and filter them by explicit rules.

Reading (:func:`read_prompt_file`): ``.txt`` = one prompt per line; ``.jsonl`` = one JSON object per
line, the prompt under ``column``; ``.csv`` = a header row and the prompt in column ``column``. Every
prompt keeps its 1-based source line (csv: the row number, header = 1) for the drop report.
``builtin:tiny/train.txt`` and ``builtin:tiny/eval.txt`` name the packaged tiny prompt files,
``builtin:world/train.txt`` and ``builtin:world/heldout.txt`` the world's caption split
(:mod:`astrolabe.world.grammar`), ``builtin:world/train_scenes.txt`` and ``builtin:world/heldout_scenes.txt``
two-scene prompts made of them (``p1[3s] | p2``, :func:`astrolabe.world.grammar.scene_prompts`).

Normalisation (:func:`normalize_prompt`): Unicode NFKC, every run of whitespace (including tabs and
non-breaking spaces) -> one space, stripped.

Tokens (:func:`tokenize`): a whitespace split of the normalised prompt (not a model tokenizer: the
token bounds are in words). Words for matching (:func:`words`): lower-case ``\\w+`` runs.

Rules, applied in this order (the first rule that matches names the drop):

``empty``           nothing left after normalisation.
``non_text``        after removing URLs, letters make up less than ``min_letter_fraction`` of the
                    non-space characters (mostly digits / punctuation / URLs).
``wrong_language``  ASCII letters make up less than ``min_ascii_letter_fraction`` of all letters
                    (a script heuristic: Latin-script English passes, CJK / Cyrillic / Arabic fail).
``blocklist``       a blocklist term occurs as a whole word (or word sequence), case-insensitive.
``too_short`` / ``too_long``  fewer than ``min_tokens`` / more than ``max_tokens`` whitespace tokens, counted
                    per scene of a scene prompt (``a [10s] | b [10s]``: each scene is encoded on its own, so
                    each must fit; the release's six-scene benchmark lines pass). A line that does not
                    parse as a scene prompt is counted whole.
``duplicate``       the same normalised prompt, case-insensitive, was kept before.
``near_duplicate``  Jaccard similarity ``|A & B| / |A | B|`` with an earlier kept prompt is at least
                    ``near_duplicate_threshold``, where A, B are the sets of word 3-grams; prompts with
                    fewer than :data:`SHINGLE_MIN_WORDS` words use their word sets instead (a pair of a
                    short and a long prompt then shares no shingle and is never a near duplicate).
``in_heldout``      (train only, with explicit held-out prompts) the prompt is also held out.

Candidate pairs for the near-duplicate rule come from an inverted index of shingles, so the cost is
proportional to the number of pairs sharing a shingle, not ``N^2``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from astrolabe.configbase import Frozen

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_FILES = {
    "tiny/train.txt": "tiny_train.txt",
    "tiny/eval.txt": "tiny_eval.txt",
    "world/train.txt": "world_train.txt",  # astrolabe.world.grammar.write_prompt_files
    "world/heldout.txt": "world_heldout.txt",
    "world/train_scenes.txt": "world_train_scenes.txt",  # astrolabe.world.grammar.write_scene_prompt_files
    "world/heldout_scenes.txt": "world_heldout_scenes.txt",
}
_BUILTIN_DIR = Path(__file__).resolve().parent / "prompts"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv")
SHINGLE_SIZE = 3
SHINGLE_MIN_WORDS = 5  # fewer words -> compare word sets instead of 3-grams
RULES = (
    "empty",
    "non_text",
    "wrong_language",
    "blocklist",
    "too_short",
    "too_long",
    "duplicate",
    "near_duplicate",
)
_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SPACE_RE = re.compile(r"\s+", re.UNICODE)


class PromptFilterConfig(Frozen):
    """The prompt filtering rules (see the module docstring). Build it from ``DataConfig`` with
    :meth:`from_data_config`; the two heuristic thresholds have their defaults here."""

    min_tokens: int = Field(2, ge=1, description="Fewest whitespace tokens a prompt may have.")
    max_tokens: int = Field(120, ge=1, description="Most whitespace tokens a prompt may have.")
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard of word 3-grams.")
    blocklist: tuple[str, ...] = Field((), description="Terms dropped as whole words, case-insensitive.")
    min_letter_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="non_text: letters / non-space characters (URLs removed) below this."
    )
    min_ascii_letter_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="wrong_language: ASCII letters / all letters below this."
    )

    @classmethod
    def from_data_config(cls, data: object) -> PromptFilterConfig:
        """The rules of a ``DataConfig`` (``min_tokens``, ``max_tokens``, ``near_duplicate_threshold``, ``blocklist``)."""
        return cls(
            min_tokens=data.min_tokens,  # type: ignore[attr-defined]
            max_tokens=data.max_tokens,  # type: ignore[attr-defined]
            near_duplicate_threshold=data.near_duplicate_threshold,  # type: ignore[attr-defined]
            blocklist=tuple(data.blocklist),  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class PromptLine:
    """One prompt as read: its 1-based source line and raw text."""

    line: int
    text: str


@dataclass(frozen=True)
class Dropped:
    line: int
    text: str
    rule: str


@dataclass
class FilterResult:
    """Kept prompts (normalised, in input order), dropped lines, and per-rule drop counts."""

    kept: list[str]
    dropped: list[Dropped]
    counts: dict[str, int]


# ----------------------------------------------------------------------------------- reading


def resolve_prompt_path(path: str | Path) -> Path:
    """``builtin:tiny/train.txt`` -> the packaged file; other paths unchanged (must exist)."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_FILES:
            raise ValueError(f"unknown builtin prompt set {text!r}; available: {sorted(BUILTIN_PREFIX + k for k in BUILTIN_FILES)}")
        return _BUILTIN_DIR / BUILTIN_FILES[name]
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist (set data.train_prompts / data.eval_prompts)")
    return p


def _read_txt(path: Path) -> list[PromptLine]:
    return [PromptLine(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]


def _read_jsonl(path: Path, column: str) -> list[PromptLine]:
    out: list[PromptLine] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            out.append(PromptLine(i, ""))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or column not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{i}: no key {column!r} (found {keys}); set data.column to the prompt key")
        value = obj[column]
        out.append(PromptLine(i, value if isinstance(value, str) else ""))
    return out


def _read_csv(path: Path, column: str) -> list[PromptLine]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(
                f"{path}: csv header {reader.fieldnames} has no column {column!r}; set data.column to the prompt column"
            )
        return [PromptLine(i, row.get(column) or "") for i, row in enumerate(reader, start=2)]


def read_prompt_file(path: str | Path, column: str = "prompt") -> list[PromptLine]:
    """Raw prompts of a ``.txt`` / ``.jsonl`` / ``.csv`` file (or a ``builtin:`` name), with line numbers."""
    p = resolve_prompt_path(path)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return _read_txt(p)
    if suffix == ".jsonl":
        return _read_jsonl(p, column)
    if suffix == ".csv":
        return _read_csv(p, column)
    raise ValueError(f"prompt file {p} has suffix {p.suffix!r}; use one of {SUPPORTED_SUFFIXES}")


# ----------------------------------------------------------------------------------- text helpers


def normalize_prompt(text: str) -> str:
    """NFKC, whitespace runs -> one space, stripped."""
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def tokenize(text: str) -> list[str]:
    """Whitespace tokens (the unit of ``min_tokens`` / ``max_tokens``)."""
    return text.split()


def words(text: str) -> list[str]:
    """Lower-case ``\\w+`` words."""
    return _WORD_RE.findall(text.lower())


def letter_fraction(text: str) -> float:
    """Letters / non-space characters after removing URLs; 0 when nothing is left."""
    rest = "".join(_URL_RE.sub(" ", text).split())
    return sum(c.isalpha() for c in rest) / len(rest) if rest else 0.0


def ascii_letter_fraction(text: str) -> float:
    """ASCII letters / all letters; 1 when there are no letters (left to the non_text rule)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def blocklist_pattern(terms: Sequence[str]) -> re.Pattern[str] | None:
    """Case-insensitive whole-word regex of the (normalised) terms; None for an empty list."""
    cleaned = [normalize_prompt(t) for t in terms if normalize_prompt(t)]
    if not cleaned:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in cleaned)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE | re.UNICODE)


def shingles(text: str, n: int = SHINGLE_SIZE) -> frozenset[Hashable]:
    """Word n-grams (as tuples), or the word set for prompts shorter than :data:`SHINGLE_MIN_WORDS` words."""
    w = words(text)
    if len(w) < SHINGLE_MIN_WORDS:
        return frozenset(w)
    return frozenset(tuple(w[i : i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset[Hashable], b: frozenset[Hashable]) -> float:
    """``|a & b| / |a | b|``; two empty sets -> 1."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


class NearDuplicateIndex:
    """Inverted shingle index of kept prompts; :meth:`match` finds one with Jaccard >= threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._sets: list[frozenset[Hashable]] = []
        self._postings: dict[Hashable, list[int]] = {}

    def match(self, s: frozenset[Hashable]) -> int | None:
        """Index of an earlier set with ``|A & B| / (|A| + |B| - |A & B|) >= threshold``, or None."""
        shared: Counter[int] = Counter()
        for sh in s:
            shared.update(self._postings.get(sh, ()))
        for j, inter in shared.items():
            if inter / (len(s) + len(self._sets[j]) - inter) >= self.threshold:
                return j
        return None

    def add(self, s: frozenset[Hashable]) -> None:
        j = len(self._sets)
        self._sets.append(s)
        for sh in s:
            self._postings.setdefault(sh, []).append(j)


# ----------------------------------------------------------------------------------- filtering


def content_rule(text: str, cfg: PromptFilterConfig, blocked: re.Pattern[str] | None) -> str | None:
    """The first per-prompt rule (empty ... too_long) that drops normalised ``text``, or None."""
    if not text:
        return "empty"
    if letter_fraction(text) < cfg.min_letter_fraction:
        return "non_text"
    if ascii_letter_fraction(text) < cfg.min_ascii_letter_fraction:
        return "wrong_language"
    if blocked is not None and blocked.search(text):
        return "blocklist"
    counts = scene_token_counts(text)
    if min(counts) < cfg.min_tokens:
        return "too_short"
    if max(counts) > cfg.max_tokens:
        return "too_long"
    return None


def scene_token_counts(text: str) -> list[int]:
    """Whitespace tokens of each scene of a scene prompt (duration tags excluded); ``[n]`` for a plain line."""
    from astrolabe.sampling.scenes import ScenePromptError, parse_scene_prompt

    if "|" not in text and "[" not in text:
        return [len(tokenize(text))]
    try:
        scenes = parse_scene_prompt(text)
    except ScenePromptError:
        return [len(tokenize(text))]
    return [len(tokenize(s.prompt)) for s in scenes]


def filter_prompts(
    lines: Iterable[PromptLine], cfg: PromptFilterConfig, exclude: Iterable[str] = ()
) -> FilterResult:
    """Apply the rules of the module docstring in order; ``exclude`` (normalised prompts, compared
    case-insensitively) adds the ``in_heldout`` rule. Kept prompts are normalised, in input order."""
    blocked = blocklist_pattern(cfg.blocklist)
    excluded = {normalize_prompt(t).casefold() for t in exclude}
    counts = {rule: 0 for rule in RULES}
    if excluded:
        counts["in_heldout"] = 0
    seen: set[str] = set()
    index = NearDuplicateIndex(cfg.near_duplicate_threshold)
    kept: list[str] = []
    dropped: list[Dropped] = []
    n_input = 0
    for pl in lines:
        n_input += 1
        text = normalize_prompt(pl.text)
        rule = content_rule(text, cfg, blocked)
        folded = text.casefold()
        sh: frozenset[Hashable] = frozenset()
        if rule is None and folded in seen:
            rule = "duplicate"
        if rule is None:
            sh = shingles(text)
            if index.match(sh) is not None:
                rule = "near_duplicate"
        if rule is None and folded in excluded:
            rule = "in_heldout"
        if rule is not None:
            counts[rule] += 1
            dropped.append(Dropped(pl.line, pl.text, rule))
            continue
        seen.add(folded)
        index.add(sh)
        kept.append(text)
    counts["input"] = n_input
    counts["kept"] = len(kept)
    return FilterResult(kept, dropped, counts)


def split_heldout(prompts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split: ``round(fraction * N)`` prompts chosen by a permutation from
    ``numpy.random.default_rng(seed)`` are held out; both parts keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction {fraction} must lie in [0, 1)")
    n = len(prompts)
    n_held = int(round(fraction * n))
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(n)[:n_held].tolist())
    train = [p for i, p in enumerate(prompts) if i not in held]
    heldout = [p for i, p in enumerate(prompts) if i in held]
    return train, heldout


def load_prompt_list(path: str | Path) -> list[str]:
    """Prompts of a ``train.txt`` / ``heldout.txt`` written by the filter stage (one per line)."""
    p = Path(path)
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line]

"""Stage ``filter_prompts``: raw prompt file(s) -> ``train.txt``, ``heldout.txt``, ``dropped.jsonl``.

Rules and their order are those of :mod:`astrolabe.data.prompts` (the length rule applies per scene of a
scene prompt, so multi-scene lines such as the release's ``interactive_benchmark.txt`` are kept). Held-out prompts are either a
deterministic split of the train file (``data.split_seed``, ``data.heldout_fraction``) or, when
``data.eval_prompts`` is set, that file filtered by the same rules (train prompts equal to a held-out
prompt are then dropped as ``in_heldout``). The cache key includes the SHA-256 of the prompt files,
so editing a prompt file reruns the stage.

Counts: ``train/<rule>``, ``train/input``, ``train/kept`` (and ``eval/...`` for an eval file),
``train_prompts``, ``heldout_prompts``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astrolabe.artifacts.manifest import sha256_file
from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.config import RunConfig
from astrolabe.data.prompts import (
    FilterResult,
    PromptFilterConfig,
    filter_prompts,
    read_prompt_file,
    resolve_prompt_path,
    split_heldout,
)

log = logging.getLogger(__name__)


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    data = cfg.data
    subset: dict[str, Any] = {
        "data": data.model_dump(mode="json"),
        "train_sha256": sha256_file(resolve_prompt_path(data.train_prompts)),
    }
    if data.eval_prompts is not None:
        subset["eval_sha256"] = sha256_file(resolve_prompt_path(data.eval_prompts))
    return subset


STAGE = StageInfo(name="filter_prompts", code_version="2", config_subset=_config_subset, per_iteration=False)


def _filter_file(path: Path, column: str, rules: PromptFilterConfig, exclude: list[str] | None = None) -> FilterResult:
    result = filter_prompts(read_prompt_file(path, column), rules, exclude=exclude or ())
    if not result.kept:
        per_rule = {k: v for k, v in result.counts.items() if v}
        raise ValueError(
            f"prompt file {path} has no usable prompt: {result.counts['input']} lines read, all dropped "
            f"(per rule: {per_rule or 'file is empty'}); fix the file or relax data.min_tokens / max_tokens / "
            "near_duplicate_threshold / blocklist"
        )
    return result


def _write_lines(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")


def _dropped_rows(source: str, result: FilterResult) -> list[str]:
    return [
        json.dumps({"source": source, "line": d.line, "rule": d.rule, "text": d.text}, ensure_ascii=False)
        for d in result.dropped
    ]


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    data = cfg.data
    rules = PromptFilterConfig.from_data_config(data)
    train_path = resolve_prompt_path(data.train_prompts)
    counts: dict[str, int] = {}
    dropped: list[str] = []
    if data.eval_prompts is not None:
        eval_path = resolve_prompt_path(data.eval_prompts)
        held = _filter_file(eval_path, data.column, rules)
        trained = _filter_file(train_path, data.column, rules, exclude=held.kept)
        train, heldout = trained.kept, held.kept
        counts.update({f"eval/{k}": v for k, v in held.counts.items()})
        dropped += _dropped_rows("eval", held)
    else:
        trained = _filter_file(train_path, data.column, rules)
        train, heldout = split_heldout(trained.kept, data.heldout_fraction, data.split_seed)
        if not train:
            raise ValueError(
                f"{train_path}: all {len(trained.kept)} kept prompts went to the held-out split; "
                "lower data.heldout_fraction or add prompts"
            )
        if data.heldout_fraction > 0 and not heldout:
            log.warning("%s: only %d prompts kept, none held out", train_path, len(trained.kept))
    counts.update({f"train/{k}": v for k, v in trained.counts.items()})
    dropped = _dropped_rows("train", trained) + dropped
    counts["train_prompts"] = len(train)
    counts["heldout_prompts"] = len(heldout)
    _write_lines(out_dir / "train.txt", train)
    _write_lines(out_dir / "heldout.txt", heldout)
    (out_dir / "dropped.jsonl").write_text("".join(r + "\n" for r in dropped), encoding="utf-8")
    log.info("filter_prompts: %d train, %d held out, %d dropped", len(train), len(heldout), len(dropped))
    return StageResult(counts=counts, seeds={"split_seed": data.split_seed})

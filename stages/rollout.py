"""Rollout stage: for each prompt of the iteration, a shared prefix and K candidate clip windows -> shards.

Inputs: ``prompts`` (the filter_prompts directory, with ``train.txt``: one prompt per line) and
optionally ``checkpoint`` (the previous iteration's nft_update directory). NFT samples with the *old*
policy: ``state/adapters/old.safetensors`` of that checkpoint is merged into the DiT
(:func:`astrolabe.build.attach_lora_for_inference`); without a checkpoint the base model samples.

Per iteration the plan (prompts, seeds, window starts) is a pure function of the config and the
iteration (:mod:`astrolabe.sampling.branching`); rank ``r`` of ``W`` (env ``RANK`` / ``WORLD_SIZE``, default 0 / 1)
generates the contiguous slice :func:`rank_slice` of the groups and writes ``rollout-rNNN-*.tar``.

One record per candidate, key ``it{iteration}-p{slot}-c{j}``: ``latents`` = the window (W, C, h, w)
float32, extra ``prefix`` = the shared prefix (P, C, h, w) (P may be 0), ``video`` = mp4 of the window's
pixel frames decoded after the prefix (see :mod:`astrolabe.sampling.branching`), and ``meta``
(:func:`candidate_meta`). A scene prompt line (``p1[3s] | p2``) conditions each block on its scene's text and puts
the window inside one scene; ``meta["window_prompt"]`` is that scene's text (what rewards judge the window by) and
``meta["scenes"]`` the plan the update replays. Every line's plan is checked before anything is generated.

With ``rl.algorithm: arcopo`` each group is an AR-CoPO pivot group instead (payload and keys in
:mod:`astrolabe.rl.arcopo_rollout`: pivot chunk inputs and x0 predictions, prefix, tape seeds, full video).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astrolabe.artifacts.ranks import rank_slice
from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.build import build_generation_stack
from astrolabe.config import RunConfig, config_to_dict
from astrolabe.data.shards import RolloutShardWriter
from astrolabe.data.video import encode_mp4
from astrolabe.distributed import dist_rank_world
from astrolabe.rl.arcopo_rollout import rollout_pivot_groups
from astrolabe.sampling.branching import GroupRollout, choose_prompts, group_seeds, rollout_group, window_start_block
from astrolabe.sampling.generation import blocks_for
from astrolabe.sampling.scenes import (
    ScenePlanError,
    ScenePromptError,
    SceneSegment,
    parse_scene_prompt,
    plan_scenes,
    segment_at,
)

log = logging.getLogger(__name__)

PROMPTS_FILE = "train.txt"
CHECKPOINT_STATE_SUBDIR = "state"  # = stages.nft_update.STATE_SUBDIR (not imported: rollout must not load torch RL code)
SHARD_PREFIX = "rollout"


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    subset = {"seed": cfg.seed, "model": config_to_dict(cfg.model), "rollout": config_to_dict(cfg.rollout)}
    if cfg.rl.algorithm == "arcopo":  # pivot groups (astrolabe.rl.arcopo_rollout); NFT keys stay unchanged
        subset["arcopo"] = {"algorithm": "arcopo", "sigma": cfg.arcopo.sigma}
    return subset


# Under torchrun every rank generates its slice of the groups into the same directory (rank-named shards);
# ``num_blocks_per_video`` is the same on every rank (kept once when the ranks' results are merged).
STAGE = StageInfo(name="rollout", code_version="2", config_subset=_config_subset, per_iteration=True,
                  distribution="sliced", rank_invariant_counts=("num_blocks_per_video",),
                  rank_summed_metrics=("rollout/candidates",))


def read_prompts(prompts_dir: Path) -> list[str]:
    """Non-empty, stripped lines of ``<prompts_dir>/train.txt``."""
    path = Path(prompts_dir) / PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the rollout stage needs the filter_prompts output directory")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; check data.train_prompts and the filter settings")
    return prompts


def scene_plans(prompts: list[str], num_blocks: int, fps: float, block_frames: int) -> list[list[SceneSegment]]:
    """The scene plan of every prompt line (a plain prompt is one scene), checked before anything is generated:
    a malformed scene prompt or one whose scenes do not fit the video is an error naming its line."""
    plans = []
    for i, line in enumerate(prompts):
        try:
            plans.append(plan_scenes(parse_scene_prompt(line), num_blocks, fps, block_frames))
        except (ScenePromptError, ScenePlanError) as e:
            raise ValueError(f"training prompt {i + 1} ({line!r}): {e}; fix the line in data.train_prompts or set "
                             "rollout.num_latent_frames to hold every scene") from e
    return plans


def group_id(iteration: int, slot: int) -> str:
    return f"it{iteration}-p{slot}"


def candidate_meta(
    cfg: RunConfig, iteration: int, slot: int, prompt_index: int, prompt: str, j: int, group: GroupRollout,
    prefix_seed: int, cand_seed: int, segments: list[SceneSegment], window_start_block: int,
) -> dict[str, Any]:
    """``prompt`` is the prompt line; ``window_prompt`` the text of the scene the window lies in (what conditioned
    it and what rewards judge it by) and ``scenes`` the plan, ``[text, first block, end block, hard cut before]``
    per scene, that the update replays."""
    return {
        "prompt": prompt,
        "window_prompt": segment_at(segments, window_start_block).prompt,
        "scenes": [[seg.prompt, seg.start_block, seg.end_block, seg.hard_cut_before] for seg in segments],
        "prompt_index": prompt_index,
        "slot": slot,
        "group": group_id(iteration, slot),
        "candidate": j,
        "group_size": group.window_latents.shape[0],
        "window_start_frame": group.window_start_frame,
        "window_frames": int(group.window_latents.shape[1]),
        "prefix_frames": int(group.prefix_latents.shape[0]),
        "prefix_seed": prefix_seed,
        "candidate_seed": cand_seed,
        "base_model": cfg.model.base,
        "iteration": iteration,
    }


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    if iteration is None:
        raise ValueError("the rollout stage runs per iteration; pass iteration=<int>")
    if "prompts" not in inputs:
        raise KeyError("the rollout stage needs inputs['prompts'] (the filter_prompts directory)")
    ro = cfg.rollout
    rank, world = dist_rank_world()
    prompts = read_prompts(inputs["prompts"])
    lora = inputs.get("checkpoint")
    t0 = time.perf_counter()
    state_dir = Path(lora) / CHECKPOINT_STATE_SUBDIR if lora is not None else None
    stack, card = build_generation_stack(cfg, lora=state_dir, policy="old")
    t_build = time.perf_counter() - t0
    num_blocks = blocks_for(ro.num_latent_frames or card.latent_frames, stack.stream.block_frames)

    plans = scene_plans(prompts, num_blocks, stack.fps, stack.stream.block_frames)
    chosen = choose_prompts(len(prompts), ro.prompts_per_iteration, ro.seed, iteration)
    mine = rank_slice(len(chosen), rank, world)
    timings = {"build": t_build, "generation": 0.0, "decoding": 0.0, "encoding_mp4": 0.0}
    seeds: dict[str, Any] = {"run_seed": cfg.seed, "rollout_seed": ro.seed, "rank": rank, "world_size": world,
                             "prompt_indices": chosen, "groups": {}}
    if cfg.rl.algorithm == "arcopo":
        scened = [prompts[i] for i in chosen if len(plans[i]) > 1]
        if scened:
            raise ValueError(f"AR-CoPO rollouts take one-scene prompts, got {scened[0]!r}; use rl.algorithm nft for "
                             "scene prompts (its windows follow the scene text) or plain training prompts")
        with RolloutShardWriter(out_dir, SHARD_PREFIX, rank=rank, config=ro.shards) as writer:
            res = rollout_pivot_groups(
                stack, writer, prompts, chosen, mine, iteration=iteration, run_seed=cfg.seed, rollout_seed=ro.seed,
                group_size=ro.group_size, sigma=cfg.arcopo.sigma, num_blocks=num_blocks, group_id=group_id,
                decode=ro.save_mp4, crf=ro.video_crf, common_meta={"base_model": cfg.model.base},
            )
            shards = writer.close()
        return StageResult(counts={**res.counts, "shards": len(shards), "num_blocks_per_video": num_blocks},
                           seeds={**seeds, "groups": res.groups}, timings={**timings, **res.timings},
                           metrics={"rollout/candidates": float(res.counts["candidates"])},
                           extra={"rank": rank, "world_size": world, "shard_prefix": SHARD_PREFIX,
                                  "policy": str(lora) if lora else "base", "algorithm": "arcopo"})
    n_blocks = n_records = 0
    with RolloutShardWriter(out_dir, SHARD_PREFIX, rank=rank, config=ro.shards) as writer:
        for slot in mine:
            idx = chosen[slot]
            prefix_seed, cand_seeds = group_seeds(cfg.seed, ro.seed, iteration, slot, ro.group_size)
            start = window_start_block(
                ro.window_start, num_blocks, ro.window_blocks, cfg.seed, ro.seed, iteration, slot, segments=plans[idx]
            )
            group = rollout_group(
                stack, prompts[idx], prefix_seed, cand_seeds, start, ro.window_blocks, decode=ro.save_mp4,
                segments=plans[idx],
            )
            timings["generation"] += group.generation_seconds
            timings["decoding"] += group.decoding_seconds
            seeds["groups"][group_id(iteration, slot)] = {
                "prompt_index": idx,
                "prefix_seed": prefix_seed,
                "candidate_seeds": cand_seeds,
                "window_start_block": start,
            }
            prefix_np = group.prefix_latents.numpy()  # (P, C, h, w)
            for j, cand_seed in enumerate(cand_seeds):
                t_enc = time.perf_counter()
                mp4 = encode_mp4(group.window_pixels[j], fps=stack.fps, crf=ro.video_crf) if group.window_pixels is not None else None
                timings["encoding_mp4"] += time.perf_counter() - t_enc
                meta = candidate_meta(cfg, iteration, slot, idx, prompts[idx], j, group, prefix_seed, cand_seed,
                                      plans[idx], start)
                writer.write(f"{group_id(iteration, slot)}-c{j}", group.window_latents[j].numpy(), meta,
                             video_mp4=mp4, extras={"prefix": prefix_np})
                n_records += 1
            n_blocks += start + ro.group_size * ro.window_blocks
            log.info("rollout it%d group %d/%d (prompt %d): window blocks [%d, %d)",
                     iteration, slot + 1, len(chosen), idx, start, start + ro.window_blocks)
        shards = writer.close()
    return StageResult(
        counts={"prompts": len(mine), "candidates": n_records, "blocks": n_blocks, "shards": len(shards),
                "num_blocks_per_video": num_blocks},
        seeds=seeds,
        timings=timings,
        metrics={"rollout/candidates": float(n_records)},
        extra={"rank": rank, "world_size": world, "shard_prefix": SHARD_PREFIX,
               "policy": str(lora) if lora else "base"},
    )

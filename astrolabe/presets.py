"""GPU scale presets: ``resources.gpus`` -> per-GPU batch, samples per prompt, prompt groups (the release's table).

The release (reference 2.5, ``GPU_CONFIGS`` + ``_apply_batch_config`` in ``configs/_base_clean.py``) keeps one row
``(bsz, K, num_groups, test_bsz)`` per model family and GPU count ``n``. ``bsz`` is then searched downward from the
row's value for the first one with ``(num_groups * K) % (n * bsz) == 0`` and ``(n * bsz) % K == 0``, and

    batches_per_epoch = num_groups * K / (n * bsz)    (= the release's gradient_accumulation_steps)

so every epoch is ``num_groups`` prompts x ``K`` videos and **one optimizer step**. Here one epoch is one
pipeline iteration and the derived values land in the run config (:func:`derived_settings`)::

    rollout.group_size            = K                          samples per prompt (one group per prompt)
    rollout.prompts_per_iteration = num_groups                 prompt groups per iteration
    rl.micro_batch_size           = bsz                        candidates per forward/backward (per GPU)
    rl.accumulation_steps         = num_groups * K / bsz       every micro-batch of the iteration, summed over
                                                               ranks: one optimizer step per iteration
    resources.nproc_per_node      = min(n, 8), resources.nnodes = n / nproc_per_node

Not copied: the release's sampler re-seeding bug (reference 10.1) made every batch of an epoch hold the same
prompts (1 distinct prompt x 384 videos on 8 GPUs); here an iteration really draws ``num_groups`` prompts.

| family  | GPUs | bsz | K  | groups | test bsz | batches/epoch | videos/iteration |
|---------|------|-----|----|--------|----------|---------------|------------------|
| wan     | 8    | 3   | 24 | 16     | 3        | 16            | 384              |
| wan     | 16   | 2   | 16 | 16     | 2        | 8             | 256              |
| wan     | 24   | 4   | 24 | 48     | 4        | 12            | 1152             |
| wan     | 48   | 4   | 24 | 48     | 4        | 6             | 1152             |
| krea14b | 8    | 1   | 8  | 8      | 1        | 8             | 64               |
| krea14b | 16   | 1   | 16 | 16     | 1        | 16            | 256              |
| krea14b | 24   | 1   | 24 | 24     | 1        | 24            | 576              |
| krea14b | 48   | 1   | 16 | 48     | 1        | 16            | 768              |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["wan", "krea14b"]
GPU_SCALES: tuple[int, ...] = (8, 16, 24, 48)
GPUS_PER_NODE = 8  # the release's nodes (8 x H100/H200)

# (bsz, K = samples per prompt, num_groups, test_bsz) per family and GPU count: the release's GPU_CONFIGS.
GPU_CONFIGS: dict[Family, dict[int, tuple[int, int, int, int]]] = {
    "wan": {8: (3, 24, 16, 3), 16: (2, 16, 16, 2), 24: (4, 24, 48, 4), 48: (4, 24, 48, 4)},
    "krea14b": {8: (1, 8, 8, 1), 16: (1, 16, 16, 1), 24: (1, 24, 24, 1), 48: (1, 16, 48, 1)},
}


@dataclass(frozen=True)
class GpuScale:
    """The derived batch layout of one (family, GPU count); see the module docstring."""

    family: Family
    gpus: int
    per_gpu_batch: int  # bsz
    group_size: int  # K
    prompt_groups: int  # num_groups
    eval_batch: int  # test_bsz
    batches_per_epoch: int  # per GPU = the release's gradient_accumulation_steps

    @property
    def videos_per_iteration(self) -> int:
        return self.prompt_groups * self.group_size

    @property
    def videos_per_gpu(self) -> int:
        return self.videos_per_iteration // self.gpus

    @property
    def micro_batches_per_iteration(self) -> int:
        """All micro-batches of an iteration over every rank: one optimizer step takes them all."""
        return self.videos_per_iteration // self.per_gpu_batch

    @property
    def nproc_per_node(self) -> int:
        return min(self.gpus, GPUS_PER_NODE)

    @property
    def nnodes(self) -> int:
        return self.gpus // self.nproc_per_node


def family_of(base: str) -> Family:
    """Table family of a base model: Krea 14B has its own row set, every 1.3B Wan model uses 'wan'."""
    return "krea14b" if base == "krea14b" else "wan"


def check_gpus(gpus: int) -> int:
    if gpus not in GPU_SCALES:
        raise ValueError(
            f"resources.gpus must be one of {', '.join(map(str, GPU_SCALES))} (the release's GPU presets), "
            f"got {gpus!r}; or leave it null and set rollout.group_size, rollout.prompts_per_iteration and "
            "rl.micro_batch_size yourself"
        )
    return gpus


def search_batch(gpus: int, bsz: int, group_size: int, groups: int) -> int:
    """The release's ``_apply_batch_config`` search: the largest ``b <= bsz`` with ``(groups*K) % (n*b) == 0`` and
    ``(n*b) % K == 0``."""
    for b in range(bsz, 0, -1):
        if (groups * group_size) % (gpus * b) == 0 and (gpus * b) % group_size == 0:
            return b
    raise ValueError(f"no per-GPU batch <= {bsz} fits {gpus} GPUs, K={group_size}, {groups} groups")


def gpu_scale(base: str, gpus: int) -> GpuScale:
    """Derived layout for ``base`` (registry name) on ``gpus`` GPUs (one of :data:`GPU_SCALES`)."""
    family = family_of(base)
    bsz, k, groups, test_bsz = GPU_CONFIGS[family][check_gpus(gpus)]
    b = search_batch(gpus, bsz, k, groups)
    return GpuScale(family, gpus, b, k, groups, test_bsz, groups * k // (gpus * b))


def derived_settings(scale: GpuScale) -> dict[tuple[str, ...], int]:
    """Config key path -> value that ``resources.gpus`` sets (module docstring)."""
    return {
        ("rollout", "group_size"): scale.group_size,
        ("rollout", "prompts_per_iteration"): scale.prompt_groups,
        ("rl", "micro_batch_size"): scale.per_gpu_batch,
        ("rl", "accumulation_steps"): scale.micro_batches_per_iteration,
        ("resources", "nproc_per_node"): scale.nproc_per_node,
        ("resources", "nnodes"): scale.nnodes,
    }


def describe(scale: GpuScale) -> list[str]:
    """Human-readable lines for ``astrolabe config show``."""
    rows = [
        ("per-GPU batch (rl.micro_batch_size)", scale.per_gpu_batch),
        ("samples per prompt (rollout.group_size)", scale.group_size),
        ("prompt groups (rollout.prompts_per_iteration)", scale.prompt_groups),
        ("batches per GPU per iteration (release grad-accum)", scale.batches_per_epoch),
        ("micro-batches per optimizer step (rl.accumulation_steps)", scale.micro_batches_per_iteration),
        ("videos per iteration / per GPU", f"{scale.videos_per_iteration} / {scale.videos_per_gpu}"),
        ("eval batch per GPU (release test_bsz)", scale.eval_batch),
        ("launch (resources.nnodes x nproc_per_node)", f"{scale.nnodes} x {scale.nproc_per_node}"),
    ]
    head = f"resources.gpus={scale.gpus} ({scale.family} rows of the release's GPU_CONFIGS):"
    return [head, *(f"  {label:<58} {value}" for label, value in rows)]

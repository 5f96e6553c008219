"""Noise tape: every Gaussian draw of a streaming rollout, held explicitly per block and per step.

The sampler (:func:`astrolabe.sampling.streaming.denoise_steps`) makes, for the block that starts at
latent frame ``s`` and is denoised in ``S`` steps, exactly ``S`` draws::

    step 0:        eps_0    initial noise        x = eps_0
    step k >= 1:   eps_k    re-noising noise     x = (1 - sigma_k) x0_hat + sigma_k eps_k

(the last step does not re-noise). A :class:`NoiseTape` stores them as one tensor per block,
``(S_b, B, f_b, C, h, w)``, and serves them to the sampler by ``(start_frame, step)``, so the caller
decides every draw. :meth:`NoiseTape.from_seeds` records exactly the draws :class:`SampleNoise` would
make from the same seeds, so a tape-driven run equals the default run bit for bit.

AR-CoPO branches (``ar-copo-reference.md`` 2.2-2.3, paper Eq. 7): G branches share *all* noise (every
block's initial noise, every re-noising noise) except the pivot block's initial noise::

    eps_p^(i) = sqrt(1 - s^2) * eps_p* + s * d_i,     d_i ~ N(0, I) independent,  i = 1..G

With ``eps_p*`` and ``d_i`` independent standard normal, ``Var = (1 - s^2) + s^2 = 1``: the formula keeps
unit variance, so each branch's pivot noise is again a standard normal draw (its correlation with the
base noise is ``sqrt(1 - s^2)``). Shared blocks are stored as expanded views (no copy per branch).

Replay: a branch tape is a pure function of :class:`BranchTapeSeeds` (base seed, perturbation seed,
pivot, G, sigma, number of blocks) and the stream config, so recorded seeds reproduce the videos; a tape
also saves to safetensors (:meth:`NoiseTape.save`), shared blocks stored once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from astrolabe.sampling.streaming import SampleNoise, StreamConfig

TAPE_FORMAT = "astrolabe.noise_tape/1"


def _is_shared(t: torch.Tensor) -> bool:
    """True when a block tensor (S, B, ...) is one row expanded over the batch (stride 0 on dim 1)."""
    return t.shape[1] > 1 and t.stride(1) == 0


@dataclass(frozen=True)
class NoiseTape:
    """The draws of a batch of ``B`` streams, per block and per denoising step (module docstring).

    ``blocks[b][k]`` is draw k of block b, ``(B, f_b, C, h, w)``: k = 0 the initial noise, k >= 1 the
    re-noising noise before denoising step k. Implements the sampler's ``NoiseSource`` protocol.
    """

    start_frames: tuple[int, ...]  # first latent frame of each block, strictly increasing
    blocks: tuple[torch.Tensor, ...]  # block b: (S_b, B, f_b, C, h, w)

    def __post_init__(self) -> None:
        if len(self.start_frames) != len(self.blocks) or not self.blocks:
            raise ValueError(
                f"a noise tape needs one tensor per block start: {len(self.start_frames)} starts, "
                f"{len(self.blocks)} blocks (and at least one block)"
            )
        if any(b <= a for a, b in zip(self.start_frames, self.start_frames[1:])):
            raise ValueError(f"block start frames must increase strictly, got {self.start_frames}")
        batches = {t.shape[1] if t.ndim == 6 else None for t in self.blocks}
        if len(batches) != 1 or None in batches:
            shapes = [tuple(t.shape) for t in self.blocks]
            raise ValueError(f"every block must be (S, B, f, C, h, w) with one batch size B, got {shapes}")

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self.blocks[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_index(self, start_frame: int) -> int:
        try:
            return self.start_frames.index(start_frame)
        except ValueError:
            raise KeyError(
                f"the noise tape has no block starting at latent frame {start_frame} (its blocks start at "
                f"{list(self.start_frames)}); build the tape for as many blocks as the video has"
            ) from None

    def draw(self, start_frame: int, step: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Draw ``step`` of the block at ``start_frame``, a fresh contiguous ``(B, *shape)`` tensor."""
        block = self.blocks[self.block_index(start_frame)]  # (S, B, f, C, h, w)
        if not 0 <= step < block.shape[0]:
            raise IndexError(
                f"block at frame {start_frame} has {block.shape[0]} draws on the tape, step {step} requested: "
                "the tape was built for a different step schedule"
            )
        if tuple(block.shape[2:]) != tuple(shape):
            raise ValueError(
                f"noise tape block at frame {start_frame} has shape {tuple(block.shape[2:])}, the sampler "
                f"needs {tuple(shape)}: the tape was built for a different latent size or block length"
            )
        return block[step].to(dtype=dtype).clone(memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------ transforms
    def select(self, rows: Sequence[int]) -> NoiseTape:
        """The tape of a subset of the streams (rows in the given order); shared blocks stay shared."""
        idx = [int(r) for r in rows]
        if not idx or any(not 0 <= r < len(self) for r in idx):
            raise IndexError(f"rows {idx} out of range for a tape of {len(self)} streams")

        def pick(t: torch.Tensor) -> torch.Tensor:
            if _is_shared(t):
                return t[:, :1].expand(t.shape[0], len(idx), *t.shape[2:])
            return t[:, idx]

        return NoiseTape(self.start_frames, tuple(pick(t) for t in self.blocks))

    def to(self, device: torch.device | str) -> NoiseTape:
        def move(t: torch.Tensor) -> torch.Tensor:
            if _is_shared(t):
                return t[:, :1].to(device).expand(t.shape)
            return t.to(device)

        return NoiseTape(self.start_frames, tuple(move(t) for t in self.blocks))

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_seeds(
        seeds: Sequence[int],
        stream: StreamConfig,
        num_blocks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> NoiseTape:
        """Record the draws :class:`SampleNoise` ``(seeds, device)`` makes for ``num_blocks`` full blocks
        (same generators, same call order), so sampling from this tape equals sampling from the seeds."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        source = SampleNoise(seeds, device)
        f = stream.block_frames
        starts = tuple(b * f for b in range(num_blocks))
        shape = stream.block_shape(len(seeds))[1:]
        blocks = tuple(
            torch.stack([source.randn(shape, dtype) for _ in stream.steps_for(s).timesteps])  # (S, B, f, C, h, w)
            for s in starts
        )
        return NoiseTape(starts, blocks)

    # ------------------------------------------------------------------ storage
    def save(self, path: str | Path) -> None:
        """Write the tape to a safetensors file; a block shared by all streams is stored once."""
        from safetensors.torch import save_file

        shared = [_is_shared(t) for t in self.blocks]
        tensors = {
            f"block_{b}": (t[:, :1] if s else t).contiguous().cpu() for b, (t, s) in enumerate(zip(self.blocks, shared))
        }
        meta = {"format": TAPE_FORMAT, "start_frames": list(self.start_frames), "shared": shared, "batch": len(self)}
        save_file(tensors, str(path), metadata={"tape": json.dumps(meta)})

    @staticmethod
    def load(path: str | Path, device: torch.device | str = "cpu") -> NoiseTape:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {}).get("tape", "{}"))
            if meta.get("format") != TAPE_FORMAT:
                raise ValueError(f"{path} is not a noise tape ({TAPE_FORMAT}); write tapes with NoiseTape.save")
            raw = [fh.get_tensor(f"block_{b}") for b in range(len(meta["start_frames"]))]
        batch = int(meta["batch"])
        blocks = tuple(
            t.to(device).expand(t.shape[0], batch, *t.shape[2:]) if s else t.to(device)
            for t, s in zip(raw, meta["shared"])
        )
        return NoiseTape(tuple(int(s) for s in meta["start_frames"]), blocks)


# --------------------------------------------------------------------------------------------- branches


def perturb_noise(base: torch.Tensor, sigma: float, d: torch.Tensor) -> torch.Tensor:
    """``eps_i = sqrt(1 - sigma^2) * base + sigma * d_i`` (paper Eq. 7): unit variance for independent
    standard normal ``base`` (1, ...) or (...) and ``d`` (G, ...). Returns (G, ...)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"perturbation sigma={sigma} must lie in [0, 1] (arcopo.sigma, 0.5 in the paper)")
    return math.sqrt(1.0 - sigma * sigma) * base + sigma * d


def branch_tapes(
    base: NoiseTape, pivot_block: int, group_size: int, sigma: float, generator: torch.Generator
) -> NoiseTape:
    """G branch tapes in one batch-G tape: every draw of ``base`` (a one-stream tape) shared, except the
    pivot block's initial noise, ``sqrt(1 - sigma^2) * eps* + sigma * d_i`` with ``d`` (G, f, C, h, w)
    drawn in one call from ``generator`` (on the tape's device)."""
    if len(base) != 1:
        raise ValueError(f"branch_tapes needs a one-stream base tape, got {len(base)} streams")
    if not 0 <= pivot_block < base.num_blocks:
        raise ValueError(f"pivot block {pivot_block} outside the tape's {base.num_blocks} blocks")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    blocks = []
    for b, t in enumerate(base.blocks):  # t: (S, 1, f, C, h, w)
        shared = t.expand(t.shape[0], group_size, *t.shape[2:])
        if b == pivot_block:
            d = torch.randn((group_size, *t.shape[2:]), generator=generator, device=t.device, dtype=t.dtype)
            pivot = perturb_noise(t[0], sigma, d)  # (G, f, C, h, w)
            shared = torch.cat([pivot.unsqueeze(0), shared[1:]], dim=0)  # re-noising draws stay shared
        blocks.append(shared)
    return NoiseTape(base.start_frames, tuple(blocks))


@dataclass(frozen=True)
class BranchTapeSeeds:
    """Everything that determines a group's branch tape (record it with the rollout to replay it)."""

    base_seed: int  # seed of the shared draws (a SampleNoise stream)
    perturb_seed: int  # seed of the generator of d_1..d_G
    pivot_block: int
    group_size: int
    sigma: float
    num_blocks: int

    def build(
        self, stream: StreamConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> NoiseTape:
        base = NoiseTape.from_seeds([self.base_seed], stream, self.num_blocks, device, dtype)
        gen = torch.Generator(device=torch.device(device)).manual_seed(self.perturb_seed)
        return branch_tapes(base, self.pivot_block, self.group_size, self.sigma, gen)

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, int | float]) -> BranchTapeSeeds:
        return BranchTapeSeeds(**data)  # type: ignore[arg-type]

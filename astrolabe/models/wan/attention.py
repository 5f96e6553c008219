"""Attention backends and the frame-level attention plan of the block-causal / windowed DiT.

The plan says, for each query block of new frames, which key frames it may see. One rule covers
bidirectional, block-causal (global), rolling-window-with-sink, cached and non-cached forwards, so
that cached streaming and the non-cached block-causal forward compute the same thing by construction:

    key frame k is visible to the query block ending at absolute frame position P (exclusive) iff
        pos_k < P                                             (causal across blocks, full inside a block)
        and (window is None                                   (global attention)
             or pos_k >= P - (window - sink)                  (rolling part of the window)
             or origin <= pos_k < origin + sink)              (attention-sink frames)

``window`` counts all attended frames including the sink and the block itself (LongLive: window 12,
sink 3, block 3 -> sink 3 + 6 recent + own 3). ``origin`` is the first frame since the last cache reset.

RoPE modes of the cached forward (``RopeMode``):

* ``absolute`` (training, rollouts; Self-Forcing / LongLive): every frame is rotated with its absolute
  latent-frame index; keys are cached after RoPE.
* ``cache_relative`` (the release's ``InferCausalWanModel``, "block-relativistic RoPE", models-reference
  5.3/5.4): keys are cached un-rotated; at every forward the keys a query block sees are rotated with their
  *slot* in that block's window, 0 .. n_keys - 1 in position order (sink first), and the block's queries with
  the slots of its own frames (the window start is slot 0). With the plan above the visible keys are
  exactly the release's buffer ``[0, local_end)``: slots equal its buffer indices, so the new block's
  queries get ``[L - f, L)`` once the buffer has rolled and ``[local_start, local_start + f)`` before.
  Temporal positions never exceed the window, so videos are not limited by the 1024-entry RoPE table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from astrolabe.models.wan.rope import rope_apply, rope_frequencies

log = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "flash"]
RopeMode = Literal["absolute", "cache_relative"]


@dataclass(frozen=True)
class CausalWindow:
    """Block-causal attention: blocks of ``block_frames``; optional rolling window with sink frames."""

    block_frames: int
    window_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self) -> None:
        if self.block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {self.block_frames}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames is not None and self.window_frames < self.sink_frames + self.block_frames:
            raise ValueError(
                f"window_frames={self.window_frames} must be >= sink_frames + block_frames "
                f"({self.sink_frames} + {self.block_frames}); use None for global attention"
            )


@dataclass(frozen=True)
class QueryBlock:
    start: int  # first new frame (index into the new frames of this forward)
    end: int  # one past the last new frame
    keys: tuple[int, ...]  # visible frames, indices into [cached frames..., new frames...]


def plan_attention(
    key_positions: Sequence[int],
    num_new: int,
    causal: CausalWindow | None,
    origin: int,
) -> tuple[QueryBlock, ...]:
    """Frame-level attention plan; the last ``num_new`` entries of ``key_positions`` are the new frames."""
    n_keys = len(key_positions)
    n_cached = n_keys - num_new
    if causal is None:
        return (QueryBlock(0, num_new, tuple(range(n_keys))),)
    blocks: list[QueryBlock] = []
    for start in range(0, num_new, causal.block_frames):
        end = min(start + causal.block_frames, num_new)
        block_end_pos = max(key_positions[n_cached + start : n_cached + end]) + 1
        visible = []
        for idx, pos in enumerate(key_positions):
            if pos >= block_end_pos:
                continue
            if causal.window_frames is not None:
                in_window = pos >= block_end_pos - (causal.window_frames - causal.sink_frames)
                is_sink = origin <= pos < origin + causal.sink_frames
                if not (in_window or is_sink):
                    continue
            visible.append(idx)
        blocks.append(QueryBlock(start, end, tuple(visible)))
    return tuple(blocks)


def slot_positions(block: QueryBlock, num_cached: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cache-relative RoPE positions of one query block: (key slots, query slots).

    Key j of ``block.keys`` (visible frames in position order) gets slot j; new frame i of the block
    (key index ``num_cached + i``) gets the slot of its own key, so a query and its own key share a position.
    """
    keys = tuple(range(len(block.keys)))
    query = tuple(block.keys.index(num_cached + i) for i in range(block.start, block.end))
    return keys, query


@dataclass(frozen=True)
class SlotRope:
    """Cache-relative RoPE rotations of one forward, one pair per query block of the attention plan."""

    query: tuple[torch.Tensor, ...]  # per block (Nq_frames*S, d/2) complex
    keys: tuple[torch.Tensor, ...]  # per block (Nk_frames*S, d/2) complex


def slot_rope(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: tuple[QueryBlock, ...],
    num_cached: int,
    grid_hw: tuple[int, int],
) -> SlotRope:
    """Rotations of every plan block with :func:`slot_positions` as temporal positions (h, w as usual)."""
    query, keys = [], []
    for blk in plan:
        k_pos, q_pos = slot_positions(blk, num_cached)
        keys.append(rope_frequencies(tables, k_pos, grid_hw))
        query.append(rope_frequencies(tables, q_pos, grid_hw))
    return SlotRope(tuple(query), tuple(keys))


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


_FLASH_HELP = (
    "install the 'gpu' extra (pip install --no-build-isolation 'astrolabe[gpu]') or set model.attention_backend: "
    "sdpa (or auto)"
)


def resolve_backend(
    requested: Literal["auto", "sdpa", "flash"], device: torch.device | str, dtype: torch.dtype
) -> AttentionBackend:
    """The backend a model on ``device`` with weights of ``dtype`` uses.

    ``auto`` -> ``flash`` iff flash-attn imports, the device is CUDA and the dtype is bf16/fp16 (flash-attn
    has no fp32 kernel), else ``sdpa``. ``flash`` without those conditions is an error saying which is missing.
    """
    on_cuda = torch.device(device).type == "cuda"
    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "sdpa":
        return "sdpa"
    if requested == "auto":
        return "flash" if on_cuda and half and _flash_available() else "sdpa"
    if not _flash_available():
        raise RuntimeError(f"model.attention_backend=flash needs the flash-attn package and a CUDA device; {_FLASH_HELP}")
    if not on_cuda:
        raise RuntimeError(f"model.attention_backend=flash needs model.device=cuda (got {device}); {_FLASH_HELP}")
    if not half:
        raise RuntimeError(f"model.attention_backend=flash needs model.dtype=bfloat16 (flash-attn has no {dtype} kernel)")
    return "flash"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend = "sdpa") -> torch.Tensor:
    """Unmasked multi-head attention, (B, Lq, n, d) x (B, Lk, n, d) -> (B, Lq, n, d), scale 1/sqrt(d)."""
    if backend == "flash":
        if not _flash_available():
            raise RuntimeError(f"attention backend 'flash' needs the flash-attn package and a CUDA device; {_FLASH_HELP}")
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def gather_frames(x: torch.Tensor, frames: tuple[int, ...], tokens_per_frame: int) -> torch.Tensor:
    """Select whole frames from (B, F*S, n, d) -> (B, len(frames)*S, n, d); a slice when contiguous."""
    if frames == tuple(range(frames[0], frames[-1] + 1)):
        return x[:, frames[0] * tokens_per_frame : (frames[-1] + 1) * tokens_per_frame]
    b, _, n, d = x.shape
    idx = torch.as_tensor(frames, device=x.device)
    return x.view(b, -1, tokens_per_frame, n, d).index_select(1, idx).reshape(b, -1, n, d)


def planned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: tuple[QueryBlock, ...],
    tokens_per_frame: int,
    backend: AttentionBackend = "sdpa",
    rope: SlotRope | None = None,
) -> torch.Tensor:
    """Attention of new-frame queries (B, Fn*S, n, d) over key frames (B, Fk*S, n, d) following ``plan``.

    With ``rope`` (cache-relative mode) ``q`` and ``k`` arrive un-rotated and each block's queries and
    gathered keys are rotated with that block's slot positions just before attention.
    """
    if rope is None and len(plan) == 1 and len(plan[0].keys) * tokens_per_frame == k.shape[1]:
        return attention(q, k, v, backend)
    outs = []
    s = tokens_per_frame
    for i, blk in enumerate(plan):
        qb, kb = q[:, blk.start * s : blk.end * s], gather_frames(k, blk.keys, s)
        if rope is not None:
            qb, kb = rope_apply(qb, rope.query[i]), rope_apply(kb, rope.keys[i])
        outs.append(attention(qb, kb, gather_frames(v, blk.keys, s), backend))
    return torch.cat(outs, dim=1)

"""Typed KV cache for streaming block-autoregressive generation (rolling window + attention sink).

Per layer the cache holds self-attention keys (after RoPE, rotated with their absolute frame index;
un-rotated when ``rope="cache_relative"``, the release's inference numerics, see
:mod:`astrolabe.models.wan.attention`) and values of the committed (clean) frames, plus the cross-attention keys/values of the text context.
All layers share one list of absolute frame positions. The cache is always detached: no gradient
flows through history.

Protocol with :class:`astrolabe.models.wan.dit.WanDiT`:
  * a *read* forward attends to the cached frames and its own new frames, and changes nothing;
  * a *write* forward (the t = 0 context pass after a block) stages each layer's new keys/values with
    :meth:`stage`; the model then calls :meth:`commit`, which appends them and evicts frames outside
    the window, keeping the first ``sink_frames`` frames since the last reset.

A :class:`ReadOnlyKVCache` (:meth:`KVCache.read_only`) shares a cache's self-attention tensors without its
text cache: every forward through it recomputes the text keys/values with the running weights, stores
nothing (:attr:`KVCache.keeps_text_kv` is False), and any write (stage, commit, reset) raises.

With ``window_frames = W`` and ``sink_frames = s`` the cache keeps at most ``W`` frames: the sink and
the ``W - s`` most recent frames, which is everything any later block can see (see
:mod:`astrolabe.models.wan.attention`). With global attention (``window_frames=None``) it grows up to
``max_frames`` and then refuses to grow further with an error that says to set a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch

from astrolabe.models.wan.attention import CausalWindow, RopeMode


_C = TypeVar("_C", bound="KVCache")


@dataclass
class LayerKV:
    k: torch.Tensor  # (B, T, n, d) keys of the cached frames (post-RoPE unless cache_relative), T = frames * S
    v: torch.Tensor  # (B, T, n, d)


@dataclass
class KVCache:
    """Self- and cross-attention cache of one batch of streams."""

    num_layers: int
    tokens_per_frame: int
    causal: CausalWindow
    max_frames: int | None = None  # capacity for global attention; None = RoPE limit only
    rope: RopeMode = "absolute"  # how the model rotates keys: absolute (cached post-RoPE) or cache_relative
    positions: list[int] = field(default_factory=list)  # absolute frame positions of cached frames
    origin: int | None = None  # first frame position since the last reset (defines the sink)
    self_kv: list[LayerKV | None] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    _staged: dict[int, LayerKV] = field(default_factory=dict)
    keeps_text_kv: ClassVar[bool] = True  # no-grad forwards store the text keys/values (a read view: False)

    def __post_init__(self) -> None:
        if not self.self_kv:
            self.self_kv = [None] * self.num_layers
        if not self.cross_kv:
            self.cross_kv = [None] * self.num_layers

    # ------------------------------------------------------------------ queries
    @property
    def num_frames(self) -> int:
        return len(self.positions)

    @property
    def capacity_frames(self) -> int | None:
        """Most frames the cache can ever hold: the window, or ``max_frames`` for global attention."""
        return self.causal.window_frames if self.causal.window_frames is not None else self.max_frames

    def layer(self, i: int) -> LayerKV | None:
        return self.self_kv[i]

    def text_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``i``'s cached text (cross-attention) keys/values (B, text_len, n, d), if stored."""
        return self.cross_kv[i]

    def nbytes(self) -> int:
        total = 0
        for kv in self.self_kv:
            if kv is not None:
                total += kv.k.numel() * kv.k.element_size() + kv.v.numel() * kv.v.element_size()
        for ckv in self.cross_kv:
            if ckv is not None:
                total += sum(t.numel() * t.element_size() for t in ckv)
        return total

    def origin_for(self, new_positions: list[int]) -> int:
        """Sink origin a forward with these new frames uses: the cache's, or its first new frame."""
        if self.origin is not None:
            return self.origin
        return min(new_positions)

    # ------------------------------------------------------------------ writes
    def store_text_kv(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep layer ``i``'s text keys/values (B, text_len, n, d), detached, for later forwards."""
        self.cross_kv[i] = (k.detach(), v.detach())

    def stage(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold layer ``i``'s new keys/values (B, N, n, d) until :meth:`commit`."""
        self._staged[i] = LayerKV(k.detach(), v.detach())

    def commit(self, new_positions: list[int]) -> None:
        """Append the staged frames of every layer at ``new_positions`` and evict outside the window."""
        if len(self._staged) != self.num_layers:
            raise RuntimeError(f"commit needs staged keys for all {self.num_layers} layers, got {len(self._staged)}")
        if self.positions and min(new_positions) <= max(self.positions):
            raise ValueError(
                f"cannot append frames {new_positions} after cached frame {max(self.positions)}: positions must "
                "increase; reset the cache before recomputing frames"
            )
        if self.origin is None:
            self.origin = min(new_positions)
        positions = self.positions + list(new_positions)
        keep = self._keep_indices(positions)
        cap = self.capacity_frames
        if cap is not None and len(keep) > cap:
            raise RuntimeError(
                f"global-attention KV cache is full ({cap} frames); set a rolling window "
                "(model.local_attn_frames and model.sink_frames) to generate longer videos"
            )
        s = self.tokens_per_frame
        for i in range(self.num_layers):
            new = self._staged[i]
            old = self.self_kv[i]
            k = new.k if old is None else torch.cat([old.k, new.k], dim=1)
            v = new.v if old is None else torch.cat([old.v, new.v], dim=1)
            if len(keep) != len(positions):
                k, v = _select_frames(k, keep, s), _select_frames(v, keep, s)
            self.self_kv[i] = LayerKV(k, v)
        self.positions = [positions[j] for j in keep]
        self._staged.clear()

    def _keep_indices(self, positions: list[int]) -> list[int]:
        w, sink = self.causal.window_frames, self.causal.sink_frames
        if w is None:
            return list(range(len(positions)))
        end = max(positions) + 1
        origin = self.origin if self.origin is not None else min(positions)
        return [
            j
            for j, p in enumerate(positions)
            if p >= end - (w - sink) or origin <= p < origin + sink
        ]

    def discard_staged(self) -> None:
        self._staged.clear()

    def reset(self) -> None:
        """Drop every cached frame and the text cache (hard cut or new video)."""
        self.clear_frames()
        self.cross_kv = [None] * self.num_layers

    def clear_frames(self) -> None:
        """Drop every cached frame but keep the text cache (Krea's per-block KV recompute)."""
        self.positions = []
        self.origin = None
        self.self_kv = [None] * self.num_layers
        self._staged.clear()

    def reset_cross(self) -> None:
        """Drop the cross-attention (text) cache, e.g. on a prompt switch."""
        self.cross_kv = [None] * self.num_layers

    def fork(self, k: int) -> KVCache:
        """A cache for ``B*k`` streams: stream b's state repeated for candidates b*k .. b*k+k-1."""
        if k < 1:
            raise ValueError(f"fork needs k >= 1, got {k}")

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(k, dim=0)

        return self._with_tensors(
            KVCache,
            self_kv=[None if kv is None else LayerKV(rep(kv.k), rep(kv.v)) for kv in self.self_kv],
            cross_kv=[None if c is None else (rep(c[0]), rep(c[1])) for c in self.cross_kv],
        )

    def read_only(self) -> ReadOnlyKVCache:
        """A read-only view sharing this cache's self-attention tensors (no copy), without the text cache."""
        return self._with_tensors(ReadOnlyKVCache, self_kv=list(self.self_kv), cross_kv=[])

    def _with_tensors(self, cls: type[_C], self_kv: list[LayerKV | None], cross_kv: list) -> _C:
        """A ``cls`` cache with this cache's sizes, positions and origin, holding the given tensors."""
        return cls(
            num_layers=self.num_layers,
            tokens_per_frame=self.tokens_per_frame,
            causal=self.causal,
            max_frames=self.max_frames,
            rope=self.rope,
            positions=list(self.positions),
            origin=self.origin,
            self_kv=self_kv,
            cross_kv=cross_kv,
        )


@dataclass
class ReadOnlyKVCache(KVCache):
    """A read view of a :class:`KVCache`: reads its frames, never writes (see :meth:`KVCache.read_only`).

    The text keys/values are not kept (:attr:`keeps_text_kv` is False): each forward recomputes them with
    the running policy's weights (with gradient for the current policy), so the original cache is
    untouched and gradient-checkpoint recomputation sees the same graph as the forward. Every write raises.
    """

    keeps_text_kv: ClassVar[bool] = False

    def _refuse(self, what: str) -> None:
        raise RuntimeError(f"{what} on a read-only KV cache view; write to the KVCache it was made from")

    def store_text_kv(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._refuse("store_text_kv")

    def stage(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._refuse("stage (cache_write=True)")

    def commit(self, new_positions: list[int]) -> None:
        self._refuse("commit")

    def reset(self) -> None:
        self._refuse("reset")

    def clear_frames(self) -> None:
        self._refuse("clear_frames")

    def reset_cross(self) -> None:
        self._refuse("reset_cross")


def _select_frames(x: torch.Tensor, frames: list[int], tokens_per_frame: int) -> torch.Tensor:
    b, _, n, d = x.shape
    idx = torch.as_tensor(frames, device=x.device)
    return x.view(b, -1, tokens_per_frame, n, d).index_select(1, idx).reshape(b, -1, n, d).contiguous()

"""Wan2.1 3D rotary position embedding (interleaved complex pairs, [temporal | height | width] split).

For head dim d the d/2 complex pairs are split into ``c_t = d/2 - 2*(d//6)`` temporal pairs and
``d//6`` pairs each for height and width (128 -> 22/21/21). Pair m of axis a at integer position
``pos`` is multiplied by ``exp(i * pos * theta_m)`` with ``theta_m = 10000^(-2m / n_a)`` where n_a is
twice the number of pairs of that axis. Tables are float64/complex128, as in Wan, and positions
run 0..max_positions-1 per axis (1024 in Wan: a run is limited to 1024 latent frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_params(max_positions: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex table (max_positions, dim/2): entry [p, m] = exp(i * p * theta^(-2m/dim))."""
    if dim % 2:
        raise ValueError(f"rope dim must be even, got {dim}")
    # explicit CPU device: a model built under ``torch.device("meta")`` (checkpoint loading) still gets real tables
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)  # (dim/2,)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv)  # (P, dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (temporal, height, width); 128 -> (22, 21, 21)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_tables(head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis complex tables, built like Wan's ``rope_params(1024, d - 4*(d//6))`` etc."""
    ct, ch, cw = rope_split(head_dim)
    return (
        rope_params(max_positions, 2 * ct),
        rope_params(max_positions, 2 * ch),
        rope_params(max_positions, 2 * cw),
    )


def rope_frequencies(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    frame_positions: Sequence[int],
    grid_hw: tuple[int, int],
) -> torch.Tensor:
    """Complex rotations for tokens ordered (frame, row, col): (F*Hp*Wp, head_dim/2).

    ``frame_positions`` are absolute latent-frame indices (need not be contiguous).
    """
    t_tab, h_tab, w_tab = tables
    limit = t_tab.shape[0]
    if len(frame_positions) and (max(frame_positions) >= limit or min(frame_positions) < 0):
        raise ValueError(
            f"latent frame position {max(frame_positions)} is outside the RoPE table of {limit} positions "
            f"(Wan's absolute RoPE limits a run to {limit} latent frames, about {4 * limit - 3} pixel frames); "
            "generate a shorter video"
        )
    hp, wp = grid_hw
    if hp > h_tab.shape[0] or wp > w_tab.shape[0]:
        raise ValueError(f"token grid {hp}x{wp} exceeds the RoPE table of {h_tab.shape[0]} positions")
    pos = torch.as_tensor(list(frame_positions), dtype=torch.long)
    f = len(pos)
    ft = t_tab[pos].view(f, 1, 1, -1).expand(f, hp, wp, -1)
    fh = h_tab[:hp].view(1, hp, 1, -1).expand(f, hp, wp, -1)
    fw = w_tab[:wp].view(1, 1, wp, -1).expand(f, hp, wp, -1)
    return torch.cat([ft, fh, fw], dim=-1).reshape(f * hp * wp, -1)


def rope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, n, d) queries/keys by ``freqs`` (L, d/2) complex; computed in float64 like Wan."""
    b, length, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, length, n, d // 2, 2))
    out = torch.view_as_real(xc * freqs.to(x.device).view(1, length, 1, d // 2))
    return out.reshape(b, length, n, d).type_as(x)

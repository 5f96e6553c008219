"""Side-by-side comparison grids: rows of equally sized videos, one labelled column per policy.

Layout (all sizes in pixels, ``R`` rows, ``C`` columns, cells ``h x w``, separator ``s``, header ``L``)::

    y0(r) = (L + s if labelled else 0) + r * (h + s)        x0(c) = c * (w + s)
    H = y0(R - 1) + h                                        W = C * w + (C - 1) * s

The header strip (black, white column labels drawn with ``cv2.putText``) sits on top; separators are
mid-gray lines. A missing cell (``None``) is black. Videos of different lengths are aligned at frame
0; a shorter video holds its last frame. Frames are composed one at a time straight into the mp4
writer, so only the decoded cell videos are held in memory, never a second copy of the whole grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astrolabe.data.video import DEFAULT_FPS, StreamingMp4Writer

SEPARATOR_VALUE = 128  # mid-gray: visible against black (missing) cells and dark videos
Cell = np.ndarray | None  # (F, h, w, 3) uint8 or None = black


@dataclass(frozen=True)
class GridLayout:
    """Geometry of a grid of ``rows x cols`` cells of ``height x width`` pixels."""

    rows: int
    cols: int
    height: int
    width: int
    header: int = 0  # height of the column-label strip; 0 = no labels
    sep: int = 2

    def __post_init__(self) -> None:
        if min(self.rows, self.cols, self.height, self.width) < 1:
            raise ValueError(f"a grid needs >= 1 row, column and pixel, got {self}")
        if self.header < 0 or self.sep < 0:
            raise ValueError(f"header and sep must be >= 0, got {self.header}, {self.sep}")

    @property
    def top(self) -> int:
        """First pixel row of the cells."""
        return self.header + self.sep if self.header else 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the whole grid."""
        return self.origin(self.rows - 1, self.cols - 1)[0] + self.height, self.origin(0, self.cols - 1)[1] + self.width

    def origin(self, r: int, c: int) -> tuple[int, int]:
        """``(y0, x0)`` of the top-left pixel of cell ``(r, c)``."""
        return self.top + r * (self.height + self.sep), c * (self.width + self.sep)


def header_height(cell_height: int) -> int:
    """Label strip height: ``max(12, h // 8)`` rounded up to even (yuv420p needs even sizes)."""
    h = max(12, cell_height // 8)
    return h + h % 2


def _label(strip: np.ndarray, text: str) -> None:
    """Draw ``text`` in white into ``strip`` (L, w, 3) in place, shrunk to fit its width."""
    import cv2

    height, width = strip.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 30.0
    (tw, _), _ = cv2.getTextSize(text, font, scale, 1)
    if tw > width - 4 > 0:
        scale *= (width - 4) / tw
    cv2.putText(strip, text, (2, height - max(2, height // 4)), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def background(layout: GridLayout, labels: Sequence[str] | None = None) -> np.ndarray:
    """The static part of every grid frame ``(H, W, 3)`` uint8: gray separators, black cells, labels."""
    out = np.full((*layout.shape, 3), SEPARATOR_VALUE, np.uint8)
    if layout.header:
        out[: layout.header] = 0
    for r in range(layout.rows):
        for c in range(layout.cols):
            y0, x0 = layout.origin(r, c)
            out[y0 : y0 + layout.height, x0 : x0 + layout.width] = 0
    if labels is not None and layout.header:
        if len(labels) != layout.cols:
            raise ValueError(f"got {len(labels)} column labels for {layout.cols} columns")
        for c, text in enumerate(labels):
            x0 = layout.origin(0, c)[1]
            _label(out[: layout.header, x0 : x0 + layout.width], str(text))
    return out


def compose_frame(layout: GridLayout, base: np.ndarray, cells: Sequence[Sequence[Cell]], t: int) -> np.ndarray:
    """Grid frame ``t`` ``(H, W, 3)``: ``base`` with frame ``min(t, F_cell - 1)`` of every cell pasted in."""
    out = base.copy()
    for r, row in enumerate(cells):
        for c, video in enumerate(row):
            if video is None:
                continue
            y0, x0 = layout.origin(r, c)
            out[y0 : y0 + layout.height, x0 : x0 + layout.width] = video[min(t, video.shape[0] - 1)]
    return out


def layout_for(cells: Sequence[Sequence[Cell]], labels: Sequence[str] | None = None, sep: int = 2) -> GridLayout:
    """Check that ``cells`` is a rectangular grid of uint8 ``(F, h, w, 3)`` videos of one size; its layout."""
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one row and one column")
    cols = len(cells[0])
    if any(len(row) != cols for row in cells):
        raise ValueError(f"every grid row needs {cols} cells, got {[len(row) for row in cells]}")
    present = [v for row in cells for v in row if v is not None]
    if not present:
        raise ValueError("every grid cell is missing; give at least one video")
    h, w = present[0].shape[1:3]
    for v in present:
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[1:] != (h, w, 3) or v.shape[0] < 1:
            raise ValueError(
                f"grid cells must be uint8 (F, {h}, {w}, 3) videos like the first one, got {v.dtype} {v.shape}; "
                "pass a missing or differently sized cell as None"
            )
    return GridLayout(len(cells), cols, h, w, header_height(h) if labels is not None else 0, sep)


def write_grid(
    mp4_path: Path,
    png_path: Path | None,
    cells: Sequence[Sequence[Cell]],
    labels: Sequence[str] | None = None,
    fps: float = DEFAULT_FPS,
    sep: int = 2,
) -> GridLayout:
    """Write the grid video to ``mp4_path`` and its middle frame (index ``F_max // 2``) to ``png_path``.

    ``cells[r][c]`` is a ``(F, h, w, 3)`` uint8 video or None (black). Returns the layout used.
    """
    import cv2

    layout = layout_for(cells, labels, sep)
    base = background(layout, labels)
    n_frames = max(v.shape[0] for row in cells for v in row if v is not None)
    with StreamingMp4Writer(mp4_path, fps=fps) as writer:
        for t in range(n_frames):
            frame = compose_frame(layout, base, cells, t)  # (H, W, 3)
            writer.write(frame)
            if png_path is not None and t == n_frames // 2:
                if not cv2.imwrite(str(png_path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write {png_path}")
    return layout

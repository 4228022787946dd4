"""Pictures from the trajectory: pixels, grids, strips, the triangle, captions, curve plots,
animations.

Everything here works on numpy arrays (an `mx.array` converts with `np.asarray`) and Pillow; the
networks are not needed. Frames are uint8 (H, W, 3); batches are NHWC.

The composites share one layout, so their size in pixels follows from a formula
(`triangle_size`): `pad` pixels around and between the cells, an optional left margin of
`label_width` for row labels, and an optional caption band of `caption_height` under every cell.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import picture_meta
from .errors import OutputError
from .files import atomic_write
from .measures import MEASURE_TITLES

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# Linear latent -> RGB maps for a cheap preview: rgb = latent @ W + b, in [-1, 1], for latents as
# the UNet sees them (already times the VAE's scaling factor). The numbers are the latent-preview
# factors published in ComfyUI (comfyanonymous/ComfyUI, comfy/latent_formats.py: classes SD15 and
# SDXL), fitted there by least squares against the real VAE decoder. SD 2.x uses SD 1.x's VAE.
LATENT_RGB = {
    "sd": (
        np.array([[0.3512, 0.2297, 0.3227],
                  [0.3250, 0.4974, 0.2350],
                  [-0.2829, 0.1762, 0.2721],
                  [-0.2120, -0.2616, -0.7177]], dtype=np.float32),  # (4, 3): rows latent, cols RGB
        np.zeros(3, dtype=np.float32),
    ),
    "sdxl": (
        np.array([[0.3651, 0.4232, 0.4341],
                  [-0.2533, -0.0042, 0.1068],
                  [0.1076, 0.1111, -0.0362],
                  [-0.3165, -0.2492, -0.2188]], dtype=np.float32),
        np.array([0.1084, -0.0175, -0.0011], dtype=np.float32),
    ),
}


# ---------------------------------------------------------------------------------------------
# Pixels


def to_uint8(images) -> np.ndarray:
    """Float pictures in [0, 1] (any shape, e.g. NHWC) -> uint8, clipped and rounded to nearest."""
    x = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8)


def approx_decode(latents, family, factor: int = 8) -> np.ndarray:
    """A cheap preview of latents (B, h, w, 4) -> RGB (B, h * factor, w * factor, 3) in [0, 1].

    One linear map per pixel, then nearest-neighbour upsampling by `factor` (the VAE's downscale,
    8 for every SD family). `family` is "sd" (SD 1.x and 2.x) or "sdxl" (see LATENT_RGB), or a
    map of its own, (weight (C, 3), bias (3,)), as `fit_latent_rgb` gives for another VAE.
    """
    if isinstance(family, tuple):
        weight, bias = family
    elif family in LATENT_RGB:
        weight, bias = LATENT_RGB[family]
    else:
        raise ValueError(f"no latent preview for family {family!r}; known: {sorted(LATENT_RGB)}")
    z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 4 or z.shape[-1] != weight.shape[0]:
        raise ValueError(f"approx_decode needs latents (B, h, w, {weight.shape[0]}), got {z.shape}")
    rgb = z @ weight + bias  # (B, h, w, 3), about [-1, 1]
    rgb = np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)
    return rgb.repeat(factor, axis=1).repeat(factor, axis=2)  # (B, h * f, w * f, 3)


def colour_patches(side: int = 128, cell: int = 32, seed: int = 0) -> np.ndarray:
    """A picture (1, side, side, 3) in [0, 1] of `cell`-pixel squares of colours drawn evenly from
    the colour cube: what a VAE's latent -> RGB map is fitted on."""
    n = side // cell
    colours = np.random.default_rng(seed).random((n, n, 3), dtype=np.float32)
    return colours.repeat(cell, axis=0).repeat(cell, axis=1)[None]


def fit_latent_rgb(latents, pictures, factor: int) -> tuple:
    """The least-squares map (weight (C, 3), bias (3,)) from latents (B, h, w, C) to the mean colour,
    in [-1, 1], of each latent's `factor` x `factor` block of `pictures` (B, h * f, w * f, 3) in [0, 1]."""
    z = np.asarray(latents, dtype=np.float64)
    b, h, w, c = z.shape
    target = np.asarray(pictures, dtype=np.float64).reshape(b, h, factor, w, factor, 3).mean(axis=(2, 4))
    design = np.concatenate([z.reshape(-1, c), np.ones((b * h * w, 1))], axis=1)
    solution = np.linalg.lstsq(design, target.reshape(-1, 3) * 2.0 - 1.0, rcond=None)[0]
    return solution[:c].astype(np.float32), solution[c].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Text


FONT_SIZE = 10  # Pillow's default size
MIN_FONT_SIZE = 7  # a label shrinks down to this size before a word is broken between letters
TEXT_PAD = 2  # pixels between a label and the edges of its band
GAP = "  "  # between words: the default font's space is 2 px wide, and "PSNR 9.7" read as one word


@functools.lru_cache(maxsize=8)
def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in font: no font files to find on the user's machine. Pillow built without
    # FreeType has only a bitmap font of one size: labels then wrap and break, never shrink.
    return ImageFont.load_default() if size == FONT_SIZE else ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=8)
def line_height(size: int = FONT_SIZE) -> int:
    return int(_font(size).getbbox("Ag|y")[3])


def text_width(text: str, size: int = FONT_SIZE) -> int:
    """The width in pixels of one line of `text` as the labels draw it."""
    return int(math.ceil(_font(size).getlength(text)))


@dataclass(frozen=True)
class Fitted:
    """A label laid out for a width: its lines and its font size; `height` in pixels."""

    lines: tuple
    size: int

    @property
    def height(self) -> int:
        return len(self.lines) * line_height(self.size)

    @property
    def width(self) -> int:
        return max((text_width(line, self.size) for line in self.lines), default=0)


def _wrapped(words: list, room: int, size: int) -> list:
    lines: list = []
    for word in words:
        if lines and text_width(lines[-1] + GAP + word, size) <= room:
            lines[-1] += GAP + word
        else:
            lines.append(word)
    return lines


def _broken(word: str, room: int, size: int) -> list:
    """A word too wide for `room` even at the smallest size, in pieces that fit (one letter at least)."""
    pieces = [""]
    for char in word:
        if pieces[-1] and text_width(pieces[-1] + char, size) > room:
            pieces.append("")
        pieces[-1] += char
    return pieces


def fit_text(text: str, width: int, height: int | None = None) -> Fitted:
    """`text` laid out in a band `width` pixels wide (and at most `height` high, if given), never
    cut: wrapped between words at the default size; where a word is wider than the band, or the
    lines higher than `height`, a smaller size, down to MIN_FONT_SIZE; a word still too wide is
    broken between letters. A `height` too small even then is the caller's: the last size is kept.
    """
    room = max(1, width - 2 * TEXT_PAD)
    words = text.split() or [""]
    lines: list = []
    for size in range(FONT_SIZE, MIN_FONT_SIZE - 1, -1):
        if all(text_width(w, size) <= room for w in words):
            lines = _wrapped(words, room, size)
            if height is None or len(lines) * line_height(size) <= height:
                return Fitted(tuple(lines), size)
    size = MIN_FONT_SIZE
    pieces = [piece for w in words for piece in
              (_broken(w, room, size) if text_width(w, size) > room else [w])]
    return Fitted(tuple(_wrapped(pieces, room, size)), size)


def band_height(texts, width: int) -> int:
    """The height of a caption band that holds each of `texts` fitted to `width`, with a little air."""
    return max((fit_text(t, width).height for t in texts), default=0) + 4


def label_margins() -> tuple[int, int]:
    """Default (label_width, caption_height) for row labels and cell captions in Pillow's default
    font: a label width that fits `s=0.00`, a caption band one line high with a little air."""
    return text_width("s=0.00") + 6, line_height() + 4


def _text_band(text: str, height: int, width: int, fg=BLACK, bg=WHITE) -> np.ndarray:
    """(height, width, 3) uint8: `text` fitted to the band (`fit_text`), left-aligned, centred
    vertically."""
    band = Image.new("RGB", (width, height), bg)
    fitted = fit_text(text, width, height)
    draw, step = ImageDraw.Draw(band), line_height(fitted.size)
    top = (height - fitted.height) // 2
    for i, line in enumerate(fitted.lines):
        draw.text((TEXT_PAD, top + i * step), line, fill=fg, font=_font(fitted.size))
    return np.asarray(band)


def label(image: np.ndarray, text: str, caption_height: int | None = None,
          fg=BLACK, bg=WHITE) -> np.ndarray:
    """A frame with a caption band under it: (H, W, 3) -> (H + caption_height, W, 3); the band is as
    high as the text fitted to the width needs, unless given."""
    image = _frame(image, "label")
    caption_height = band_height([text], image.shape[1]) if caption_height is None else caption_height
    band = _text_band(text, caption_height, image.shape[1], fg, bg)
    return np.concatenate([image, band], axis=0)


def titled(image: np.ndarray, text: str, bg=WHITE) -> np.ndarray:
    """A picture with `text` in a band above it, fitted to its width."""
    image = _frame(image, "titled")
    band = _text_band(text, band_height([text], image.shape[1]), image.shape[1], bg=bg)
    return np.concatenate([band, image], axis=0)


def marked_parts(image: np.ndarray, marks: Sequence[str], bg=WHITE, also: Sequence[str] = ()) -> np.ndarray:
    """A picture of len(marks) equal parts side by side, each part's mark in a band under it, as
    tall as `also`'s would need too (the frames of one animation keep one size)."""
    image = _frame(image, "marked_parts")
    h, w = image.shape[:2]
    part = w // len(marks)
    if part * len(marks) != w:
        raise ValueError(f"a picture {w} pixels wide is not {len(marks)} equal parts")
    height = band_height([*marks, *also], part)
    band = np.concatenate([_text_band(m, height, part, bg=bg) for m in marks], axis=1)
    return np.concatenate([image, band], axis=0)


# ---------------------------------------------------------------------------------------------
# Composites


def _frame(image, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} needs uint8 frames (H, W, 3), got {image.dtype} {image.shape}")
    return image


def triangle_size(n_rows: int, n_cols: int, cell_h: int, cell_w: int, pad: int = 0,
                  label_width: int = 0, caption_height: int = 0, header_height: int = 0) -> tuple[int, int]:
    """(H, W) in pixels of a composite with n_rows x n_cols cells (the triangle, grids, strips),
    under a band of column headers `header_height` high."""
    height = header_height + pad + n_rows * (cell_h + caption_height + pad)
    width = label_width + pad + n_cols * (cell_w + pad)
    return height, width


def _compose(table: list[list[np.ndarray]], cell_h: int, cell_w: int, pad: int, background,
             row_labels: Sequence[str] | None = None,
             captions: Sequence[Sequence[str]] | None = None,
             label_width: int = 0, caption_height: int = 0,
             headers: Sequence[str] | None = None, header_height: int = 0) -> np.ndarray:
    """Place rows of frames (left-aligned, rows may differ in length) on a background; a None
    frame leaves its cell (and caption) background. `headers` (one per column) go in a band above."""
    n_cols = max((len(row) for row in table), default=0)
    if n_cols == 0:
        raise ValueError("nothing to draw: every row is empty")
    height, width = triangle_size(len(table), n_cols, cell_h, cell_w, pad, label_width,
                                  caption_height, header_height)
    canvas = np.empty((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    canvas[...] = np.asarray(background, dtype=np.uint8)
    if headers is not None and header_height > 0:
        for c, text in enumerate(headers):
            x = label_width + pad + c * (cell_w + pad)
            canvas[:header_height, x:x + cell_w] = _text_band(text, header_height, cell_w, bg=background)
    for r, row in enumerate(table):
        y = header_height + pad + r * (cell_h + caption_height + pad)
        if row_labels is not None and label_width > 0:
            canvas[y:y + cell_h, :label_width] = _text_band(row_labels[r], cell_h, label_width,
                                                            bg=background)
        for c, frame in enumerate(row):
            if frame is None:  # an empty cell (the time-aligned triangle)
                continue
            frame = _frame(frame, "a composite")
            if frame.shape[:2] != (cell_h, cell_w):
                raise ValueError(f"frame {r},{c} is {frame.shape[:2]}, the cells are {(cell_h, cell_w)}")
            x = label_width + pad + c * (cell_w + pad)
            canvas[y:y + cell_h, x:x + cell_w] = frame
            if captions is not None and caption_height > 0:
                canvas[y + cell_h:y + cell_h + caption_height, x:x + cell_w] = _text_band(
                    captions[r][c], caption_height, cell_w, bg=background)
    return canvas


def _label_width(row_labels: Sequence[str]) -> int:
    """A left margin that holds every row label on one line: at least `label_margins()`'s."""
    return max([label_margins()[0]] + [text_width(t) + 2 * TEXT_PAD + 2 for t in row_labels])


def _caption_height(captions, cell_w: int) -> int:
    """A caption band that holds every caption (None: an empty cell) fitted to the cell's width."""
    return band_height([t for row in captions for t in row if t is not None], cell_w)


def grid(images, n_rows: int, pad: int = 0, background=WHITE) -> np.ndarray:
    """N frames (N, H, W, 3) -> one picture of n_rows rows, filled row-major; cells left over in
    the last row are background."""
    frames = [_frame(im, "grid") for im in images]
    if not 1 <= n_rows <= len(frames):
        raise ValueError(f"grid of {len(frames)} frames cannot have {n_rows} rows")
    n_cols = math.ceil(len(frames) / n_rows)
    table = [frames[i:i + n_cols] for i in range(0, len(frames), n_cols)]
    table += [[] for _ in range(n_rows - len(table))]
    h, w = frames[0].shape[:2]
    return _compose(table, h, w, pad, background)


def strip(frames, labels: Sequence[str] | None = None, pad: int = 0, background=WHITE,
          caption_height: int | None = None, title: str | None = None) -> np.ndarray:
    """Frames left to right, each optionally captioned underneath (the band as high as the longest
    caption needs), under an optional `title`."""
    frames = [_frame(f, "strip") for f in frames]
    if not frames:
        raise ValueError("strip needs at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"strip has {len(frames)} frames but {len(labels)} labels")
    h, w = frames[0].shape[:2]
    if labels is None:
        caption_height = 0
    elif caption_height is None:
        caption_height = _caption_height([labels], w)
    picture = _compose([frames], h, w, pad, background,
                       captions=None if labels is None else [list(labels)],
                       caption_height=caption_height)
    return picture if title is None else titled(picture, title, bg=background)


def contact_sheet(table: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str] | None = None,
                  captions: Sequence[Sequence[str]] | None = None, pad: int = 2,
                  background=WHITE) -> np.ndarray:
    """A table of equal frames (None: an empty cell), rows labelled on the left and every cell
    captioned underneath, margins sized to the text (a sweep's sheet of final pictures)."""
    first = next((f for row in table for f in row if f is not None), None)
    if first is None:
        raise ValueError("a contact sheet needs at least one frame")
    cell_h, cell_w = _frame(first, "a contact sheet").shape[:2]
    label_width = max(map(text_width, row_labels), default=0) + 6 if row_labels else 0
    caption_height = _caption_height(captions, cell_w) if captions is not None else 0
    return _compose([list(row) for row in table], cell_h, cell_w, pad, background, row_labels,
                    captions, label_width, caption_height)


def triangle_columns(times: Sequence[Sequence[float]], tolerance: float = 1e-3
                     ) -> tuple[list[float], list[list[int]]]:
    """The columns of the time-aligned triangle: (column times, highest first; each cell's column).

    `times` has the shape of the triangle's rows: the t of every cell, decreasing along a row.
    Each distinct noise level is a column; times closer than `tolerance` (in timesteps, far below
    any step of a real schedule) are one level, so that float rounding (299.99999 and 300) cannot
    split a column. A column's time is the highest of its cells'.
    """
    rows = [[float(t) for t in row] for row in times]
    for r, row in enumerate(rows):
        if any(b >= a for a, b in zip(row, row[1:])):
            raise ValueError(f"triangle row {r} times must decrease along the row, got {row}")
    columns: list[float] = []
    for t in sorted((t for row in rows for t in row), reverse=True):
        if not columns or t < columns[-1] - tolerance:
            columns.append(t)
    bounds = np.array(columns)  # decreasing
    where = [[int(np.argmax(bounds - tolerance <= t)) for t in row] for row in rows]
    for r, cols in enumerate(where):
        if len(set(cols)) != len(cols):
            raise ValueError(f"triangle row {r} has two cells within {tolerance:g} of one time; "
                             f"its times are {rows[r]}")
    return columns, where


def triangle(rows: Sequence[Sequence[np.ndarray]], cell_h: int, cell_w: int,
             order: str = "low_bottom", row_labels: Sequence[str] | None = None,
             cell_labels: Sequence[Sequence[str]] | None = None, pad: int = 2,
             background=WHITE, label_width: int | None = None,
             caption_height: int | None = None, align: str = "steps",
             times: Sequence[Sequence[float]] | None = None,
             column_labels: Sequence[str] | None = None) -> np.ndarray:
    """The strength triangle: one row of frames per strength, rows given in increasing strength.

    `align="steps"` (default): rows are left-aligned and may differ in length; cells beyond a
    row's end are background. `align="time"`: every cell goes to the column of its time t, given
    in `times` (the shape of `rows`); the columns are the distinct noise levels, highest on the
    left (`triangle_columns`), so a column holds one noise level for every strength, the start
    points lie on the diagonal and the final pictures (t = 0) in the last column.
    `order="low_bottom"` (default) puts the lowest strength at the bottom, so the first column read
    upward is the descent into noise; `"low_top"` flips it. `row_labels` (one per row) go in a left
    margin, `cell_labels` (same shape as `rows`) in a band under each cell, `column_labels` (one
    per column) in a band above the first row. Every label fits its place (`fit_text`): by default
    the margin is as wide as the widest row label and the bands as high as the longest caption and
    header need. The size is `triangle_size(len(rows), number of columns, cell_h, cell_w, pad,
    label_width, caption_height, header_height)`, with the margins 0 where the labels are off.
    """
    if order not in ("low_bottom", "low_top"):
        raise ValueError(f"triangle order must be 'low_bottom' or 'low_top', not {order!r}")
    if align not in ("steps", "time"):
        raise ValueError(f"triangle align must be 'steps' or 'time', not {align!r}")
    rows = [list(row) for row in rows]
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"triangle has {len(rows)} rows but {len(row_labels)} row labels")
    if cell_labels is not None and [len(r) for r in cell_labels] != [len(r) for r in rows]:
        raise ValueError("triangle cell_labels must have the shape of rows")
    if times is not None and [len(r) for r in times] != [len(r) for r in rows]:
        raise ValueError("triangle times must have the shape of rows")
    if align == "time":
        if times is None:
            raise ValueError("the time-aligned triangle needs the time of every cell (times=)")
        columns, where = triangle_columns(times)

        def spread(seq):
            placed = [[None] * len(columns) for _ in seq]
            for r, (row, cols) in enumerate(zip(seq, where)):
                for item, c in zip(row, cols):
                    placed[r][c] = item
            return placed

        rows = spread(rows)
        cell_labels = None if cell_labels is None else spread(cell_labels)
    n_cols = max((len(row) for row in rows), default=0)
    if column_labels is not None and len(column_labels) != n_cols:
        raise ValueError(f"triangle has {n_cols} columns but {len(column_labels)} column labels")
    if row_labels is None:
        label_width = 0
    elif label_width is None:
        label_width = _label_width(row_labels)
    if cell_labels is None:
        caption_height = 0
    elif caption_height is None:
        caption_height = _caption_height(cell_labels, cell_w)
    header_height = 0 if column_labels is None else _caption_height([column_labels], cell_w)

    def visual(seq):
        return None if seq is None else (list(seq)[::-1] if order == "low_bottom" else list(seq))

    return _compose(visual(rows), cell_h, cell_w, pad, background, row_labels=visual(row_labels),
                    captions=visual(cell_labels), label_width=label_width,
                    caption_height=caption_height, headers=column_labels, header_height=header_height)


# ---------------------------------------------------------------------------------------------
# Curves

# Tableau's ten categorical colours (matplotlib's default cycle): told apart at a glance.
CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GRID = (225, 225, 225)
_SUPERSAMPLE = 2  # drawn at twice the size, then shrunk: smooth lines without antialiased drawing


@functools.lru_cache(maxsize=4)
def _plot_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], int]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) inside [lo, hi], and the
    decimals that print them exactly."""
    raw = (hi - lo) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    decimals = next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)
    return ticks, decimals


def _tick_text(value: float, decimals: int, scale: float) -> str:
    if scale >= 1e5 or scale < 1e-3:
        text = f"{value:.3g}"
    else:
        text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0.0 else text


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        half = abs(lo) * 0.1 if lo != 0 else 1.0
        return lo - half, hi + half
    margin = 0.05 * (hi - lo)
    return lo - margin, hi + margin


def curve_plot(curves, measures: Sequence[str], marked=None, best=None,
               size: tuple[int, int] | None = None, x: str = "step",
               title: str | None = None, titles=None) -> np.ndarray:
    """Per-step measures drawn as curves: uint8 (H, W, 3), `size` = (H, W).

    curves: {label: [record, ...]}, records as `measures.Curve` makes them (dicts with "step",
      "t" and the measures; None where a step has no value). One curve per label (e.g. one per
      triangle row), in the legend's order.
    measures: record keys, one panel each, stacked, each with its own y axis in the measure's
      units; `titles` ({key: words}, default `measures.MEASURE_TITLES`) names the panels.
    marked: {label: step indices} drawn as dots (the kept frames); best: {label: step index}
      drawn as a ring.
    x: "step" (step index, increasing) or "t" (the noise level, high on the left, so that
      curves of different strengths line up and every one ends at t = 0 on the right); on t, a
      measure of the denoised estimate (`x0_...`) is placed where the estimate was made (`x0_t`).
    Points without a value are left out and the line joins the neighbours that have one.
    """
    if x not in ("step", "t"):
        raise ValueError(f"curve_plot x must be 'step' or 't', not {x!r}")
    curves = {str(k): sorted(v, key=lambda r: r["step"]) for k, v in curves.items()}
    if not curves or not any(curves.values()):
        raise ValueError("curve_plot needs at least one curve with records")
    measures = list(measures)
    if not measures:
        raise ValueError("curve_plot needs at least one measure")
    known = {key for records in curves.values() for r in records for key in r}
    unknown = [m for m in measures if m not in known]
    if unknown:
        raise ValueError(f"curve_plot: no record has the measure {unknown[0]!r}; the records have "
                         f"{sorted(known)}")
    titles = MEASURE_TITLES if titles is None else titles
    marked = {} if marked is None else {str(k): set(v) for k, v in marked.items()}
    best = {} if best is None else {str(k): v for k, v in best.items()}
    n = len(measures)
    height, width = (60 + 190 * n, 900) if size is None else size

    u = _SUPERSAMPLE
    font = _plot_font(12 * u)
    line_h = int(font.getbbox("Ag|y")[3])
    canvas = Image.new("RGB", (width * u, height * u), WHITE)
    draw = ImageDraw.Draw(canvas)

    def text_width(text):
        return int(math.ceil(font.getlength(text)))

    # Every panel's y ticks first: the widest label sets the left margin.
    panels = []
    for m in measures:
        values = [r[m] for records in curves.values() for r in records if r.get(m) is not None]
        if values:
            lo, hi = _padded_range(values)
            ticks, decimals = _nice_ticks(lo, hi)
            scale = max(abs(lo), abs(hi))
            labels = [_tick_text(v, decimals, scale) for v in ticks]
        else:
            lo, hi, ticks, labels = 0.0, 1.0, [], []
        panels.append((m, lo, hi, ticks, labels, bool(values)))
    def x_of(r, m=None):
        if x == "t" and m is not None and m.startswith("x0_") and r.get("x0_t") is not None:
            return float(r["x0_t"])
        return float(r[x])

    xs = [x_of(r) for records in curves.values() for r in records]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_ticks, x_decimals = _nice_ticks(x_lo, x_hi, 8)
    if x == "step":
        x_ticks = [v for v in x_ticks if v == int(v)]

    entries = [(label, CURVE_COLOURS[i % len(CURVE_COLOURS)]) for i, label in enumerate(curves)]
    legend_w = max([text_width(label) for label in curves] + [text_width("kept frame")]) + 40 * u
    left = max([text_width(t) for p in panels for t in p[4]] + [text_width("0")]) + 14 * u
    top = 6 * u + (line_h + 10 * u if title else 0)
    title_h, tick_h, gap, bottom = line_h + 8 * u, line_h + 8 * u, 8 * u, line_h + 10 * u
    box_w = width * u - left - legend_w - 10 * u
    box_h = (height * u - top - bottom - n * (title_h + tick_h + gap)) // n
    if box_h < 40 * u or box_w < 120 * u:
        need_h = (top + bottom + n * (title_h + tick_h + gap + 40 * u)) // u + 1
        raise ValueError(f"a curve plot of {n} panels needs at least {need_h} x "
                         f"{(left + legend_w + 130 * u) // u + 1} pixels (H x W), got {height} x {width}")

    def to_px(value, lo, hi, start, length, reverse=False):
        f = (value - lo) / (hi - lo)
        return start + (1.0 - f if reverse else f) * length

    if title:
        draw.text((left, 6 * u), title, fill=BLACK, font=font)
    for i, (m, lo, hi, ticks, labels, has_data) in enumerate(panels):
        y0 = top + i * (title_h + box_h + tick_h + gap)
        by = y0 + title_h  # top of the plot box
        draw.text((left, y0 + 2 * u), titles.get(m, m), fill=BLACK, font=font)
        for v, text in zip(ticks, labels):
            py = to_px(v, lo, hi, by, box_h, reverse=True)
            draw.line([(left, py), (left + box_w, py)], fill=GRID, width=u)
            draw.text((left - 6 * u - text_width(text), py - line_h / 2), text, fill=BLACK, font=font)
        for v in x_ticks:
            px = to_px(v, x_lo, x_hi, left, box_w, reverse=(x == "t"))
            draw.line([(px, by), (px, by + box_h)], fill=GRID, width=u)
            draw.line([(px, by + box_h), (px, by + box_h + 4 * u)], fill=BLACK, width=u)
            text = _tick_text(v, x_decimals, max(abs(x_lo), abs(x_hi)))
            draw.text((px - text_width(text) / 2, by + box_h + 5 * u), text, fill=BLACK, font=font)
        draw.rectangle([left, by, left + box_w, by + box_h], outline=BLACK, width=u)
        if not has_data:
            draw.text((left + box_w / 2 - text_width("no data") / 2, by + box_h / 2 - line_h / 2),
                      "no data", fill=(120, 120, 120), font=font)
            continue
        for label, colour in entries:
            points = [(to_px(x_of(r, m), x_lo, x_hi, left, box_w, reverse=(x == "t")),
                       to_px(r[m], lo, hi, by, box_h, reverse=True), r["step"])
                      for r in curves[label] if r.get(m) is not None]
            if len(points) > 1:
                draw.line([(px, py) for px, py, _ in points], fill=colour, width=2 * u, joint="curve")
            for px, py, step in points:
                radius = 4 * u if step in marked.get(label, ()) else (2 * u if len(points) == 1 else 0)
                if radius:
                    draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour,
                                 outline=BLACK, width=max(1, u // 2))
                if step == best.get(label):
                    draw.ellipse([px - 8 * u, py - 8 * u, px + 8 * u, py + 8 * u], outline=BLACK,
                                 width=2 * u)

    axis = "step" if x == "step" else "t (noise level; the run goes left to right)"
    last_box_bottom = top + n * (title_h + box_h + tick_h + gap) - gap
    draw.text((left + box_w / 2 - text_width(axis) / 2, last_box_bottom + 2 * u), axis, fill=BLACK,
              font=font)

    # The legend, right of the panels: one line per curve, then the marker kinds in use.
    lx, ly = left + box_w + 14 * u, top + title_h
    for label, colour in entries:
        draw.line([(lx, ly + line_h / 2), (lx + 22 * u, ly + line_h / 2)], fill=colour, width=2 * u)
        draw.text((lx + 28 * u, ly), label, fill=BLACK, font=font)
        ly += line_h + 6 * u
    ly += 6 * u
    if any(marked.values()):
        draw.ellipse([lx + 7 * u, ly + line_h / 2 - 4 * u, lx + 15 * u, ly + line_h / 2 + 4 * u],
                     fill=(90, 90, 90), outline=BLACK, width=max(1, u // 2))
        draw.text((lx + 28 * u, ly), "kept frame", fill=BLACK, font=font)
        ly += line_h + 6 * u
    if best:
        draw.ellipse([lx + 3 * u, ly + line_h / 2 - 8 * u, lx + 19 * u, ly + line_h / 2 + 8 * u],
                     outline=BLACK, width=2 * u)
        draw.text((lx + 28 * u, ly), "best", fill=BLACK, font=font)

    return np.asarray(canvas.resize((width, height), Image.LANCZOS))


# ---------------------------------------------------------------------------------------------
# Files

OUTPUT_FORMATS = ("png", "webp", "jpeg")
SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}


def save_picture(path: str | os.PathLike, image: np.ndarray, output_format: str = "png",
                 parameters: str | None = None, record: Mapping[str, Any] | None = None,
                 quality: int = 95) -> Path:
    """Write a uint8 frame (H, W, 3) as PNG, WebP or JPEG with its metadata, atomically.

    PNG: text chunks (`picture_meta.save_png`). WebP and JPEG: `parameters` in the EXIF UserComment, as
    A1111 writes it and the readers look for it, and the JSON record in an XMP packet. WebP is
    lossy at `quality` (100 = lossless); JPEG at `quality`. The bytes depend only on the input.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    if output_format == "png":
        return picture_meta.save_png(path, image, picture_meta.png_text_chunks(parameters, record))
    picture = Image.fromarray(_frame(image, "save_picture"))
    options: dict[str, Any] = {"quality": quality}
    if output_format == "webp" and quality >= 100:
        options = {"lossless": True}
    blocks = picture_meta.metadata_blocks(parameters, record)
    size = max(map(len, blocks.values()), default=0)
    if output_format == "jpeg" and size > picture_meta.JPEG_BLOCK_BYTES:  # Pillow's "XMP data is too long" said not why
        raise OutputError(f"the metadata of {Path(path).name} takes {size} bytes, more than the "
                          f"{picture_meta.JPEG_BLOCK_BYTES} a JPEG holds in one block: write png or webp, or "
                          "shorter prompts")
    return atomic_write(path, lambda f: picture.save(f, format=output_format.upper(), **options, **blocks))


# ---------------------------------------------------------------------------------------------
# Animation


def save_animation(path: str | os.PathLike, frames, duration_ms: int | Sequence[int],
                   fmt: str = "gif", lossless: bool = False, quality: int = 90,
                   parameters: str | None = None, record: Mapping[str, Any] | None = None) -> Path:
    """Write frames (N, H, W, 3) uint8 as an animated GIF or WebP that loops forever, atomically.

    `duration_ms` is per frame (one number or one per frame); GIF stores hundredths of a second.
    GIF encoders, Pillow's included, merge consecutive identical frames into one longer frame.
    Metadata: WebP as `save_picture` (EXIF UserComment, XMP); a GIF carries `parameters` as its
    comment and has no place readers know for the record.
    """
    fmt = fmt.lower()
    if fmt not in ("gif", "webp"):
        raise ValueError(f"animation format must be 'gif' or 'webp', not {fmt!r}")
    arrays = [_frame(f, "save_animation") for f in frames]
    if not arrays:
        raise ValueError("an animation needs at least one frame")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("animation frames must all have the same size")
    pictures = [Image.fromarray(a) for a in arrays]
    duration = duration_ms if isinstance(duration_ms, int) else list(duration_ms)
    options = {"save_all": True, "append_images": pictures[1:], "duration": duration, "loop": 0}
    if fmt == "webp":
        options.update(lossless=lossless, quality=quality, **picture_meta.metadata_blocks(parameters, record))
    elif parameters is not None:
        options["comment"] = parameters.encode("utf-8")
    return atomic_write(path, lambda f: pictures[0].save(f, format=fmt.upper(), **options))

"""Pictures from the trajectory: pixels, grids, strips, the triangle, captions, animations.

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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import metadata
from .metadata import atomic_write

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


def approx_decode(latents, family: str, factor: int = 8) -> np.ndarray:
    """A cheap preview of latents (B, h, w, 4) -> RGB (B, h * factor, w * factor, 3) in [0, 1].

    One linear map per pixel (see LATENT_RGB), then nearest-neighbour upsampling by `factor`
    (the VAE's downscale, 8 for every SD family). `family` is "sd" (SD 1.x and 2.x) or "sdxl".
    """
    if family not in LATENT_RGB:
        raise ValueError(f"no latent preview for family {family!r}; known: {sorted(LATENT_RGB)}")
    weight, bias = LATENT_RGB[family]
    z = np.asarray(latents, dtype=np.float32)
    if z.ndim != 4 or z.shape[-1] != weight.shape[0]:
        raise ValueError(f"approx_decode needs latents (B, h, w, {weight.shape[0]}), got {z.shape}")
    rgb = z @ weight + bias  # (B, h, w, 3), about [-1, 1]
    rgb = np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)
    return rgb.repeat(factor, axis=1).repeat(factor, axis=2)  # (B, h * f, w * f, 3)


# ---------------------------------------------------------------------------------------------
# Text


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in font: no font files to find on the user's machine.
    return ImageFont.load_default()


@functools.lru_cache(maxsize=1)
def _line_height() -> int:
    return int(_font().getbbox("Ag|y")[3])


def _text_width(text: str) -> int:
    return int(math.ceil(_font().getlength(text)))


def label_margins() -> tuple[int, int]:
    """Default (label_width, caption_height) for row labels and cell captions in Pillow's default
    font: a label width that fits `s=0.00`, a caption band one line high with a little air."""
    return _text_width("s=0.00") + 6, _line_height() + 4


def _text_band(text: str, height: int, width: int, fg=BLACK, bg=WHITE) -> np.ndarray:
    """(height, width, 3) uint8: one line of text, left-aligned, centred vertically. Text that does
    not fit is clipped by the band's edges, so it never reaches a neighbouring cell."""
    band = Image.new("RGB", (width, height), bg)
    top = (height - _line_height()) // 2
    ImageDraw.Draw(band).text((2, top), text.replace("\n", " "), fill=fg, font=_font())
    return np.asarray(band)


def label(image: np.ndarray, text: str, caption_height: int | None = None,
          fg=BLACK, bg=WHITE) -> np.ndarray:
    """A frame with a caption band under it: (H, W, 3) -> (H + caption_height, W, 3)."""
    image = _frame(image, "label")
    caption_height = label_margins()[1] if caption_height is None else caption_height
    band = _text_band(text, caption_height, image.shape[1], fg, bg)
    return np.concatenate([image, band], axis=0)


# ---------------------------------------------------------------------------------------------
# Composites


def _frame(image, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} needs uint8 frames (H, W, 3), got {image.dtype} {image.shape}")
    return image


def triangle_size(n_rows: int, n_cols: int, cell_h: int, cell_w: int, pad: int = 0,
                  label_width: int = 0, caption_height: int = 0) -> tuple[int, int]:
    """(H, W) in pixels of a composite with n_rows x n_cols cells (the triangle, grids, strips)."""
    height = pad + n_rows * (cell_h + caption_height + pad)
    width = label_width + pad + n_cols * (cell_w + pad)
    return height, width


def _compose(table: list[list[np.ndarray]], cell_h: int, cell_w: int, pad: int, background,
             row_labels: Sequence[str] | None = None,
             captions: Sequence[Sequence[str]] | None = None,
             label_width: int = 0, caption_height: int = 0) -> np.ndarray:
    """Place rows of frames (left-aligned, rows may differ in length) on a background."""
    n_cols = max((len(row) for row in table), default=0)
    if n_cols == 0:
        raise ValueError("nothing to draw: every row is empty")
    height, width = triangle_size(len(table), n_cols, cell_h, cell_w, pad, label_width,
                                  caption_height)
    canvas = np.empty((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    canvas[...] = np.asarray(background, dtype=np.uint8)
    for r, row in enumerate(table):
        y = pad + r * (cell_h + caption_height + pad)
        if row_labels is not None and label_width > 0:
            canvas[y:y + cell_h, :label_width] = _text_band(row_labels[r], cell_h, label_width,
                                                            bg=background)
        for c, frame in enumerate(row):
            frame = _frame(frame, "a composite")
            if frame.shape[:2] != (cell_h, cell_w):
                raise ValueError(f"frame {r},{c} is {frame.shape[:2]}, the cells are {(cell_h, cell_w)}")
            x = label_width + pad + c * (cell_w + pad)
            canvas[y:y + cell_h, x:x + cell_w] = frame
            if captions is not None and caption_height > 0:
                canvas[y + cell_h:y + cell_h + caption_height, x:x + cell_w] = _text_band(
                    captions[r][c], caption_height, cell_w, bg=background)
    return canvas


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
          caption_height: int | None = None) -> np.ndarray:
    """Frames left to right, each optionally captioned underneath."""
    frames = [_frame(f, "strip") for f in frames]
    if not frames:
        raise ValueError("strip needs at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"strip has {len(frames)} frames but {len(labels)} labels")
    if labels is None:
        caption_height = 0
    elif caption_height is None:
        caption_height = label_margins()[1]
    h, w = frames[0].shape[:2]
    return _compose([frames], h, w, pad, background,
                    captions=None if labels is None else [list(labels)],
                    caption_height=caption_height)


def triangle(rows: Sequence[Sequence[np.ndarray]], cell_h: int, cell_w: int,
             order: str = "low_bottom", row_labels: Sequence[str] | None = None,
             cell_labels: Sequence[Sequence[str]] | None = None, pad: int = 2,
             background=WHITE, label_width: int | None = None,
             caption_height: int | None = None) -> np.ndarray:
    """The strength triangle: one row of frames per strength, rows given in increasing strength.

    Rows are left-aligned and may differ in length; cells beyond a row's end are background.
    `order="low_bottom"` (default) puts the lowest strength at the bottom, so the first column read
    upward is the descent into noise; `"low_top"` flips it. `row_labels` (one per row) go in a left
    margin, `cell_labels` (same shape as `rows`) in a band under each cell; the margins default to
    `label_margins()`. The size is `triangle_size(len(rows), longest row, cell_h, cell_w, pad,
    label_width, caption_height)`, with the margins 0 where the labels are off.
    """
    if order not in ("low_bottom", "low_top"):
        raise ValueError(f"triangle order must be 'low_bottom' or 'low_top', not {order!r}")
    rows = [list(row) for row in rows]
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"triangle has {len(rows)} rows but {len(row_labels)} row labels")
    if cell_labels is not None and [len(r) for r in cell_labels] != [len(r) for r in rows]:
        raise ValueError("triangle cell_labels must have the shape of rows")
    default_width, default_caption = label_margins()
    if row_labels is None:
        label_width = 0
    elif label_width is None:
        label_width = default_width
    if cell_labels is None:
        caption_height = 0
    elif caption_height is None:
        caption_height = default_caption

    def visual(seq):
        return None if seq is None else (list(seq)[::-1] if order == "low_bottom" else list(seq))

    return _compose(visual(rows), cell_h, cell_w, pad, background, row_labels=visual(row_labels),
                    captions=visual(cell_labels), label_width=label_width,
                    caption_height=caption_height)


# ---------------------------------------------------------------------------------------------
# Files

OUTPUT_FORMATS = ("png", "webp", "jpeg")
SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}


def save_picture(path: str | os.PathLike, image: np.ndarray, output_format: str = "png",
                 parameters: str | None = None, record: Mapping[str, Any] | None = None,
                 quality: int = 95) -> Path:
    """Write a uint8 frame (H, W, 3) as PNG, WebP or JPEG with its metadata, atomically.

    PNG: text chunks (`metadata.save_png`). WebP and JPEG: `parameters` in the EXIF UserComment, as
    A1111 writes it and the readers look for it, and the JSON record in an XMP packet. WebP is
    lossy at `quality` (100 = lossless); JPEG at `quality`. The bytes depend only on the input.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    if output_format == "png":
        return metadata.save_png(path, image, metadata.png_text_chunks(parameters, record))
    picture = Image.fromarray(_frame(image, "save_picture"))
    options: dict[str, Any] = {"quality": quality}
    if output_format == "webp" and quality >= 100:
        options = {"lossless": True}
    if parameters is not None:
        options["exif"] = metadata.exif_bytes(parameters)
    if record is not None:
        options["xmp"] = metadata.xmp_bytes(record)
    return atomic_write(path, lambda f: picture.save(f, format=output_format.upper(), **options))


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
        options.update(lossless=lossless, quality=quality)
        if parameters is not None:
            options["exif"] = metadata.exif_bytes(parameters)
        if record is not None:
            options["xmp"] = metadata.xmp_bytes(record)
    elif parameters is not None:
        options["comment"] = parameters.encode("utf-8")
    return atomic_write(path, lambda f: pictures[0].save(f, format=fmt.upper(), **options))

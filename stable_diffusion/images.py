"""Input images: from any file a user may pass to a validated RGB array in [-1, 1].

Users run the tool unattended from shell loops and feed it anything, so every failure is an
`InputError` with a one-line message that names the file and the fix, and every change made to a
picture is reported as a one-line notice. Policies, in the order they apply:

- Formats: PNG (and APNG), JPEG (and MPO), GIF, WebP, BMP, TIFF, PPM/PGM, AVIF. Other formats that
  Pillow knows are refused: several are guessed from weak signatures or run external programs.
- Limits, checked from the header before any pixel is decoded: files of at most
  `MAX_FILE_BYTES`; at most `DECODE_LIMIT_PIXELS` pixels are ever decoded. A JPEG above that limit
  is decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (DCT scaling, no full-size
  buffer), with a notice; any other format above it is refused, as is anything Pillow itself
  calls a decompression bomb. Memory therefore stays in the hundreds of megabytes whatever the
  header claims.
- Too small: an image whose shorter side is below `min_side` (default: `multiple`, 64 px, the
  smallest picture the SD UNet can take) is refused rather than upscaled: a 16 px icon blown up 4x
  gives the model nothing to work with, and a script should learn that instead of getting noise.
  Rounding to a multiple (below) may still upscale a side by less than one multiple.
- Several frames (animated GIF/WebP/PNG, multi-page TIFF, MPO): the first frame, with a notice.
  Warnings from the decoders (e.g. damaged EXIF tags) also become notices.
- EXIF orientation is applied, so the picture is upright as viewers show it.
- Modes: every 8-bit mode goes to RGB through Pillow. Transparency (alpha channels, and `tRNS`
  colour keys of 1, P, L, RGB and 16-bit grey images) is composited on white, never dropped: a
  cut-out on black would teach the model a black background. High-depth grey is scaled by the
  range of its sample type, never by the data's min/max (which would turn a dark frame into a
  bright one and make results depend on content): integer samples (I;16*, I) by 2**bits - 1 as a
  TIFF header declares them (signed: 2**(bits - 1) - 1, negatives black; so 32-bit signed by
  2**31 - 1), and by 65535 where no header says (16-bit PNG/PPM). F (32-bit float) is taken as
  0..1, like float images in TIFF/OpenCV/scikit-image, and clipped, with NaN as 0. High-depth
  samples keep their precision to the float output (no 8-bit detour). 48-bit and 64-bit PNGs are
  reduced to 8 bits per channel by Pillow's decoder itself; a notice says so.
- Size: both sides become multiples of `multiple`, and the area at most `max_pixels`; see
  `target_size` for the rounding rule. Or exactly `size`, the working size a run's plan chose
  (the plan says why, so no notice does). Resampling is LANCZOS (Pillow reduces by whole factors
  first for very large downscales), alpha premultiplied.

Not done: colour management (embedded ICC profiles are ignored; CMYK uses Pillow's plain formula).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
import numbers
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InputError
from .spec import MAX_SIDE

# Pillow format ids tried when opening; MPO is reached through the JPEG opener.
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
# Their files' usual suffixes: a txt2image prompt that names such a file is a picture given by mistake.
PICTURE_FILE_SUFFIXES = (".png", ".apng", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm",
                         ".pgm", ".avif")
DEFAULT_MULTIPLE = 64  # VAE factor 8 times the UNet's three 2x downsamplings
DEFAULT_MAX_PIXELS = 1024 * 1024  # 4x the native 512x512 of SD 2.1-base and SDXL-turbo
DECODE_LIMIT_PIXELS = 8192 * 8192  # largest picture ever held in memory: at most ~256 MB as RGBA
MAX_FILE_BYTES = 1 << 30
MAX_JPEG_SCANS = 1000  # start-of-scan markers: libjpeg's own tools offer such a limit (-maxscans)
_JPEG_SCALES = (1, 2, 4, 8)  # what libjpeg's DCT scaling offers through Image.draft
_FIX_DAMAGED = "the file is damaged or truncated: re-export or re-download it"

# EXIF orientation tag (0x0112) -> the transpose that makes the picture upright, and its name.
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored left-right"),
    3: (Image.Transpose.ROTATE_180, "rotated 180 degrees"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped top-bottom"),
    5: (Image.Transpose.TRANSPOSE, "transposed"),
    6: (Image.Transpose.ROTATE_270, "rotated 90 degrees clockwise"),
    7: (Image.Transpose.TRANSVERSE, "transversed"),
    8: (Image.Transpose.ROTATE_90, "rotated 90 degrees counter-clockwise"),
}
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_COUNTED_IN_HEADER = ("PNG", "WEBP", "MPO", "AVIF")


@dataclass(frozen=True)
class ImageFileInfo:
    """What the header says, from `check_image_path`; no pixel has been decoded."""

    path: Path
    format: str  # Pillow's format id, e.g. "PNG", "JPEG", "MPO"
    mode: str  # Pillow's pixel mode as stored, e.g. "RGB", "P", "I;16"
    size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    file_bytes: int


@dataclass(frozen=True)
class LoadedImage:
    """A decoded input picture, ready for the VAE encoder."""

    path: Path
    pixels: np.ndarray  # (H, W, 3) float32 in [-1, 1], read-only
    original_size: tuple[int, int]  # (width, height) as stored in the file, before EXIF orientation
    size: tuple[int, int]  # (width, height) of `pixels`
    sha256: str  # of the file's bytes, for sidecars and caches
    format: str
    mode: str  # the stored pixel mode
    notices: list[str] = field(default_factory=list)  # one line per change made to the picture
    upright_size: tuple[int, int] | None = None  # (width, height) after EXIF orientation, before resizing
    resized: str | None = None  # the notice of `notices` that says how it was resized, if it was
    pixels_sha256: str = ""  # of `pixels` as decoded: a run refuses pixels changed since (run._check_picture)

    def pixels_changed(self) -> bool:
        """Whether `pixels` are no longer the ones decoded from the file (edited, reshaped, or
        replaced, by anything at all)."""
        try:
            return pixels_digest(self.pixels) != self.pixels_sha256
        except (TypeError, ValueError):  # not an array of numbers
            return True


def pixels_digest(pixels: np.ndarray) -> str:
    """The sha256 of a picture's pixels as float32, and of their shape (a LoadedImage's, at load)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def check_image_path(path: str | os.PathLike, *, min_side: int | None = None) -> ImageFileInfo:
    """Cheap checks before any model is loaded: the file exists, is a readable regular file that
    is not empty, holds a supported image format, and its size is acceptable. Reads the header
    only (milliseconds). `min_side` defaults to `DEFAULT_MULTIPLE`.
    """
    min_side = DEFAULT_MULTIPLE if min_side is None else min_side
    p = Path(path)
    file_bytes = _check_file(p)
    try:
        with _open_checked(p) as f, _translated(p, "read"):
            with _open(f) as im:
                _check_header(im, p, min_side)
                return ImageFileInfo(p, im.format or "?", im.mode, im.size, file_bytes)
    except OSError as e:  # open() itself: permissions, races with deletion
        raise _read_error(p, e) from e


def load_image(
    path: str | os.PathLike,
    *,
    multiple: int = DEFAULT_MULTIPLE,
    max_pixels: int | None = None,
    min_side: int | None = None,
    size: tuple[int, int] | None = None,
) -> LoadedImage:
    """Decode `path` to (H, W, 3) float32 in [-1, 1], both sides multiples of `multiple` and at
    most `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`), or exactly `size` (width, height).
    `min_side` (default `multiple`) is the smallest side accepted. See the module docstring for
    every policy; each change made to the picture is listed in `notices`. Raises `InputError` for
    anything wrong with the file.
    """
    for name, value in (("multiple", multiple), ("max_pixels", max_pixels), ("min_side", min_side)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
            raise InputError(f"{name} {value!r} is not a whole number")
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and 1 <= n <= MAX_SIDE for n in size)):
        raise InputError(f"size {size!r}: expected (width, height), whole numbers of 1 .. {MAX_SIDE} pixels")
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if size is not None:
        max_pixels = max(multiple * multiple, size[0] * size[1])  # what the JPEG decoder may skip
    min_side = multiple if min_side is None else min_side
    if multiple < 1 or min_side < 1:
        raise InputError(f"multiple ({multiple}) and min_side ({min_side}) must be at least 1")
    if max_pixels < multiple * multiple:
        raise InputError(f"max_pixels ({max_pixels}) is below one {multiple}x{multiple} tile; raise it")
    if size is not None and (size[0] % 8 or size[1] % 8):  # the VAE's factor: a picture no generation takes
        raise InputError(f"size {size[0]}x{size[1]} (width x height): the sides must be multiples of 8")

    if isinstance(path, bytes) and (b"\0" in path or len(path) > 4096):  # a file's bytes, not its name
        raise InputError("load_image reads a picture file: give its path, not its bytes")
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load_image reads a picture file: give its path, not a {type(path).__name__} (pixels "
                         "in memory go to the generation methods as floats in [-1, 1])")
    p = Path(path)
    _check_file(p)
    notices: list[str] = []
    try:
        f = _open_checked(p)
    except OSError as e:
        raise _read_error(p, e) from e
    # The file is hashed in blocks, then decoded from the same open file, never held whole: bytes
    # after the picture cost nothing. A file that changes meanwhile is refused (size and time).
    with f:
        before = os.fstat(f.fileno())
        try:
            sha256, scans = _digest(f)
            f.seek(0)
        except OSError as e:
            raise _read_error(p, e) from e
        with _translated(p, "decode") as caught:
            im = _open(f)
            _check_header(im, p, min_side)
            if im.format == "JPEG" and scans > MAX_JPEG_SCANS:  # each scan is a pass over the whole picture
                raise InputError(f"input image {_shown(p)} is a JPEG of {scans} scans, where a progressive one "
                                 f"has about 10 and this tool decodes at most {MAX_JPEG_SCANS} (each is a pass "
                                 "over the whole picture: 20,000 took minutes); save it again, e.g. as PNG")
            stored_size, fmt, mode = im.size, im.format or "?", im.mode
            _note_frames(lambda: _reopen(p, before), notices)
            _draft_jpeg(im, p, multiple, max_pixels, notices)
            rawmode = _tile_rawmode(im)
            if ";16" in rawmode and mode not in _HIGH_DEPTH_MODES:
                notices.append(f"16-bit samples reduced to 8 bits by the decoder ({rawmode})")
            im.load()
            im, swapped = _upright(im, notices)
            work = _working_image(im, notices)
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or not before.st_size:
        raise InputError(f"input image {_shown(p)} changed while being read; run again once it is written")
    notices.extend(f"decoder warning: {_one_line(str(w.message))}" for w in caught)

    # Sizes come from the file, not from a JPEG decoded at reduced scale, so they do not depend on it.
    upright_size = stored_size[::-1] if swapped else stored_size
    chosen = size is not None
    if not chosen:
        try:
            size = target_size(*upright_size, multiple=multiple, max_pixels=max_pixels)
        except ValueError as e:
            width, height = upright_size
            raise InputError(
                f"input image {_shown(p)} is {width}x{height} pixels: {e}; crop it to a less extreme shape"
            ) from e
    size = tuple(size)
    if size != work.size:
        # Pillow premultiplies alpha while resampling, so edges of cut-outs do not darken.
        work = work.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    resized = None
    if size != upright_size and not chosen:
        resized = _resize_notice(upright_size, size, multiple, max_pixels)
        notices.append(resized)
    pixels = np.ascontiguousarray(_to_unit_rgb(work) * 2.0 - 1.0, dtype=np.float32)  # (H, W, 3) in [-1, 1]
    pixels.flags.writeable = False  # the file's pixels, as its sha256 names them in records and caches
    return LoadedImage(
        path=p,
        pixels=pixels,
        original_size=stored_size,
        size=size,
        sha256=sha256,
        format=fmt,
        mode=mode,
        notices=notices,
        upright_size=tuple(upright_size),
        resized=resized,
        pixels_sha256=pixels_digest(pixels),
    )


def target_size(width: int, height: int, *, multiple: int, max_pixels: int,
                upscale: bool = False) -> tuple[int, int]:
    """The (width, height) a picture of `width` x `height` is resampled to.

    First a uniform scale (never above 1, unless `upscale`: then the area becomes `max_pixels`)
    brings the area within `max_pixels`. Then each side may
    go to the multiple of `multiple` just below or just above its scaled length (never below one
    multiple); of those (at most four) sizes, the ones within `max_pixels` compete, and the one
    whose aspect ratio is closest to the original's (in log ratio) wins; ties go to the area
    closest to the scaled one. This rarely differs from rounding each side to the nearest
    multiple, and when it does it keeps the shape: 1000x600 becomes 960x576 (exactly 5:3), not
    1024x576. Raises ValueError when no candidate fits (an extreme aspect ratio with a small
    `max_pixels`).
    """
    scale = math.sqrt(max_pixels / (width * height))
    scale = scale if upscale else min(1.0, scale)
    w, h = width * scale, height * scale

    def near(length: float) -> set[int]:
        below = max(multiple, math.floor(length / multiple) * multiple)
        return {below, max(multiple, math.ceil(length / multiple) * multiple)}

    candidates = [(cw, ch) for cw in near(w) for ch in near(h) if cw * ch <= max_pixels]
    if not candidates:
        raise ValueError(
            f"no size with sides multiples of {multiple} fits within {max_pixels} pixels at this aspect ratio"
        )
    aspect = math.log(width / height)

    def cost(c: tuple[int, int]) -> tuple[float, float]:
        # Rounded so that float noise cannot break an exact tie in favour of the larger change.
        return round(abs(math.log(c[0] / c[1]) - aspect), 9), abs(math.log(c[0] * c[1] / (w * h)))

    return min(candidates, key=cost)


# --- checks -----------------------------------------------------------------------------------


def _check_file(p: Path) -> int:
    """Path-level checks, from one stat: exists, regular file (a pipe would block a read forever),
    not empty, not huge. Returns the size in bytes."""
    name = _shown(p)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise InputError(f"input image {name} does not exist; check the path and working directory") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise _read_error(p, e) from e
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"input image {name} is a directory; give the path of an image file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"input image {name} is not a regular file (a pipe or a device); save the image to a file first"
        )
    if st.st_size == 0:
        raise InputError(f"input image {name} is empty (0 bytes); re-export or re-download it")
    if st.st_size > MAX_FILE_BYTES:
        raise InputError(
            f"input image {name} is {st.st_size} bytes, over the {MAX_FILE_BYTES} byte limit; "
            "save it at a smaller size or with compression"
        )
    return st.st_size


def _open_checked(p: Path):
    """The file opened without waiting, and checked again on the open file (regular, within the
    size limit): a name swapped for a pipe after `_check_file` cannot block the read."""
    from .files import open_regular

    try:
        return open_regular(p, "input", "input image")
    except InputError as e:
        if isinstance(e.__cause__, OSError):  # permissions and the like: said as for any read
            raise _read_error(p, e.__cause__) from e.__cause__
        raise


def _digest(f) -> tuple[str, int]:
    """SHA-256 of an open file from its start, read in blocks (at most MAX_FILE_BYTES), and the
    count of JPEG start-of-scan markers (FF DA) in it: entropy-coded data never holds them."""
    digest, size, scans, last = hashlib.sha256(), 0, 0, b""
    while block := f.read(1 << 20):
        size += len(block)
        if size > MAX_FILE_BYTES:
            raise InputError(f"input image grew past {MAX_FILE_BYTES} bytes while being read; run "
                             "again once it is written")
        digest.update(block)
        scans += (last + block[:1]).count(b"\xff\xda") + block.count(b"\xff\xda")
        last = block[-1:]
    return digest.hexdigest(), scans


def _reopen(p: Path, first: os.stat_result):
    """A second reader of the file being decoded, only if it is still that file."""
    f = _open_checked(p)
    if not os.path.samestat(os.fstat(f.fileno()), first):
        f.close()
        raise InputError(f"input image {_shown(p)} changed while being read; run again once it is written")
    return f


def _read_error(p: Path, e: Exception) -> InputError:
    name = _shown(p)
    if isinstance(e, PermissionError):
        return InputError(f"cannot read input image {name}: permission denied; make it readable (chmod u+r)")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return InputError(f"cannot read input image {name}: {_one_line(reason)}; check the path and the file")


def _check_header(im: Image.Image, p: Path, min_side: int) -> None:
    width, height = im.size
    if width < 1 or height < 1:
        raise InputError(f"input image {_shown(p)} has no pixels ({width}x{height}); {_FIX_DAMAGED}")
    if min(width, height) < min_side:
        raise InputError(
            f"input image {_shown(p)} is {width}x{height} pixels; the model needs at least {min_side} pixels "
            "on each side: upscale it first"
        )
    if width * height > DECODE_LIMIT_PIXELS and _jpeg_limit_scale(im) is None:
        raise InputError(_too_large(p, width * height))


def _too_large(p: Path, pixels: int | None) -> str:
    what = "more pixels than" if pixels is None else f"{pixels / 1e6:.0f} megapixels, more than"
    side = math.isqrt(DECODE_LIMIT_PIXELS)
    return (
        f"input image {_shown(p)} declares {what} the {DECODE_LIMIT_PIXELS / 1e6:.0f} megapixels this tool "
        f"will decode (a decompression bomb or a huge scan); downscale it to at most {side}x{side} first"
    )


def _shown(p: Path) -> str:
    """The path as typed, or quoted when it holds a newline or another control character, so
    that every message stays on one line."""
    text = str(p)
    return text if text.isprintable() else repr(text)  # repr: é and 日本 stay readable


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _translated(p: Path, verb: str):
    """Turn whatever a decoder raises on a malformed file into an InputError, and collect its
    warnings (yielded list) so they become notices instead of stray stderr lines.

    Pillow's plugins raise a zoo of types on malformed input (OSError, SyntaxError, EOFError,
    ValueError, struct.error, IndexError, ...), so everything but interrupts is translated; the
    original type is kept in the message for bug reports.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Our own DECODE_LIMIT_PIXELS decides; Pillow's warning threshold is below it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield caught
        except InputError:
            raise
        except Image.DecompressionBombError as e:
            raise InputError(_too_large(p, None)) from e
        except Image.UnidentifiedImageError as e:
            names = ", ".join(_formats()).replace("WEBP", "WebP")
            raise InputError(
                f"input image {_shown(p)} is not an image in a supported format ({names}); "
                "convert it to PNG or JPEG"
            ) from e
        except MemoryError as e:
            raise InputError(f"ran out of memory decoding input image {_shown(p)}; downscale it first") from e
        except Exception as e:
            if isinstance(e, ValueError) and "MAX_TEXT_CHUNK" in str(e):  # a whole file: its metadata is large
                raise InputError(f"input image {_shown(p)} holds a compressed text of more than "
                                 f"{PngImagePlugin.MAX_TEXT_CHUNK >> 20} MB (another tool's workflow?), which the PNG "
                                 "reader does not expand; save the picture again without it") from e
            detail = _one_line(str(e)) or "no detail"
            raise InputError(
                f"cannot {verb} input image {_shown(p)}: {detail} ({type(e).__name__}); {_FIX_DAMAGED}"
            ) from e


@functools.cache
def _formats() -> tuple[str, ...]:
    # Import just the plugins we accept: Image.init() imports all of Pillow's (~0.1 s), and
    # Image.open raises KeyError for an id whose plugin this build lacks (AVIF before 11.2).
    for plugin in ("Png", "Jpeg", "Gif", "WebP", "Bmp", "Tiff", "Ppm", "Avif"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"PIL.{plugin}ImagePlugin")
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _open(fp) -> Image.Image:
    return Image.open(fp, formats=_formats())


# --- decoding -----------------------------------------------------------------------------------


def _note_frames(reopen, notices: list[str]) -> None:
    """Say when the file holds more than the first frame, which is the one decoded.

    Asked of a second opening of the same bytes, so that a damaged later frame, which may leave a
    plugin half-seeked, cannot touch the first frame's decoding. Frames are counted only where the
    header holds the count: GIF and TIFF must be walked frame by frame, which a file of a million
    tiny frames turns into minutes; for them a second frame's presence is enough.
    """
    with reopen() as fp:
        probe = _open(fp)
        kind = "page" if probe.format == "TIFF" else "image" if probe.format == "MPO" else "frame"
        try:
            if probe.format in _COUNTED_IN_HEADER:
                count = int(getattr(probe, "n_frames", 1))
                if count > 1:
                    notices.append(f"first {kind} of {count} used ({probe.format})")
            elif getattr(probe, "is_animated", False):
                notices.append(f"first {kind} used (a multi-{kind} {probe.format})")
        except Exception as e:
            notices.append(f"first {kind} used; later ones are unreadable ({_one_line(str(e), 80)})")


def _jpeg_limit_scale(im: Image.Image) -> int | None:
    """The smallest JPEG DCT scale that keeps decoding within DECODE_LIMIT_PIXELS, or None."""
    if im.format not in ("JPEG", "MPO"):
        return None
    width, height = im.size
    for s in _JPEG_SCALES:
        if math.ceil(width / s) * math.ceil(height / s) <= DECODE_LIMIT_PIXELS:
            return s
    return None


def _draft_jpeg(im: Image.Image, p: Path, multiple: int, max_pixels: int, notices: list[str]) -> None:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when the full size is over the decode
    limit, or more than twice (per side) what the resize will keep: the DCT scaling costs no
    visible quality then, and saves memory and time."""
    limit_scale = _jpeg_limit_scale(im)
    if limit_scale is None:
        return
    width, height = im.size
    keep = min(1.0, math.sqrt(max_pixels / (width * height)))
    quality_scale = max(
        s for s in _JPEG_SCALES if s == 1 or (2 * keep * s <= 1 and min(width, height) >= 2 * multiple * s)
    )
    scale = max(limit_scale, quality_scale)
    if scale == 1:
        return
    im.draft(None, (width // scale, height // scale))
    if im.size[0] * im.size[1] > DECODE_LIMIT_PIXELS:
        raise InputError(_too_large(p, width * height))
    if im.size != (width, height):
        reduced = f"{im.size[0]}x{im.size[1]}"
        notices.append(f"JPEG decoded at reduced scale, {width}x{height} -> {reduced} (DCT scaling)")


def _tile_rawmode(im: Image.Image) -> str:
    """How the decoder unpacks samples, e.g. "RGB;16B" for a 48-bit PNG; "" when unknown."""
    try:
        args = im.tile[0][3]
        raw = args[0] if isinstance(args, tuple) else args
        return raw if isinstance(raw, str) else ""
    except (IndexError, TypeError, AttributeError):
        return ""


def _upright(im: Image.Image, notices: list[str]) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation; also returns whether width and height swapped."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception as e:  # broken EXIF is common and should not cost the user the picture
        notices.append(f"EXIF data unreadable, orientation not applied ({_one_line(str(e), 80)})")
        return im, False
    if not isinstance(orientation, int) or orientation not in _ORIENTATION:
        return im, False
    method, what = _ORIENTATION[orientation]
    upright = im.transpose(method)
    notices.append(f"EXIF orientation {orientation} applied: {what}")
    return upright, orientation >= 5


def _working_image(im: Image.Image, notices: list[str]) -> Image.Image:
    """The picture between decoding and the array: 8-bit "RGB" or "RGBA", or "F" grey in [0, 1]."""
    mode, size = im.mode, im.size  # size as decoded, maybe at reduced JPEG scale
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_grey(im, notices)
    if mode == "La":  # premultiplied grey + alpha, which Pillow cannot convert directly
        grey, alpha = im.split()
        im = Image.merge("RGBa", (grey, grey, grey, alpha))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        if mode != "RGBA":
            notices.append(f"pixel mode {mode} converted to RGBA")
        opaque = rgba.getchannel("A").histogram()[255]
        total = size[0] * size[1]
        if opaque == total:
            return rgba.convert("RGB")
        notices.append(
            f"transparency composited on a white background ({100 * (total - opaque) / total:.0f}% of pixels "
            "not fully opaque)"
        )
        return rgba
    if mode != "RGB":
        detail = " (no colour management)" if mode == "CMYK" else ""
        notices.append(f"pixel mode {mode} converted to RGB{detail}")
        im = im.convert("RGB")
    return im


def _high_depth_grey(im: Image.Image, notices: list[str]) -> Image.Image:
    values = np.asarray(im)  # (H, W) uint16 / int32 / float32
    if im.mode == "F":
        finite = np.isfinite(values)
        outside = int(np.count_nonzero(finite & ((values < 0) | (values > 1))))
        unit = np.clip(np.where(finite, values, 0.0), 0.0, 1.0).astype(np.float32)  # (H, W)
        notices.append(
            f"32-bit float samples taken as 0..1 ({100 * outside / values.size:.1f}% clipped, "
            f"{values.size - int(np.count_nonzero(finite))} not finite set to 0)"
        )
        return Image.fromarray(unit)
    white = _integer_white_level(im)
    unit = (np.clip(values.astype(np.float64), 0, white) / white).astype(np.float32)  # (H, W)
    notices.append(f"{im.mode} grey samples scaled by their full range 0..{white} (not by the data's range)")
    key = im.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        # A colour key (PNG tRNS) marks exact samples, so it is applied before any resampling.
        keyed = values == key
        if keyed.any():
            unit[keyed] = 1.0
            notices.append(f"transparent colour key {key} composited on a white background")
    return Image.fromarray(unit)


def _integer_white_level(im: Image.Image) -> int:
    """2**bits - 1 of the stored sample type: 16 bits unless a TIFF header says otherwise."""
    bits, signed = 16, False
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        with contextlib.suppress(Exception):
            declared = tags.get(258)
            declared = declared[0] if isinstance(declared, tuple) else declared
            if isinstance(declared, int) and 1 <= declared <= 32:
                bits = declared
            fmt = tags.get(339)
            signed = (fmt[0] if isinstance(fmt, tuple) else fmt) == 2
    return 2 ** (bits - signed) - 1


def _to_unit_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1], alpha composited on white."""
    if im.mode == "F":
        grey = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)  # (H, W); LANCZOS rings past the range
        return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)
    values = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3) or (H, W, 4)
    if im.mode == "RGBA":
        alpha = values[:, :, 3:]  # (H, W, 1)
        return values[:, :, :3] * alpha + (1.0 - alpha)
    return values


def _resize_notice(before: tuple[int, int], after: tuple[int, int], multiple: int, max_pixels: int) -> str:
    (w0, h0), (w1, h1) = before, after
    if w0 * h0 > max_pixels:
        why = f"to fit max_pixels={max_pixels} with sides multiples of {multiple}"
        verb = "downscaled"
    else:
        why = f"so that both sides are multiples of {multiple}"
        verb = "resized"
    text = f"{verb} from {w0}x{h0} to {w1}x{h1} (LANCZOS) {why}"
    change = abs(math.log((w1 / h1) / (w0 / h0)))
    if change > 0.02:
        text += f"; aspect ratio {w0 / h0:.3f} -> {w1 / h1:.3f}"
    return text

"""What a picture file carries about how it was made, written and read back.

- `parameters`: the A1111 text (infotext.py). In a PNG a text chunk; in a JPEG or WebP the EXIF
  UserComment, as A1111 writes it; in a GIF its comment.
- `sd_trajectory`: JSON with everything the caller needs to reproduce the picture. In a PNG a text
  chunk; in a JPEG or WebP an XMP packet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import escape as _xml_escape

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InputError
from .files import atomic_write, open_regular, parse_json, to_json
from .infotext import parse_parameters_text

PARAMETERS_KEY = "parameters"
TRAJECTORY_KEY = "sd_trajectory"


# ---------------------------------------------------------------------------------------------
# PNG


def png_text_chunks(parameters: str | None = None,
                    record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The text chunks of one picture: the A1111 `parameters` text and the JSON record."""
    chunks = {}
    if parameters is not None:
        chunks[PARAMETERS_KEY] = parameters
    if record is not None:
        chunks[TRAJECTORY_KEY] = to_json(record)
    return chunks


def _png_info(text_chunks: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        # Bytes that were not UTF-8 (see to_json) are shown as U+FFFD in the text chunks.
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            key_bytes = key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text key {key!r} must be latin-1") from None
        if not 1 <= len(key_bytes) <= 79 or b"\0" in key_bytes:
            raise ValueError(f"PNG text key {key!r} must be 1 to 79 characters, without NUL")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value)  # iTXt holds UTF-8; tEXt only latin-1
        else:
            info.add_text(key, value)
    return info


def save_png(path: str | os.PathLike, image: np.ndarray,
             text_chunks: Mapping[str, str] | None = None) -> Path:
    """Write a uint8 picture, (H, W, 3), (H, W, 4) or (H, W), as PNG with text chunks, atomically.

    The bytes depend only on the input: Pillow writes no time stamp, and the compression is fixed.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png needs uint8 pixels, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    picture = Image.fromarray(image)
    info = _png_info(text_chunks or {})
    return atomic_write(path, lambda f: picture.save(f, format="PNG", pnginfo=info,
                                                     compress_level=6))


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise InputError(f"{path} is a {im.format} file, not a PNG")
            return dict(im.text)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not a picture Pillow can read") from None


# ---------------------------------------------------------------------------------------------
# JPEG and WebP: EXIF UserComment and XMP

_EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
_USER_COMMENT = 0x9286
# UserComment starts with an 8-byte character code; A1111 (through piexif) writes "UNICODE" and
# UTF-16 big-endian text, which is what the readers decode.
_UNICODE_PREFIX = b"UNICODE\0"
_XMP_NS = "urn:sd-trajectory:1"
_XMP_OPEN, _XMP_CLOSE = "<sdt:record>", "</sdt:record>"


def exif_bytes(parameters: str) -> bytes:
    """An EXIF block whose UserComment holds `parameters`, in the form A1111 writes."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
    return exif.tobytes()


# A JPEG holds each metadata block in one APP1 segment: 65,533 bytes after its marker and length,
# less the block's signature (XMP's namespace, 29 bytes; EXIF's header, 6).
JPEG_BLOCK_BYTES = 65_533 - 29


def metadata_blocks(parameters: str | None, record: Mapping[str, Any] | None) -> dict:
    """The metadata blocks of a WebP or JPEG of ours, as Pillow's save takes them: `parameters` in
    EXIF (`exif`), the JSON record in XMP (`xmp`); each only where given."""
    blocks = {}
    if parameters is not None:
        blocks["exif"] = exif_bytes(parameters)
    if record is not None:
        blocks["xmp"] = xmp_bytes(record)
    return blocks


def xmp_bytes(record: Mapping[str, Any]) -> bytes:
    """An XMP packet holding the JSON record as one property of our own namespace."""
    body = _xml_escape(to_json(record))
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:sdt="{_XMP_NS}"><sdt:record>{body}</sdt:record>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def _user_comment(im: Image.Image) -> str | None:
    """EXIF's UserComment. Its UNICODE text is UTF-16 in the byte order of the EXIF block's header
    (ours and A1111's big-endian, `MM`; a little-endian `II` block's read as big-endian was another
    text), unless a byte-order mark says otherwise."""
    exif = im.getexif()
    raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, text = raw[:8], raw[8:]
    if code == _UNICODE_PREFIX:
        if text[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return text.decode("utf-16", errors="replace")  # the mark's order, the mark dropped
        return text.decode("utf-16-le" if getattr(exif, "endian", ">") == "<" else "utf-16-be", errors="replace")
    return text.decode("utf-8" if code.startswith(b"\0") else "ascii", errors="replace")


def _xmp_record(xmp: bytes | str | None) -> str | None:
    if not xmp:
        return None
    text = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else xmp
    # Two plain searches, linear in the packet: a lazy regex would rescan the rest of a hostile
    # packet from every opening tag it holds (quadratic in a megabyte of them).
    start = text.find(_XMP_OPEN)
    if start < 0:
        return None
    start += len(_XMP_OPEN)
    end = text.find(_XMP_CLOSE, start)
    if end < 0:
        return None
    return text[start:end].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def read_picture_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parsed `parameters`, the JSON record) of a PNG, JPEG, WebP or GIF picture of ours; an
    absent part reads as {}."""
    return _parsed(Path(path), *read_picture_texts(path))


def read_picture_texts(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The raw `parameters` text and JSON record text of a picture, None where absent.

    Only the file's header is read, never its pixels: a regular file within the picture cap
    (files.open_regular), a PNG's text chunks before its image data (where we and A1111 write
    them), so that neither a pipe nor a decompression bomb costs more than the header."""
    path = Path(path)
    try:
        with open_regular(path, "picture", "picture") as f, Image.open(f) as im:
            if im.format == "PNG":
                # `im.info`, not `im.text`: the latter decodes every pixel to reach later chunks.
                text = {k: v for k, v in im.info.items() if isinstance(v, str)}
                parameters, record = text.get(PARAMETERS_KEY), text.get(TRAJECTORY_KEY)
            elif im.format in ("JPEG", "WEBP", "GIF"):
                parameters = _user_comment(im) if im.format != "GIF" else None
                record = _xmp_record(im.info.get("xmp"))
                if im.format == "GIF" and im.info.get("comment"):  # our animations' parameters
                    parameters = im.info["comment"].decode("utf-8", errors="replace")
            else:
                raise InputError(f"{path} is a {im.format} file; pictures of ours are PNG, JPEG, WebP "
                                 "or GIF")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not a picture Pillow can read") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path} declares more pixels than any picture of ours (a decompression "
                         "bomb); it cannot be replayed") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, SyntaxError, EOFError) as err:  # Pillow on a damaged header or chunk
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read {path}: {str(err)[:120] or type(err).__name__}; the picture "
                         "is damaged") from None
    return parameters, record


# The PNG text keys other tools write their settings under, in forms we do not read, and whether a
# value says so: a key such as `prompt` or `Software` is written by other programs too.
_OTHER_TOOLS = {"workflow": ("ComfyUI", None), "prompt": ("ComfyUI", lambda v: v.lstrip().startswith("{")),
                "invokeai_metadata": ("InvokeAI", None), "invokeai_graph": ("InvokeAI", None),
                "sd-metadata": ("InvokeAI", None), "Dream": ("InvokeAI", None),
                "Software": ("NovelAI", lambda v: v.strip() == "NovelAI")}


def other_tool(path: str | os.PathLike) -> str | None:
    """The tool whose settings a PNG carries under its own key (ComfyUI's workflow, ...), if any:
    read from the header only, as read_picture_texts reads it."""
    try:
        with open_regular(Path(path), "picture", "picture") as f, Image.open(f) as im:
            text = {k: v for k, v in im.info.items() if isinstance(v, str)} if im.format == "PNG" else {}
    except (InputError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    return next((tool for key, (tool, says) in _OTHER_TOOLS.items()
                 if key in text and (says is None or says(text[key]))), None)


def _parsed(path: Path, parameters: str | None, record: str | None) -> tuple[dict, dict]:
    fields = parse_parameters_text(parameters) if parameters is not None else {}
    data = {}
    if record is not None:
        data = parse_json(record, f"{path}: the {TRAJECTORY_KEY} record")
    return fields, data


def read_png_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parsed `parameters`, the `sd_trajectory` JSON); an absent chunk reads as {}."""
    text = read_png_text(path)
    return _parsed(Path(path), text.get(PARAMETERS_KEY), text.get(TRAJECTORY_KEY))

"""The input-image loader on real files: every failure an InputError naming the file, every Pillow
mode a file can hold decoded to the expected pixels, and a seeded fuzz of malformed files."""

import faulthandler
import hashlib
import io
import math
import os
import stat
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from stable_diffusion import images
from stable_diffusion.errors import InputError
from stable_diffusion.images import check_image_path, load_image, target_size

BOTH = pytest.mark.parametrize("fn", [check_image_path, load_image], ids=["check", "load"])


# --- helpers --------------------------------------------------------------------------------------


def expect_input_error(fn, path, *fragments, **kwargs) -> str:
    """The call raises InputError with a one-line message naming the file and containing fragments."""
    with pytest.raises(InputError) as info:
        fn(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def assert_valid(result, size: tuple[int, int]) -> None:
    assert result.size == size
    assert result.pixels.shape == (size[1], size[0], 3)
    assert result.pixels.dtype == np.float32
    assert np.isfinite(result.pixels).all()
    assert result.pixels.min() >= -1.0 and result.pixels.max() <= 1.0


def to_signed(rgb) -> np.ndarray:
    """8-bit values, or an 8-bit RGB picture, on the loader's [-1, 1] scale."""
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, bit_depth, color_type, rows: bytes | None, extra: bytes = b"") -> bytes:
    """A PNG written by hand, for what Pillow cannot write: 48-bit colour, a 16-bit colour key, and
    headers that claim enormous sizes. rows=None stores a short stream of zeros (a "bomb")."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024 if rows is None else rows)
    chunks = png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def zero_rows_1bit(width, height) -> bytes:
    """Filter byte 0 plus packed 1-bit zeros for every row."""
    return (b"\x00" * (1 + (width + 7) // 8)) * height


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def flat_grey_jpeg(width, height) -> bytes:
    """A valid baseline greyscale JPEG of any size in a small file: each Huffman table has a single
    one-bit code (DC difference 0, end of block), so every 8x8 block costs two zero bits."""
    single_code = lambda table_id: bytes([table_id, 1]) + bytes(15) + b"\x00"  # noqa: E731
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    return (
        b"\xff\xd8"
        + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
        + jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + jpeg_segment(0xC4, single_code(0x00) + single_code(0x10))
        + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + bytes(math.ceil(blocks * 2 / 8))
        + b"\xff\xd9"
    )


def tiff_extra_samples(im: Image.Image, value: int) -> bytes:
    """A little-endian TIFF whose ExtraSamples tag says `value` (1: premultiplied alpha), which
    Pillow reads as La/RGBa but will not write itself."""
    buffer = io.BytesIO()
    im.save(buffer, "TIFF")
    data = buffer.getvalue()
    entry = struct.pack("<HHI", 338, 3, 1)  # ExtraSamples, SHORT, one value
    at = data.index(entry) + len(entry)
    assert data[at : at + 2] == b"\x02\x00"  # unassociated alpha, as Pillow writes it
    return data[:at] + struct.pack("<H", value) + data[at + 2 :]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the file itself ------------------------------------------------------------------------------


@BOTH
def test_missing_path(tmp_path, fn):
    expect_input_error(fn, tmp_path / "nope.png", "does not exist")


@BOTH
def test_directory(tmp_path, fn):
    expect_input_error(fn, tmp_path, "is a directory")


@BOTH
def test_pipe_is_refused_without_blocking(tmp_path, fn):
    # Opening a FIFO for reading would wait for a writer forever.
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    expect_input_error(fn, fifo, "not a regular file")


@BOTH
def test_zero_bytes(tmp_path, fn):
    expect_input_error(fn, write(tmp_path / "empty.png", b""), "empty (0 bytes)")


@BOTH
def test_file_over_the_size_limit(tmp_path, fn):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(images.MAX_FILE_BYTES + 1)  # sparse: no disk space used
    expect_input_error(fn, path, "byte limit")


@BOTH
def test_text_file_is_not_an_image(tmp_path, fn):
    path = write(tmp_path / "notes.png", b"a lit fireplace, oil on canvas\n" * 40)
    expect_input_error(fn, path, "not an image in a supported format", "convert it to PNG or JPEG")


@BOTH
def test_format_outside_the_supported_list(tmp_path, fn):
    path = tmp_path / "picture.pcx"
    Image.new("RGB", (80, 80), "red").save(path)
    expect_input_error(fn, path, "not an image in a supported format")


def _as_nobody(fn, path) -> str:
    """Run fn(path) in a forked child with uid/gid 65534; return a line describing the outcome."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                os.setgid(65534)
                os.setuid(65534)
            except OSError as e:
                outcome = f"setuid failed: {e}"
            else:
                try:
                    fn(path)
                    outcome = "no error"
                except InputError as e:
                    outcome = f"InputError: {e}"
                except BaseException as e:
                    outcome = f"{type(e).__name__}: {e}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@BOTH
def test_unreadable_file(tmp_path, fn):
    if os.geteuid() != 0:
        path = tmp_path / "locked.png"
        Image.new("RGB", (80, 80)).save(path)
        path.chmod(0)
        try:
            if os.access(path, os.R_OK):
                pytest.skip("chmod 000 does not block reading here (capabilities or file system)")
            expect_input_error(fn, path, "permission denied", "chmod u+r")
        finally:
            path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        return
    # Root reads anything, so the check runs in a child that drops to the unprivileged uid 65534,
    # in a directory that user may enter (pytest's tmp_path is private to root).
    folder = Path(tempfile.mkdtemp(prefix="sd-images-"))
    try:
        folder.chmod(0o755)
        path = folder / "locked.png"
        Image.new("RGB", (80, 80)).save(path)
        path.chmod(0)
        outcome = _as_nobody(fn, path)
        if outcome.startswith("setuid failed"):
            pytest.skip(f"running as root and cannot drop privileges to test permissions ({outcome})")
        assert outcome.startswith("InputError: "), outcome
        assert "permission denied" in outcome and str(path) in outcome and "\n" not in outcome
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


# --- damaged files --------------------------------------------------------------------------------


def _sample_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_file(tmp_path, fmt):
    data = _sample_bytes(fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 2 // 3])
    expect_input_error(load_image, path, "damaged or truncated")


def test_flipped_byte_in_png_data(tmp_path):
    data = bytearray(_sample_bytes("PNG"))
    idat = data.index(b"IDAT")
    data[idat + 200] ^= 0x55  # CRC mismatch and a broken zlib stream
    expect_input_error(load_image, write(tmp_path / "flip.png", bytes(data)), "damaged or truncated")


def test_damage_found_mid_decode_is_an_input_error_too(tmp_path):
    # Pillow raises SyntaxError, not OSError, for a bad chunk name met while reading pixel data.
    rows = (b"\x00" + bytes(range(192))) * 64
    stream = zlib.compress(rows)
    half = len(stream) // 2
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream[:half])
        + png_chunk(b"\x1fg\xf8\xc1", stream[half:]) + png_chunk(b"IEND", b"")
    )
    path = write(tmp_path / "bad-chunk.png", data)
    assert check_image_path(path).size == (64, 64)  # the header is fine
    expect_input_error(load_image, path, "(SyntaxError)", "damaged or truncated")


# --- sizes ----------------------------------------------------------------------------------------


@BOTH
def test_too_small_is_refused(tmp_path, fn):
    path = tmp_path / "icon.png"
    Image.new("RGB", (40, 100)).save(path)
    expect_input_error(fn, path, "40x100", "at least 64 pixels", "upscale it first")


def test_small_image_accepted_with_lower_min_side(tmp_path):
    path = tmp_path / "icon.png"
    Image.new("RGB", (40, 100), (255, 0, 0)).save(path)
    result = load_image(path, min_side=32)
    assert_valid(result, (64, 128))
    assert "resized from 40x100 to 64x128 (LANCZOS)" in " ".join(result.notices)
    np.testing.assert_array_equal(result.pixels[10, 10], to_signed([255, 0, 0]))


def test_bomb_beyond_pillows_limit_is_refused_before_decoding(tmp_path):
    path = write(tmp_path / "bomb.png", png_bytes(100_000, 100_000, 1, 0, rows=None))
    assert path.stat().st_size < 2000
    for fn in (check_image_path, load_image):
        expect_input_error(fn, path, "decompression bomb", "downscale it")


def test_png_over_the_decode_limit_is_refused(tmp_path):
    side = math.isqrt(images.DECODE_LIMIT_PIXELS) + 1000  # between our limit and Pillow's
    path = write(tmp_path / "scan.png", png_bytes(side, side, 1, 0, zero_rows_1bit(side, side)))
    for fn in (check_image_path, load_image):
        expect_input_error(fn, path, f"{side * side / 1e6:.0f} megapixels", "decompression bomb")


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    side = 12_000  # 144 megapixels, over the decode limit; libjpeg decodes it at 1/4
    path = write(tmp_path / "big.jpg", flat_grey_jpeg(side, side))
    assert side * side > images.DECODE_LIMIT_PIXELS
    assert check_image_path(path).size == (side, side)
    result = load_image(path)
    assert_valid(result, (1024, 1024))
    assert result.original_size == (side, side)
    text = " | ".join(result.notices)
    assert "JPEG decoded at reduced scale, 12000x12000 -> 3000x3000" in text
    assert "downscaled from 12000x12000 to 1024x1024" in text
    np.testing.assert_allclose(result.pixels, to_signed(128), atol=1e-6)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path, monkeypatch):
    """Each scan of a progressive JPEG is a pass over the whole picture: 2 MB of 20,000 scans of an
    8000x8000 picture took 259 s to decode, silently. The scans are counted as the file is hashed;
    here against a limit of 5, on Pillow's own progressive JPEG (10 scans) and a baseline one (1)."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.jpg", progressive=True)
    Image.fromarray(pixels).save(tmp_path / "b.jpg")
    monkeypatch.setattr(images, "MAX_JPEG_SCANS", 5)
    expect_input_error(load_image, tmp_path / "p.jpg", "is a JPEG of 10 scans", "at most 5", "save it again")
    assert_valid(load_image(tmp_path / "b.jpg"), (64, 64))
    Image.fromarray(pixels).save(tmp_path / "p.png")  # the marker's bytes in another format count for nothing
    (tmp_path / "p.png").write_bytes((tmp_path / "p.png").read_bytes() + b"\xff\xda" * 10)
    assert_valid(load_image(tmp_path / "p.png"), (64, 64))


def test_a_png_whose_compressed_text_expands_past_the_readers_cap_is_said_so(tmp_path):
    """A whole picture carrying a 3.6 MB compressed workflow was called damaged or truncated."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", "x" * 3_600_000, zip=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "wf.png", pnginfo=info)
    message = expect_input_error(load_image, tmp_path / "wf.png", "holds a compressed text of more than 1 MB",
                                 "save the picture again without it")
    assert "damaged" not in message


def test_large_image_downscaled_to_max_pixels(tmp_path):
    path = tmp_path / "photo.png"
    ramp = np.broadcast_to(np.linspace(0, 255, 3000).astype(np.uint8), (2000, 3000))
    Image.fromarray(np.ascontiguousarray(ramp)).save(path, compress_level=1)
    result = load_image(path, max_pixels=512 * 512)
    expected = target_size(3000, 2000, multiple=64, max_pixels=512 * 512)
    assert expected == (576, 384)  # exactly 3:2
    assert_valid(result, expected)
    assert f"downscaled from 3000x2000 to 576x384 (LANCZOS) to fit max_pixels={512 * 512}" in " ".join(
        result.notices
    )
    # The ramp survives: left edge dark, right edge bright, monotone along the row.
    row = result.pixels[200, :, 0]
    assert row[0] < -0.95 and row[-1] > 0.95 and np.all(np.diff(row[2:-2]) >= -1e-6)


def test_extreme_aspect_ratio_that_cannot_fit_is_refused(tmp_path):
    path = write(tmp_path / "strip.png", png_bytes(64, 40_000, 1, 0, zero_rows_1bit(64, 40_000)))
    expect_input_error(load_image, path, "crop it", max_pixels=64 * 64 * 16)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), (512, 512)),
        ((520, 520), (512, 512)),
        ((130, 90), (192, 128)),  # 3:2, where nearest rounding would give 128x64 (2:1)
        ((1000, 600), (960, 576)),  # exactly 5:3, where nearest rounding gives 1024x576
        ((100, 1000), (128, 1024)),
        ((64, 64), (64, 64)),
        ((4000, 3000), (1152, 896)),  # downscaled into 1024*1024 pixels
        ((3000, 4000), (896, 1152)),
    ],
)
def test_target_size_pinned(size, expected):
    assert target_size(*size, multiple=64, max_pixels=1024 * 1024) == expected


def test_target_size_invariants():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(64, 5000, (300, 2)):
        width, height = int(width), int(height)
        w, h = target_size(width, height, multiple=64, max_pixels=1024 * 1024)
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024
        scale = min(1.0, math.sqrt(1024 * 1024 / (width * height)))
        # Each side within one multiple of the uniformly scaled side.
        assert abs(w - width * scale) < 64 and abs(h - height * scale) < 64
        # Never a worse aspect ratio than rounding each side to the nearest multiple would give.
        nearest = [max(64, round(x * scale / 64) * 64) for x in (width, height)]
        if nearest[0] * nearest[1] <= 1024 * 1024:
            aspect = math.log(width / height)
            assert abs(math.log(w / h) - aspect) <= abs(math.log(nearest[0] / nearest[1]) - aspect) + 1e-9


def test_resize_is_lanczos_on_the_decoded_picture(tmp_path):
    path = tmp_path / "noise.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
    result = load_image(path)
    assert_valid(result, (192, 128))
    expected = Image.open(path).resize((192, 128), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(result.pixels, to_signed(expected))
    assert result.notices == [
        "resized from 130x90 to 192x128 (LANCZOS) so that both sides are multiples of 64; "
        "aspect ratio 1.444 -> 1.500"
    ]


def test_record_fields(tmp_path):
    path = tmp_path / "exact.png"
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    result = load_image(path)
    assert_valid(result, (128, 64))
    np.testing.assert_array_equal(result.pixels, to_signed(array))
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (result.original_size, result.format, result.mode, result.notices) == ((128, 64), "PNG", "RGB", [])
    info = check_image_path(path)
    assert (info.format, info.mode, info.size) == ("PNG", "RGB", (128, 64))
    assert info.file_bytes == path.stat().st_size


def test_control_characters_in_the_name_keep_messages_on_one_line(tmp_path):
    path = tmp_path / "été\nlines.png"  # and letters beyond ASCII stay as they are
    Image.new("RGB", (10, 10)).save(path, "PNG")
    with pytest.raises(InputError) as info:
        load_image(path)
    assert "\n" not in str(info.value) and repr(str(path)) in str(info.value) and "été" in str(info.value)


def test_bad_arguments():
    with pytest.raises(InputError, match="max_pixels"):
        load_image("unused.png", max_pixels=100)
    with pytest.raises(InputError, match="multiple"):
        load_image("unused.png", multiple=0)


# --- frames and orientation -----------------------------------------------------------------------

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


@pytest.mark.parametrize("fmt, suffix, count_text", [
    ("GIF", "gif", "first frame used (a multi-frame GIF)"),
    ("WEBP", "webp", "first frame of 3 used (WEBP)"),
    ("PNG", "png", "first frame of 3 used (PNG)"),
    ("TIFF", "tiff", "first page used (a multi-page TIFF)"),
])
def test_animations_and_pages_use_the_first_frame(tmp_path, fmt, suffix, count_text):
    frames = [Image.new("RGB", (64, 64), c) for c in COLOURS]
    path = tmp_path / f"anim.{suffix}"
    params = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    result = load_image(path)
    assert_valid(result, (64, 64))
    assert count_text in result.notices
    expected = np.asarray(Image.open(path).convert("RGB"))[32, 32]  # GIF's palette may shift a colour
    np.testing.assert_allclose(expected, COLOURS[0], atol=4)
    np.testing.assert_array_equal(result.pixels[32, 32], to_signed(expected))


def test_damaged_later_frame_does_not_spoil_the_first(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS[1]).save(buffer, "GIF")
    # After the first frame, the start of a second one whose header is cut off.
    path = write(tmp_path / "cut-short.gif", buffer.getvalue()[:-1] + b",\x00\x00\x00")
    result = load_image(path)
    assert result.notices[0].startswith("first frame used; later ones are unreadable (")
    np.testing.assert_array_equal(result.pixels[32, 32], to_signed(COLOURS[1]))


def test_mpo_uses_the_first_image(tmp_path):
    path = tmp_path / "stereo.mpo"
    second = Image.new("RGB", (64, 64))
    Image.new("RGB", (64, 64), COLOURS[0]).save(path, "MPO", save_all=True, append_images=[second])
    result = load_image(path)
    assert "first image of 2 used (MPO)" in result.notices
    np.testing.assert_allclose(result.pixels[32, 32], to_signed(COLOURS[0]), atol=4 / 127.5)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif.tobytes())
    result = load_image(path)
    upright = ImageOps.exif_transpose(Image.open(path))  # Pillow's own implementation, independent of ours
    assert_valid(result, upright.size)
    np.testing.assert_array_equal(result.pixels, to_signed(upright.convert("RGB")))
    assert result.original_size == (128, 64)
    applied = [n for n in result.notices if n.startswith("EXIF orientation")]
    assert len(applied) == (orientation != 1)
    assert all(n.startswith(f"EXIF orientation {orientation} applied: ") for n in applied)


def test_damaged_exif_becomes_notices_not_warnings(tmp_path):
    # A Make tag whose text lies past the end of the data, then a valid orientation.
    ifd = struct.pack("<HHHII", 2, 0x010F, 2, 100, 5000) + struct.pack("<HHII", 0x0112, 3, 1, 6) + bytes(4)
    path = tmp_path / "odd-camera.jpg"
    Image.new("RGB", (128, 64), "red").save(path, exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_image(path)
    assert_valid(result, (64, 128))
    assert result.notices[0] == "EXIF orientation 6 applied: rotated 90 degrees clockwise"
    assert [n for n in result.notices if n.startswith("decoder warning: ")]


# --- modes ----------------------------------------------------------------------------------------


def _save(path: Path, im: Image.Image, **params) -> Path:
    im.save(path, **params)
    return path


def test_rgba_composited_on_white(tmp_path):
    array = np.zeros((64, 64, 4), dtype=np.uint8)
    array[:, :32] = (255, 0, 0, 128)  # half-transparent red
    array[:, 32:] = (0, 0, 255, 0)  # fully transparent blue: must become white, not blue or black
    result = load_image(_save(tmp_path / "cut.png", Image.fromarray(array)))
    assert_valid(result, (64, 64))
    a = 128 / 255
    np.testing.assert_allclose(result.pixels[5, 5], to_signed([255, 255 * (1 - a), 255 * (1 - a)]), atol=1e-6)
    np.testing.assert_allclose(result.pixels[5, 50], [1, 1, 1])
    assert "transparency composited on a white background (100% of pixels not fully opaque)" in result.notices


def test_opaque_alpha_is_ignored_quietly(tmp_path):
    array = np.full((64, 64, 4), 255, dtype=np.uint8)
    array[..., :3] = 40
    result = load_image(_save(tmp_path / "opaque.png", Image.fromarray(array)))
    np.testing.assert_array_equal(result.pixels, to_signed(np.full((64, 64, 3), 40)))
    assert result.notices == []


def test_la_composited_on_white(tmp_path):
    im = Image.merge("LA", (Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 64)))
    result = load_image(_save(tmp_path / "la.png", im))
    np.testing.assert_allclose(result.pixels[0, 0], to_signed([255 * (1 - 64 / 255)] * 3), atol=1e-6)
    assert "pixel mode LA converted to RGBA" in result.notices


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_tiff(tmp_path, mode):
    # Grey 200 at alpha 100: stored premultiplied as 200 * 100 / 255 = 78.
    straight = "LA" if mode == "La" else "RGBA"
    im = Image.new(straight, (64, 64), (78, 100) if mode == "La" else (78, 78, 78, 100))
    path = write(tmp_path / "premultiplied.tiff", tiff_extra_samples(im, 1))
    with Image.open(path) as probe:
        assert probe.mode == ("La" if mode == "La" else "RGBA")  # Pillow unpremultiplies RGBa itself
    result = load_image(path)
    a = 100 / 255
    np.testing.assert_allclose(result.pixels[0, 0], to_signed([200 * a + 255 * (1 - a)] * 3), atol=2 / 127.5)


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (64, 64), 1)
    im.putpalette([0, 0, 0, 10, 20, 30, 250, 0, 0] + [0] * 759)
    im.paste(2, (0, 0, 32, 64))
    plain = load_image(_save(tmp_path / "plain.png", im))
    np.testing.assert_array_equal(plain.pixels[0, 0], to_signed([250, 0, 0]))
    np.testing.assert_array_equal(plain.pixels[0, 40], to_signed([10, 20, 30]))
    assert plain.notices == ["pixel mode P converted to RGB"]
    keyed = load_image(_save(tmp_path / "keyed.png", im, transparency=2))
    np.testing.assert_array_equal(keyed.pixels[0, 0], [1, 1, 1])  # the transparent index: white
    np.testing.assert_array_equal(keyed.pixels[0, 40], to_signed([10, 20, 30]))
    assert "pixel mode P converted to RGBA" in keyed.notices


def test_palette_with_alpha_tiff(tmp_path):
    im = Image.new("PA", (64, 64))
    im.putpalette([255, 0, 0] * 256)
    im.putalpha(0)
    result = load_image(_save(tmp_path / "pa.tiff", im))
    np.testing.assert_array_equal(result.pixels[0, 0], [1, 1, 1])


@pytest.mark.parametrize("mode, suffix, params", [
    ("L", "png", {}),
    ("1", "png", {}),
    ("1", "bmp", {}),
    ("RGB", "png", {}),
])
def test_colour_key_transparency_and_grey(tmp_path, mode, suffix, params):
    ink, paper = {"L": (90, 200), "1": (0, 1), "RGB": ((10, 20, 30), (200, 100, 0))}[mode]
    im = Image.new(mode, (64, 64), paper)
    im.paste(ink, (0, 0, 32, 64))
    expected = to_signed(np.asarray(im.convert("RGB"))[0, 0])
    if suffix == "png" and mode != "1":
        params = {"transparency": paper}
    result = load_image(_save(tmp_path / f"key.{suffix}", im, **params))
    np.testing.assert_array_equal(result.pixels[0, 0], expected)
    if "transparency" in params:
        np.testing.assert_array_equal(result.pixels[0, 40], [1, 1, 1])
    else:
        np.testing.assert_array_equal(result.pixels[0, 40], to_signed(np.asarray(im.convert("RGB"))[0, 40]))


def test_1_bit_png_with_colour_key(tmp_path):
    rows = (b"\x00" + b"\x0f" * 8) * 64  # every row: four black, four white pixels, repeated
    key = png_chunk(b"tRNS", struct.pack(">H", 1))  # white is transparent
    result = load_image(write(tmp_path / "bw.png", png_bytes(64, 64, 1, 0, rows, key)))
    np.testing.assert_array_equal(result.pixels[0, :8, 0], [-1, -1, -1, -1, 1, 1, 1, 1])
    assert "transparency composited on a white background (50% of pixels not fully opaque)" in result.notices


def test_16_bit_grey_png_scaled_by_its_range(tmp_path):
    values = np.zeros((64, 64), dtype=np.uint16)
    values[:, 16:32] = 65535
    values[:, 32:48] = 32768
    values[:, 48:] = 257  # 1/255 of the range: would be white if scaled by the data's min/max
    path = _save(tmp_path / "grey16.png", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"
    result = load_image(path)
    assert_valid(result, (64, 64))
    expected = [-1, 1, 32768 / 65535 * 2 - 1, 2 / 255 - 1]
    np.testing.assert_allclose(result.pixels[0, [0, 20, 40, 60], 0], expected, atol=1e-6)
    assert "I;16 grey samples scaled by their full range 0..65535 (not by the data's range)" in result.notices


def test_16_bit_grey_png_with_colour_key(tmp_path):
    values = np.full((64, 64), 1000, dtype=">u2")
    values[:, 32:] = 4242
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    key = png_chunk(b"tRNS", struct.pack(">H", 4242))
    path = write(tmp_path / "key16.png", png_bytes(64, 64, 16, 0, rows, key))
    result = load_image(path)
    np.testing.assert_allclose(result.pixels[0, 0], 1000 / 65535 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(result.pixels[0, 40], [1, 1, 1])
    assert "transparent colour key 4242 composited on a white background" in result.notices


def test_16_bit_grey_tiff_big_endian(tmp_path):
    im = Image.new("I;16B", (64, 64))
    im.paste(65535, (0, 0, 32, 64))
    result = load_image(_save(tmp_path / "grey16b.tiff", im))
    np.testing.assert_array_equal(result.pixels[0, [0, 40], 0], [1, -1])


def test_48_bit_colour_png(tmp_path):
    pixel = struct.pack(">HHH", 65535, 0, 0x8000)
    rows = (b"\x00" + pixel * 64) * 64
    result = load_image(write(tmp_path / "deep.png", png_bytes(64, 64, 16, 2, rows)))
    np.testing.assert_array_equal(result.pixels[0, 0], to_signed([255, 0, 128]))
    assert "16-bit samples reduced to 8 bits by the decoder (RGB;16B)" in result.notices


def test_32_bit_integer_tiff_scaled_by_its_declared_range(tmp_path):
    values = np.zeros((64, 64), dtype=np.int32)
    values[:, 16:] = 2**31 - 1
    values[:, 32:] = 2**30
    values[:, 48:] = -7  # negative samples are below black
    result = load_image(_save(tmp_path / "int32.tiff", Image.fromarray(values)))
    np.testing.assert_allclose(result.pixels[0, [0, 20, 40, 60], 0], [-1, 1, 0, -1], atol=1e-6)
    notice = "I grey samples scaled by their full range 0..2147483647 (not by the data's range)"
    assert notice in result.notices


def test_float_tiff_taken_as_unit_range(tmp_path):
    values = np.full((64, 64), 0.25, dtype=np.float32)
    values[:, 16:32] = 7.5  # clipped to white
    values[:, 32:48] = -2.0  # clipped to black
    values[0, 48:] = np.nan  # 16 samples, set to black
    path = _save(tmp_path / "float.tiff", Image.fromarray(values))
    assert Image.open(path).mode == "F"
    result = load_image(path)
    assert_valid(result, (64, 64))
    np.testing.assert_allclose(result.pixels[1, [0, 20, 40, 60], 0], [-0.5, 1, -1, -0.5], atol=1e-6)
    np.testing.assert_array_equal(result.pixels[0, 60], [-1, -1, -1])
    assert "32-bit float samples taken as 0..1 (50.0% clipped, 16 not finite set to 0)" in result.notices


@pytest.mark.parametrize("mode, colour, suffix", [
    ("CMYK", (0, 255, 255, 0), "tiff"),
    ("CMYK", (0, 255, 255, 0), "jpg"),
    ("YCbCr", (120, 90, 200), "tiff"),
    ("LAB", (128, 150, 100), "tiff"),
])
def test_other_colour_spaces_converted_to_rgb(tmp_path, mode, colour, suffix):
    path = _save(tmp_path / f"{mode}.{suffix}", Image.new(mode, (64, 64), colour))
    with Image.open(path) as probe:
        assert probe.mode == mode
        expected = np.asarray(probe.convert("RGB"))[0, 0]
    if mode == "CMYK":
        np.testing.assert_allclose(expected, [255, 0, 0], atol=3)  # plain red
    result = load_image(path)
    np.testing.assert_array_equal(result.pixels[0, 0], to_signed(expected))
    assert any(n.startswith(f"pixel mode {mode} converted to RGB") for n in result.notices)


# --- fuzz -----------------------------------------------------------------------------------------


def _fuzz_seeds() -> dict[str, bytes]:
    """Small valid files of every supported container and a spread of modes."""
    rng = np.random.default_rng(2024)
    rgb = Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (72, 80, 4), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = {}

    def add(name, im, fmt, **params):
        buffer = io.BytesIO()
        im.save(buffer, fmt, **params)
        seeds[name] = buffer.getvalue()

    frames = [rgb, rgb.transpose(Image.Transpose.ROTATE_180)]
    add("rgb.png", rgb, "PNG")
    add("rgba.png", rgba, "PNG")
    add("p-trns.png", rgb.convert("P"), "PNG", transparency=3)
    add("grey16.png", Image.fromarray(rng.integers(0, 65536, (72, 80), dtype=np.uint16)), "PNG")
    add("anim.png", rgb, "PNG", save_all=True, append_images=frames[1:])
    add("exif.jpg", rgb, "JPEG", exif=exif.tobytes(), quality=80)
    add("progressive.jpg", rgb.convert("L"), "JPEG", progressive=True)
    add("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    add("anim.gif", frames[0].convert("P"), "GIF", save_all=True, append_images=[frames[1].convert("P")])
    add("lossy.webp", rgba, "WEBP", quality=50)
    add("anim.webp", rgb, "WEBP", lossless=True, save_all=True, append_images=frames[1:])
    add("rgb.bmp", rgb, "BMP")
    add("lzw.tiff", rgb, "TIFF", compression="tiff_lzw")
    add("float.tiff", Image.fromarray(rng.random((72, 80), dtype=np.float32)), "TIFF")
    add("pages.tiff", rgb, "TIFF", save_all=True, append_images=[rgba])
    return seeds


MAGIC = [
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"BM", b"II*\x00", b"MM\x00*",
]


def _mutate(data: bytes, rng: np.random.Generator, kind: int) -> bytes:
    b = bytearray(data)
    if kind == 0:  # truncated at a random point
        return bytes(b[: int(rng.integers(1, len(b)))])
    if kind == 1:  # a few flipped bytes anywhere
        for at in rng.integers(0, len(b), int(rng.integers(1, 9))):
            b[at] ^= int(rng.integers(1, 256))
        return bytes(b)
    if kind == 2:  # a random run of bytes in the header
        start = int(rng.integers(0, min(len(b), 64)))
        length = int(rng.integers(1, 24))
        b[start : start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        return bytes(b)
    if kind == 3:  # garbage behind a real signature
        magic = MAGIC[int(rng.integers(0, len(MAGIC)))]
        return magic + rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
    # a span removed or repeated: shifts every later structure
    start = int(rng.integers(0, len(b)))
    end = min(len(b), start + int(rng.integers(1, 200)))
    return bytes(b[:start] + (b"" if kind == 4 else b[start:end]) + b[start:])


def test_fuzz_malformed_files(tmp_path):
    rng = np.random.default_rng(7)
    seeds = _fuzz_seeds()
    outcomes = {"valid": 0, "refused": 0}
    for seed_name, data in seeds.items():
        for i in range(20):
            kind = i % 6
            path = write(tmp_path / f"{i:02d}-{kind}-{seed_name}", _mutate(data, rng, kind))
            # A hard backstop for a true hang in C code; the assertion below reports slow files.
            faulthandler.dump_traceback_later(60, exit=True)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # decoder warnings must become notices
                    result = load_image(path)
            except InputError as e:
                assert "\n" not in str(e) and str(path) in str(e)
                outcomes["refused"] += 1
            else:
                w, h = result.size
                assert w % 64 == 0 and h % 64 == 0
                assert_valid(result, (w, h))
                outcomes["valid"] += 1
            finally:
                faulthandler.cancel_dump_traceback_later()
            elapsed = time.perf_counter() - start
            assert elapsed < 10, f"{path.name} took {elapsed:.1f} s"
    # Both ends are exercised: flipped pixel bytes still decode, broken headers do not.
    assert outcomes["valid"] >= 20 and outcomes["refused"] >= 100, outcomes


def test_target_size_can_upscale_to_an_area():
    """A run's default working size: the model's native area at the picture's aspect ratio, up or
    down, never above the area."""
    assert target_size(300, 200, multiple=64, max_pixels=512 * 512) == (320, 192)
    assert target_size(300, 200, multiple=64, max_pixels=512 * 512, upscale=True) == (576, 384)
    assert target_size(2000, 1500, multiple=64, max_pixels=512 * 512, upscale=True) == (576, 448)
    assert target_size(64, 64, multiple=64, max_pixels=1024 * 1024, upscale=True) == (1024, 1024)


def test_a_picture_loaded_at_a_chosen_size_says_nothing_of_the_resize(tmp_path):
    """The plan chose the size and says why; the loader only reports what else it did."""
    path = tmp_path / "p.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    loaded = load_image(path, multiple=64)
    assert loaded.size == (320, 192) and loaded.upright_size == (300, 200)
    assert loaded.resized is not None and loaded.resized in loaded.notices
    chosen = load_image(path, multiple=64, size=(128, 192))
    assert chosen.size == (128, 192) and chosen.pixels.shape == (192, 128, 3)
    assert chosen.notices == [] and chosen.resized is None and chosen.sha256 == loaded.sha256
    with pytest.raises(InputError, match=r"size 63x64 \(width x height\): the sides must be multiples of 8"):
        load_image(path, size=(63, 64))  # it gave a picture the generations then refused
    assert load_image(path, size=(96, 72)).pixels.shape == (72, 96, 3)  # any multiple of 8, as they take

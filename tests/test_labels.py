"""Pictures that label themselves: every label fits its place at every cell size from 64 px up
(wrapped or shrunk, never cut), the time-aligned triangle's column headers, the x_t | x0 marks,
the noising strip's path, labelled animation frames and the triangle animation's noising frames."""

import numpy as np
import pytest
from PIL import Image

from stable_diffusion import render
from stable_diffusion.render import FONT_SIZE, MIN_FONT_SIZE, TEXT_PAD, fit_text, text_width

import commands
from commands import sidecar


def run(*args):
    return commands.run("image2image.py", *args, check=True)


def ink(region) -> bool:
    return bool((np.asarray(region) != 255).any())


# --- the layout of one label ----------------------------------------------------------------------


@pytest.mark.parametrize("width", [24, 40, 64, 65, 96, 128, 512])
def test_fit_text_never_exceeds_the_room_and_keeps_every_letter(width):
    texts = ["0/10 t=1000 sigma=14.61", "10/10 PSNR 21.8 dB", "s=0.125", "t=999.023",
             "noising path: independent (fresh noise per t)", "x0_pred", "supercalifragilistic=1234567"]
    for text in texts:
        fitted = fit_text(text, width)
        assert fitted.width <= max(1, width - 2 * TEXT_PAD), (text, width, fitted)
        assert "".join("".join(fitted.lines).split()) == "".join(text.split())  # nothing dropped


def test_fit_text_wraps_between_words_first_then_shrinks_then_breaks():
    one_line = fit_text("t=300", 64)
    assert one_line.lines == ("t=300",) and one_line.size == FONT_SIZE
    wrapped = fit_text("0/10 t=1000 sigma=14.61", 64)  # 64 px cells: the words fit, the line does not
    assert wrapped.size == FONT_SIZE and len(wrapped.lines) == 2
    assert [w for line in wrapped.lines for w in line.split()] == ["0/10", "t=1000", "sigma=14.61"]
    word = "sigma=14.61"  # too wide at the default size for a 56 px band
    assert text_width(word) > 52
    shrunk = fit_text(word, 56)
    assert MIN_FONT_SIZE <= shrunk.size < FONT_SIZE and shrunk.lines == (word,)
    broken = fit_text("abcdefghijklmnopqrstuvwxyz", 30)
    assert broken.size == MIN_FONT_SIZE and len(broken.lines) > 1
    assert "".join(broken.lines) == "abcdefghijklmnopqrstuvwxyz"


def test_caption_bands_grow_with_the_lines_and_nothing_reaches_a_cells_edge():
    h = w = 64
    rows = [[np.full((h, w, 3), 0, np.uint8)] * 3]
    captions = [["0/10 t=1000 sigma=14.61", "5/10 t=500 sigma=1.61", "10/10 PSNR 21.8 dB"]]
    picture = render.triangle(rows, h, w, cell_labels=captions, row_labels=["s=0.125"], pad=2)
    label_width = text_width("s=0.125") + 2 * TEXT_PAD + 2
    caption_height = render.band_height(captions[0], w)
    assert caption_height == 2 * render.line_height() + 4  # two lines each
    assert picture.shape[:2] == render.triangle_size(1, 3, h, w, 2, label_width, caption_height)
    for c in range(3):
        x = label_width + 2 + c * (w + 2)
        band = picture[2 + h:2 + h + caption_height, x:x + w]
        assert ink(band) and not ink(band[:, -1:]), c  # drawn, and clear of the cell's right edge


def test_time_aligned_triangle_has_column_headers():
    h = w = 64
    rows = [[np.zeros((h, w, 3), np.uint8)] * 2, [np.zeros((h, w, 3), np.uint8)] * 3]
    times = [[500.0, 0.0], [1000.0, 500.0, 0.0]]
    headers = [f"t={t:g}" for t in render.triangle_columns(times)[0]]
    assert headers == ["t=1000", "t=500", "t=0"]
    picture = render.triangle(rows, h, w, align="time", times=times, column_labels=headers, pad=2)
    header = render.band_height(headers, w)
    assert picture.shape[:2] == render.triangle_size(2, 3, h, w, 2, header_height=header)
    for c in range(3):
        assert ink(picture[:header, 2 + c * (w + 2):2 + c * (w + 2) + w])
    with pytest.raises(ValueError, match="column labels"):
        render.triangle(rows, h, w, align="time", times=times, column_labels=headers[:2])


def test_strip_title_and_marked_parts():
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    plain = render.strip(frames, ["t=0", "t=500"])
    titled = render.strip(frames, ["t=0", "t=500"], title="noising path: markov (the chain built from the betas)")
    extra = titled.shape[0] - plain.shape[0]
    assert extra == render.band_height(["noising path: markov (the chain built from the betas)"], 128)
    assert ink(titled[:extra]) and np.array_equal(titled[extra:], plain)
    both = np.zeros((64, 128, 3), np.uint8)
    marked = render.marked_parts(both, ("x_t", "x0_pred"))
    assert marked.shape == (64 + render.band_height(["x_t", "x0_pred"], 64), 128, 3)
    assert ink(marked[64:, :64]) and ink(marked[64:, 64:])
    with pytest.raises(ValueError, match="equal parts"):
        render.marked_parts(np.zeros((4, 5, 3), np.uint8), ("a", "b"))


# --- the command's pictures --------------------------------------------------------------------------


def _check_labels_fit(record: dict, width: int, label_width: int) -> None:
    """Every label the triangle drew fits its place, measured as the renderer measures it, at the
    default size (wrapped between words, no word broken)."""
    labels = record["labels"]
    for text in [t for row in labels["cells"] for t in row] + labels.get("columns", []):
        fitted = fit_text(text, width)
        assert fitted.width <= width - 2 * TEXT_PAD, text
        assert fitted.size == FONT_SIZE and [w for line in fitted.lines for w in line.split()] == text.split()
    for text in labels["rows"]:
        assert text_width(text) <= label_width - 2 * TEXT_PAD, text


def test_triangle_labels_at_64_px_cells_fit_and_are_not_cut(tmp_path, picture, sd2):
    out = tmp_path / "tri.png"
    run(picture, "a barn", "--model", sd2, "--steps", 10, "-gt", "--labels", "-sd", 2, "--seed", 1,
        "--triangle_strengths", "0.125,0.5,1", "--output", out)
    record = next(f for f in sidecar(tmp_path / "tri.json")["files"] if f["kind"] == "triangle")
    assert record["cell_size"] == [64, 64]
    label_width = max(render.label_margins()[0], max(text_width(t) for t in record["labels"]["rows"]) + 6)
    _check_labels_fit(record, 64, label_width)
    cells = record["labels"]["cells"]
    assert cells[-1][0] == "0/10 t=1000 sigma=14.61" and cells[-1][-1].startswith("10/10 PSNR ")
    caption = render.band_height([t for row in cells for t in row], 64)
    tri = np.array(Image.open(out).convert("RGB"))
    assert tri.shape[:2] == render.triangle_size(3, 6, 64, 64, 2, label_width, caption)
    for r, row in enumerate(reversed(cells)):  # lowest strength at the bottom
        y = 2 + r * (64 + caption + 2) + 64
        for c in range(len(row)):
            x = label_width + 2 + c * 66
            band = tri[y:y + caption, x:x + 64]
            assert ink(band) and not ink(band[:, -1:]), (r, c)


def test_time_aligned_triangle_labels_columns_at_64_px(tmp_path, picture, sd2):
    out = tmp_path / "tri.png"
    run(picture, "a barn", "--model", sd2, "--steps", 6, "-gt", "--labels", "--triangle_align", "time",
        "--triangle_strengths", "0.5,1", "--seed", 1, "--output", out)
    record = next(f for f in sidecar(tmp_path / "tri.json")["files"] if f["kind"] == "triangle")
    columns = record["labels"]["columns"]
    times = [[c["t"] for c in row["cells"]] for row in record["rows"]]
    assert columns == [f"t={t:g}" for t in render.triangle_columns(times)[0]] and columns[0] == "t=1000"
    assert f"Cells: triangle 2 rows x {len(columns)} columns," in Image.open(out).text["parameters"]
    _check_labels_fit(record, 64, render.label_margins()[0])
    tri = np.array(Image.open(out).convert("RGB"))
    header = render.band_height(columns, 64)
    caption = render.band_height([t for row in record["labels"]["cells"] for t in row], 64)
    assert tri.shape[:2] == render.triangle_size(2, len(columns), 64, 64, 2, render.label_margins()[0],
                                                 caption, header)
    assert ink(tri[:header])
    # rows of their own levels (karras): more columns than the longest row has cells, said as drawn
    run(picture, "a barn", "--model", sd2, "--steps", 13, "-gt", "--triangle_align", "time", "--sampler",
        "dpmpp_2m", "--schedule", "karras", "--triangle_strengths", "0.333,0.9999,1", "--seed", 1, "--output", out)
    record = next(f for f in sidecar(tmp_path / "tri.json")["files"] if f["kind"] == "triangle")
    times = [[c["t"] for c in row["cells"]] for row in record["rows"]]
    drawn = len(render.triangle_columns(times)[0])
    assert drawn > max(map(len, times)) and f"x {drawn} columns," in Image.open(out).text["parameters"]


def test_snapshot_both_marks_noising_strip_path_and_labelled_animation(tmp_path, picture, sd2):
    out = tmp_path / "a.png"
    run(picture, "a barn", "--model", sd2, "--steps", 4, "--strength", 1, "--seed", 2, "-sd", 2,
        "--snapshot", "both", "--show_noising", 500, "--noising_path", "independent", "--animate",
        "--labels", "--output", out)
    # one size, the start's too; the estimate's half says its own time (made at the step before)
    marks = render.band_height(["x_t", "no x0_pred yet", "x0_pred from t=999.999"], 64)
    step = np.array(Image.open(tmp_path / "a.step-002.png").convert("RGB"))
    assert step.shape[:2] == (64 + marks, 128) and ink(step[64:, :64]) and ink(step[64:, 64:])
    frame = next(f for f in sidecar(tmp_path / "a.json")["files"] if f["file"] == "a.step-002.png")
    assert (frame["t"], frame["x0_t"]) == (500, 750)
    said = render.marked_parts(np.zeros((64, 128, 3), np.uint8), ["x_t", "x0_pred from t=750"],
                               also=["no x0_pred yet", "x0_pred from t=999.999"])[64:]
    assert np.array_equal(step[64:], said)
    title = render.band_height(["noising path: independent (fresh noise per t)"], 3 * 64)
    strip = np.array(Image.open(tmp_path / "a.noise-strip.png").convert("RGB"))
    assert strip.shape[0] == title + 64 + render.band_height(["t=1000"], 64) and ink(strip[:title])
    texts = ["independent noising t=0", "s=1 step 4/4 t=0 sigma=0.00"]
    band = render.band_height(texts, 128)
    with Image.open(tmp_path / "a.anim.gif") as gif:
        assert gif.n_frames == 3 + 3  # noising t=0, 500, 1000; steps 0, 2, 4
        assert gif.size == (128, 64 + marks + band)
        gif.seek(0)
        first = np.array(gif.convert("RGB"))
        assert ink(first[64 + marks:]) and not ink(first[:64, 64:])  # a noising frame, padded, labelled


def test_triangle_animation_runs_down_the_noising_path_then_back_along_the_top_row(tmp_path, picture, sd2):
    out = tmp_path / "t.png"
    run(picture, "a barn", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "0.5,1",
        "--show_noising", 250, "-sd", 1, "--animate", "--seed", 3, "--output", out)
    noise = [np.array(Image.open(tmp_path / f"t.noise-t{t:04d}.png").convert("RGB"))
             for t in (0, 250, 500, 750, 1000)]
    with Image.open(tmp_path / "t.anim.gif") as gif:
        assert gif.n_frames == 5 + 4  # the path t=0 .. 1000, then steps 1..4 of the top row
        shown = []
        for k in range(5):
            gif.seek(k)
            shown.append(np.array(gif.convert("RGB")).astype(int))
    for k, frame in enumerate(shown):  # GIF's palette makes them near, not equal: the nearest
        distances = [np.abs(frame - n).mean() for n in noise]
        assert int(np.argmin(distances)) == k, distances

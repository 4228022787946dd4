"""Pixels, composites, latent previews and animations, checked pixel by pixel and on real files."""

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.render import (
    CURVE_COLOURS,
    LATENT_RGB,
    WHITE,
    approx_decode,
    band_height,
    colour_patches,
    curve_plot,
    fit_latent_rgb,
    grid,
    label,
    label_margins,
    save_animation,
    strip,
    to_uint8,
    triangle,
    triangle_columns,
    triangle_size,
)

H, W = 6, 5


def frames(n, h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def cell(picture, r, c, pad, h=H, w=W, label_width=0, caption_height=0):
    y = pad + r * (h + caption_height + pad)
    x = label_width + pad + c * (w + pad)
    return picture[y:y + h, x:x + w]


def is_background(region, colour=WHITE):
    return bool((region == np.array(colour, np.uint8)).all())


# --- pixels ----------------------------------------------------------------------------------


def test_to_uint8_rounds_and_clips():
    x = np.array([[0.0, 0.49 / 255, 0.51 / 255, 254.6 / 255, 1.0, -0.3, 1.7]], np.float32)
    out = to_uint8(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 1, 255, 255, 0, 255]])


def test_to_uint8_keeps_nhwc_shape():
    x = np.random.default_rng(0).random((2, 4, 3, 3), dtype=np.float32)
    out = to_uint8(x)
    assert out.shape == (2, 4, 3, 3)
    assert np.abs(out.astype(np.float32) - x * 255).max() <= 0.5 + 1e-4


# --- composites ------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, 3])
def test_grid_is_row_major_with_background_left_over(pad):
    images = frames(5)
    picture = grid(images, n_rows=2, pad=pad)
    assert picture.shape[:2] == triangle_size(2, 3, H, W, pad)
    for i in range(5):
        np.testing.assert_array_equal(cell(picture, i // 3, i % 3, pad), images[i])
    assert is_background(cell(picture, 1, 2, pad))
    if pad:
        assert is_background(picture[:pad]) and is_background(picture[:, :pad])


def test_grid_refuses_impossible_rows():
    with pytest.raises(ValueError):
        grid(frames(3), n_rows=4)
    with pytest.raises(ValueError):
        grid(frames(3).astype(np.float32), n_rows=1)


def test_strip_places_frames_left_to_right():
    images = frames(4)
    picture = strip(images, pad=1)
    assert picture.shape == (*triangle_size(1, 4, H, W, 1), 3)
    for i in range(4):
        np.testing.assert_array_equal(cell(picture, 0, i, 1), images[i])


def test_strip_with_labels_adds_a_caption_band_and_keeps_frames():
    images = frames(3, h=20, w=40)
    _, caption_height = label_margins()
    picture = strip(images, labels=["0/3", "1/3", "3/3"])
    assert picture.shape[:2] == triangle_size(1, 3, 20, 40, 0, 0, caption_height)
    for i in range(3):
        np.testing.assert_array_equal(cell(picture, 0, i, 0, 20, 40, 0, caption_height), images[i])
        band = picture[20:, i * 40:(i + 1) * 40]
        assert not is_background(band)  # text was drawn
    assert not np.array_equal(picture[20:, :40], picture[20:, 40:80])


def test_label_appends_a_band():
    image = frames(1, 16, 30)[0]
    out = label(image, "t=300", caption_height=12)
    assert out.shape == (28, 30, 3)
    np.testing.assert_array_equal(out[:16], image)
    assert not is_background(out[16:])


def make_rows(lengths):
    data = frames(sum(lengths), seed=1)
    rows, i = [], 0
    for n in lengths:
        rows.append(list(data[i:i + n]))
        i += n
    return rows


@pytest.mark.parametrize("pad", [0, 2])
def test_triangle_low_bottom_left_aligned_exact_cells(pad):
    lengths = [2, 3, 5, 1]  # increasing strength; any lengths are allowed
    rows = make_rows(lengths)
    picture = triangle(rows, H, W, pad=pad)
    assert picture.shape[:2] == triangle_size(4, 5, H, W, pad)
    for s, row in enumerate(rows):
        r = len(rows) - 1 - s  # the lowest strength is the bottom row
        for c in range(5):
            got = cell(picture, r, c, pad)
            if c < len(row):
                np.testing.assert_array_equal(got, row[c])
            else:
                assert is_background(got)


def test_triangle_low_top_flips_the_rows():
    rows = make_rows([1, 2, 3])
    top = triangle(rows, H, W, order="low_top", pad=1, background=(10, 20, 30))
    bottom = triangle(rows, H, W, order="low_bottom", pad=1, background=(10, 20, 30))
    np.testing.assert_array_equal(cell(top, 0, 0, 1), rows[0][0])
    np.testing.assert_array_equal(cell(bottom, 2, 0, 1), rows[0][0])
    assert is_background(cell(top, 0, 2, 1), (10, 20, 30))
    np.testing.assert_array_equal(cell(top, 2, 2, 1), rows[2][2])


def test_triangle_with_labels_has_the_predicted_size_and_exact_cells():
    h, w, pad = 24, 48, 2
    rows = [list(frames(n, h, w, seed=n)) for n in (2, 3, 4)]
    strengths = ["s=0.30", "s=0.60", "s=1.00"]
    captions = [[f"{k}/{len(row) - 1} t={300 * (k + 1)}" for k in range(len(row))] for row in rows]
    picture = triangle(rows, h, w, row_labels=strengths, cell_labels=captions, pad=pad)
    label_width = label_margins()[0]
    caption_height = band_height([c for row in captions for c in row], w)
    assert caption_height > label_margins()[1]  # "1/2 t=600" is wider than 48 px: two lines
    assert picture.shape[:2] == triangle_size(3, 4, h, w, pad, label_width, caption_height)
    for s, row in enumerate(rows):
        r = 2 - s
        y = pad + r * (h + caption_height + pad)
        assert not is_background(picture[y:y + h, :label_width])  # the strength label
        for c, frame in enumerate(row):
            np.testing.assert_array_equal(
                cell(picture, r, c, pad, h, w, label_width, caption_height), frame)
            x = label_width + pad + c * (w + pad)
            assert not is_background(picture[y + h:y + h + caption_height, x:x + w])


def test_triangle_explicit_margins_and_only_one_kind_of_label():
    rows = make_rows([1, 2])
    picture = triangle(rows, H, W, row_labels=["a", "b"], pad=0, label_width=9)
    assert picture.shape[:2] == triangle_size(2, 2, H, W, 0, 9, 0)
    np.testing.assert_array_equal(cell(picture, 0, 1, 0, label_width=9), rows[1][1])
    picture = triangle(rows, H, W, cell_labels=[["x"], ["y", "z"]], pad=0, caption_height=7)
    assert picture.shape[:2] == triangle_size(2, 2, H, W, 0, 0, 7)


def test_triangle_checks_its_input():
    rows = make_rows([1, 2])
    with pytest.raises(ValueError, match="order"):
        triangle(rows, H, W, order="sideways")
    with pytest.raises(ValueError, match="row labels"):
        triangle(rows, H, W, row_labels=["only one"])
    with pytest.raises(ValueError, match="shape"):
        triangle(rows, H, W, cell_labels=[["a"], ["b"]])
    with pytest.raises(ValueError, match="cells"):
        triangle(rows, H + 1, W)
    with pytest.raises(ValueError, match="empty"):
        triangle([[], []], H, W)


# --- latent preview --------------------------------------------------------------------------


def test_approx_decode_pins_the_published_factors():
    z = np.zeros((1, 1, 2, 4), np.float32)
    z[0, 0, 1] = [1.0, 0.0, 0.0, -1.0]
    sd = approx_decode(z, "sd", factor=1)
    np.testing.assert_allclose(sd[0, 0, 0], [0.5, 0.5, 0.5])
    # ((0.3512, 0.2297, 0.3227) - (-0.2120, -0.2616, -0.7177) + 1) / 2
    np.testing.assert_allclose(sd[0, 0, 1], [0.7816, 0.74565, 1.0], atol=1e-6)
    xl = approx_decode(z, "sdxl", factor=1)
    np.testing.assert_allclose(xl[0, 0, 0], [0.5542, 0.49125, 0.49945], atol=1e-6)
    assert set(LATENT_RGB) == {"sd", "sdxl"}


def test_approx_decode_upsamples_by_nearest_and_stays_in_range():
    z = np.random.default_rng(0).normal(0, 4, (2, 3, 5, 4)).astype(np.float32)
    out = approx_decode(z, "sdxl")
    assert out.shape == (2, 24, 40, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    small = approx_decode(z, "sdxl", factor=1)
    for dy in range(8):
        for dx in range(8):
            np.testing.assert_array_equal(out[:, dy::8, dx::8], small)


def test_a_fitted_latent_map_recovers_a_linear_decoder_and_previews_with_it():
    """fit_latent_rgb on pictures that a known linear map made from latents gives that map back."""
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(0, 0.1, (4, 3)).astype(np.float32), np.array([0.1, -0.2, 0.05], np.float32)
    z = rng.normal(0, 1, (2, 6, 5, 4)).astype(np.float32)
    pictures = ((z @ weight + bias + 1) / 2).repeat(8, axis=1).repeat(8, axis=2)
    assert pictures.min() > 0 and pictures.max() < 1  # no value is clipped by the preview
    fitted = fit_latent_rgb(z, pictures, 8)
    np.testing.assert_allclose(fitted[0], weight, atol=1e-5)
    np.testing.assert_allclose(fitted[1], bias, atol=1e-5)
    np.testing.assert_allclose(approx_decode(z, fitted), pictures, atol=1e-5)
    patches = colour_patches(side=64, cell=16)
    assert patches.shape == (1, 64, 64, 3) and len(np.unique(patches.reshape(-1, 3), axis=0)) == 16


def test_approx_decode_refuses_unknown_families_and_shapes():
    with pytest.raises(ValueError, match="family"):
        approx_decode(np.zeros((1, 2, 2, 4)), "flux")
    with pytest.raises(ValueError, match="latents"):
        approx_decode(np.zeros((1, 2, 2, 16)), "sd")


# --- animation -------------------------------------------------------------------------------


def flat_frames(n, h=16, w=12):
    # Few colours, so that GIF's palette holds every pixel exactly.
    colours = np.array([[255, 0, 0], [0, 128, 255], [20, 200, 20], [0, 0, 0]], np.uint8)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = colours[i % 4]
        out[i, : i + 1, :] = colours[(i + 1) % 4]
    return out


@pytest.mark.parametrize("fmt,options", [("gif", {}), ("webp", {"lossless": True})])
def test_save_animation_frames_loop_and_pixels(tmp_path, fmt, options):
    sequence = flat_frames(6)
    path = save_animation(tmp_path / "sub" / f"anim.{fmt}", sequence, 120, fmt=fmt, **options)
    with Image.open(path) as im:
        assert im.format == fmt.upper()
        assert im.n_frames == 6 and im.size == (12, 16)
        assert im.info["loop"] == 0
        for i in range(6):
            im.seek(i)
            pixels = np.asarray(im.convert("RGB"))  # WebP reads a frame's duration on load
            assert im.info["duration"] == 120
            np.testing.assert_array_equal(pixels, sequence[i])
    assert [p.name for p in path.parent.iterdir()] == [f"anim.{fmt}"]


def test_save_animation_lossy_webp_and_per_frame_durations(tmp_path):
    sequence = frames(3, 32, 32)
    path = save_animation(tmp_path / "a.webp", sequence, [100, 200, 300], fmt="webp")
    with Image.open(path) as im:
        assert im.n_frames == 3
        durations = []
        for i in range(3):
            im.seek(i)
            im.load()
            durations.append(im.info["duration"])
    assert durations == [100, 200, 300]


def test_save_animation_refuses_mixed_sizes_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="same size"):
        save_animation(tmp_path / "a.gif", [frames(1)[0], frames(1, H + 1)[0]], 100)
    with pytest.raises(ValueError, match="format"):
        save_animation(tmp_path / "a.mp4", frames(2), 100, fmt="mp4")
    assert list(tmp_path.iterdir()) == []


# --- the time-aligned triangle ---------------------------------------------------------------


def test_triangle_columns_are_the_distinct_times_highest_first():
    times = [[200.0, 100.0, 0.0], [300.0, 150.00000001, 0.0], [400.0, 299.99999, 200.0, 0.0]]
    columns, where = triangle_columns(times)
    assert columns == [400.0, 300.0, 200.0, 150.00000001, 100.0, 0.0]
    assert where == [[2, 4, 5], [1, 3, 5], [0, 1, 2, 5]]


def test_triangle_time_aligned_puts_each_cell_in_its_time_column():
    lengths = [3, 3, 4]  # s = 0.2, 0.3, 0.4
    rows = make_rows(lengths)
    times = [[200, 100, 0], [300, 150, 0], [400, 300, 200, 0]]
    pad = 1
    picture = triangle(rows, H, W, pad=pad, align="time", times=times)
    assert picture.shape[:2] == triangle_size(3, 6, H, W, pad)  # columns 400 300 200 150 100 0
    expected = {  # (visual row, column) -> (row, cell); lowest strength at the bottom
        (2, 2): (0, 0), (2, 4): (0, 1), (2, 5): (0, 2),
        (1, 1): (1, 0), (1, 3): (1, 1), (1, 5): (1, 2),
        (0, 0): (2, 0), (0, 1): (2, 1), (0, 2): (2, 2), (0, 5): (2, 3),
    }
    for r in range(3):
        for c in range(6):
            got = cell(picture, r, c, pad)
            if (r, c) in expected:
                i, k = expected[(r, c)]
                np.testing.assert_array_equal(got, rows[i][k])
            else:
                assert is_background(got)
    # The start points lie on the diagonal (top-left to bottom-right), the finals in one column.
    for s in range(3):
        np.testing.assert_array_equal(cell(picture, 2 - s, 2 - s, pad), rows[s][0])
        np.testing.assert_array_equal(cell(picture, 2 - s, 5, pad), rows[s][-1])


def test_triangle_time_aligned_low_top_with_labels_skips_empty_cells():
    h, w, pad = 20, 40, 2
    rows = [list(frames(n, h, w, seed=n)) for n in (2, 3)]
    times = [[100.0, 0.0], [200.0, 100.0, 0.0]]
    captions = [[f"t={t:g}" for t in row] for row in times]
    picture = triangle(rows, h, w, order="low_top", row_labels=["s=0.1", "s=0.2"],
                       cell_labels=captions, pad=pad, align="time", times=times)
    label_width, caption_height = label_margins()
    assert picture.shape[:2] == triangle_size(2, 3, h, w, pad, label_width, caption_height)
    np.testing.assert_array_equal(cell(picture, 0, 1, pad, h, w, label_width, caption_height), rows[0][0])
    np.testing.assert_array_equal(cell(picture, 1, 0, pad, h, w, label_width, caption_height), rows[1][0])
    x = label_width + pad  # column 0 of the top row (s=0.1 starts at t=100): frame and caption
    assert is_background(picture[pad:pad + h + caption_height, x:x + w])
    y = pad + h  # the caption band of the top row
    x = label_width + pad + 1 * (w + pad)
    assert not is_background(picture[y:y + caption_height, x:x + w])


def test_triangle_default_is_steps_and_times_change_nothing_there():
    rows = make_rows([1, 2])
    times = [[100.0], [200.0, 0.0]]
    np.testing.assert_array_equal(triangle(rows, H, W), triangle(rows, H, W, times=times))
    np.testing.assert_array_equal(triangle(rows, H, W), triangle(rows, H, W, align="steps"))


def test_triangle_time_aligned_checks_its_input():
    rows = make_rows([2, 2])
    with pytest.raises(ValueError, match="align"):
        triangle(rows, H, W, align="noise")
    with pytest.raises(ValueError, match="times="):
        triangle(rows, H, W, align="time")
    with pytest.raises(ValueError, match="shape of rows"):
        triangle(rows, H, W, align="time", times=[[1.0, 0.0], [0.0]])
    with pytest.raises(ValueError, match="decrease"):
        triangle(rows, H, W, align="time", times=[[0.0, 100.0], [200.0, 0.0]])
    with pytest.raises(ValueError, match="two cells"):
        triangle(rows, H, W, align="time", times=[[100.0, 99.9999], [200.0, 0.0]])


# --- the curve plot --------------------------------------------------------------------------


def records(n, start_t=1000.0, peak=None, seed=0):
    """A made-up curve: detail rising to a peak (the last step unless given), change falling."""
    peak = n if peak is None else peak
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n + 1):
        out.append({"step": k, "t": start_t * (1 - k / n), "sigma": 1.0,
                    "x0_detail": None if k == 0 else 1.0 - abs(k - peak) / n,
                    "x0_change": None if k < 2 else float(rng.random()) / k,
                    "pixel_detail": 0.5 if k % 5 == 0 else None})
    return out


def near(picture, colour, tolerance=12):
    """Mask of the pixels within `tolerance` of a colour in every channel."""
    return (np.abs(picture.astype(int) - np.array(colour)) <= tolerance).all(axis=-1)


def test_curve_plot_has_the_size_asked_and_one_colour_per_curve():
    curves = {"s=0.3": records(15, 300.0), "s=1": records(50)}
    picture = curve_plot(curves, ["x0_detail", "x0_change"], size=(420, 700))
    assert picture.shape == (420, 700, 3) and picture.dtype == np.uint8
    for colour in CURVE_COLOURS[:2]:
        assert near(picture, colour).sum() > 100  # each curve drawn, in both panels
    assert near(picture, CURVE_COLOURS[2]).sum() == 0  # and no third
    assert near(picture, (0, 0, 0), 60).sum() > 500  # axes, ticks and text


def test_curve_plot_marks_kept_frames_where_the_steps_are():
    curves = {"run": records(50, peak=25)}
    plain = curve_plot(curves, ["x0_detail"], size=(260, 600))
    marked = curve_plot(curves, ["x0_detail"], marked={"run": [46, 47, 48, 49, 50]},
                        size=(260, 600))
    added = near(marked, CURVE_COLOURS[0]) & ~near(plain, CURVE_COLOURS[0])
    assert added.sum() > 50
    columns = np.nonzero(added.any(axis=0))[0]
    assert columns.min() > 300  # the last steps: the right half of a 600-pixel plot


def test_curve_plot_by_time_puts_high_t_on_the_left():
    # One point per curve, with a dot: at t = 900 (left) or at t = 100 (right) of 0..1000.
    high = [{"step": 0, "t": 1000.0, "d": None}, {"step": 1, "t": 900.0, "d": 1.0},
            {"step": 2, "t": 0.0, "d": None}]
    low = [{"step": 0, "t": 1000.0, "d": None}, {"step": 1, "t": 100.0, "d": 1.0},
           {"step": 2, "t": 0.0, "d": None}]
    for curve, side in ((high, "left"), (low, "right")):
        picture = curve_plot({"a": curve}, ["d"], size=(240, 600), x="t")
        columns = np.nonzero(near(picture, CURVE_COLOURS[0]).any(axis=0))[0]
        plot_columns = columns[columns < 480]  # leave out the legend's swatch
        assert len(plot_columns) > 0
        if side == "left":
            assert plot_columns.max() < 200
        else:
            assert plot_columns.min() > 300


def test_curve_plot_best_ring_and_a_panel_without_data():
    curves = {"run": records(10)}
    for r in curves["run"]:
        r["pixel_change"] = None
    plain = curve_plot(curves, ["x0_detail", "pixel_change"], size=(420, 600))
    ringed = curve_plot(curves, ["x0_detail", "pixel_change"], best={"run": 10}, size=(420, 600))
    assert (near(ringed, (0, 0, 0), 60) & ~near(plain, (0, 0, 0), 60)).sum() > 30


def test_curve_plot_checks_its_input():
    curves = {"run": records(5)}
    with pytest.raises(ValueError, match="no record has the measure 'sharpness'"):
        curve_plot(curves, ["sharpness"])
    with pytest.raises(ValueError, match="at least one curve"):
        curve_plot({}, ["x0_detail"])
    with pytest.raises(ValueError, match="at least one measure"):
        curve_plot(curves, [])
    with pytest.raises(ValueError, match="x must be"):
        curve_plot(curves, ["x0_detail"], x="sigma")
    with pytest.raises(ValueError, match="needs at least"):
        curve_plot(curves, ["x0_detail", "x0_change"], size=(100, 300))

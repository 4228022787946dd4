"""Fidelity and detail measures on constructed pictures, with values pinned by hand or against
scikit-image 0.26 (structural_similarity / peak_signal_noise_ratio, computed once outside the test
run: scikit-image is not a dependency)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.measures import (
    Curve,
    detail,
    fidelity,
    laplacian,
    latent_distance,
    psnr,
    ssim,
)


def checkerboard(size=64, block=4):
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy // block) + (xx // block)) % 2).astype(np.float64)


def box_blur(x):
    """3 x 3 mean with wrap-around: a blur that owes nothing to the code under test."""
    return sum(np.roll(np.roll(x, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def noisy_pair():
    rng = np.random.default_rng(0)
    a = rng.random((32, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    return a, b


# --- fidelity --------------------------------------------------------------------------------


def test_psnr_by_hand_and_pinned():
    a = np.zeros((4, 4, 3))
    b = np.full((4, 4, 3), 0.1)  # MSE 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-12)
    assert psnr(a * 255, b * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-12)
    assert psnr(a, a) == math.inf
    assert psnr(*noisy_pair()) == pytest.approx(20.46979608041191, abs=1e-9)  # scikit-image


def test_ssim_of_equal_pictures_is_one_and_constants_follow_the_formula():
    a, _ = noisy_pair()
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Constant pictures: no variance, so SSIM = (2 c d + C1) / (c^2 + d^2 + C1), C1 = 0.01^2.
    c, d = np.full((16, 16, 3), 0.5), np.full((16, 16, 3), 0.25)
    assert ssim(c, d) == pytest.approx((0.25 + 1e-4) / (0.3125 + 1e-4), abs=1e-12)


def test_ssim_matches_scikit_image():
    a, b = noisy_pair()
    assert ssim(a, b) == pytest.approx(0.9440482421883108, abs=1e-9)
    assert ssim(a, b, luminance=True) == pytest.approx(0.9442243424042245, abs=1e-9)
    check = checkerboard(24)
    assert ssim(check, np.roll(check, 1, axis=1)) == pytest.approx(0.4852551243328227, abs=1e-9)
    assert ssim(check, 0.5 * check) == pytest.approx(0.6405493196294727, abs=1e-9)


def test_ssim_ranks_a_blurred_copy_above_a_shifted_one():
    check = checkerboard(32)
    assert ssim(check, box_blur(check)) > ssim(check, np.roll(check, 2, axis=0)) + 0.3


def test_fidelity_record_is_json_ready():
    a, b = noisy_pair()
    x = np.zeros((4, 5, 4), np.float32)
    y = x.copy()
    y[1, 2, 3] = -0.5
    y[0, 0, 0] = 0.25
    record = fidelity(a, b, x, y)
    assert record["psnr"] == pytest.approx(20.46979608041191, abs=1e-9)
    assert record["ssim"] == pytest.approx(0.9440482421883108, abs=1e-9)
    assert record["latent_max_abs"] == 0.5
    assert record["latent_rms"] == pytest.approx(math.sqrt((0.25 + 0.0625) / 80), abs=1e-12)
    same = fidelity(a, a)
    assert same["psnr"] is None and same["identical"] is True and set(same) == {"psnr", "ssim", "identical"}
    json.dumps(record, allow_nan=False)
    json.dumps(same, allow_nan=False)


def test_latent_distance_accepts_mlx_arrays_including_bfloat16():
    x = mx.zeros((1, 3, 3, 4), dtype=mx.bfloat16)
    y = mx.full((1, 3, 3, 4), 2.0, dtype=mx.bfloat16)
    assert latent_distance(x, y) == {"rms": 2.0, "max_abs": 2.0}


def test_fidelity_checks_its_input():
    a, b = noisy_pair()
    with pytest.raises(ValueError, match="shape"):
        psnr(a, b[:-1])
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(a[:10], b[:10])
    with pytest.raises(ValueError, match="RGB"):
        ssim(a[..., 0], b[..., 0], luminance=True)
    with pytest.raises(ValueError, match="both latents"):
        fidelity(a, b, np.zeros(3))


# --- detail ----------------------------------------------------------------------------------


def test_detail_pinned_on_patterns_by_hand():
    yy, xx = np.mgrid[0:16, 0:16]
    # One-pixel 0/1 checkerboard: the Laplacian is -4 on ones and +4 on zeros, variance 16.
    assert detail(((yy + xx) % 2).astype(float)) == 16.0
    # One-pixel stripes: only the horizontal second difference, +-2, variance 4.
    assert detail((xx % 2).astype(float)) == 4.0
    assert detail(np.full((8, 8, 3), 0.3)) == 0.0
    assert detail(0.01 * xx + 0.02 * yy) < 1e-20  # a linear ramp has no curvature
    np.testing.assert_array_equal(laplacian(((yy + xx) % 2).astype(float))[:2, :2, 0],
                                  [[4.0, -4.0], [-4.0, 4.0]])


def test_detail_sharp_pattern_beats_its_blurred_copy():
    check = checkerboard()
    sharp, blurred, twice = detail(check), detail(box_blur(check)), detail(box_blur(box_blur(check)))
    assert sharp == pytest.approx(1.4360041623309052, abs=1e-12)
    assert blurred == pytest.approx(0.12456160635140869, abs=1e-12)
    assert twice == pytest.approx(0.04598230549421653, abs=1e-12)
    assert sharp > 10 * blurred and blurred > 2 * twice


def test_detail_averages_channels_and_scales_with_the_square():
    check = checkerboard()
    picture = np.stack([check, 1 - check, 0.5 * check], axis=-1)  # (64, 64, 3)
    # Channel variances: v, v (negation keeps it), v / 4.
    assert detail(picture) == pytest.approx(detail(check) * (1 + 1 + 0.25) / 3, rel=1e-12)


def test_detail_checks_its_input():
    with pytest.raises(ValueError, match="3 x 3"):
        detail(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="one image of a batch"):
        detail(np.zeros((2, 8, 8, 4)))


# --- the curve -------------------------------------------------------------------------------


def latents(n=4, h=8, w=8, c=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h, w, c))


def test_curve_records_details_and_changes():
    z = latents()
    curve = Curve()
    first = curve.add(0, 500.0, 1.2, z[0], None)
    second = curve.add(1, 250.0, 0.6, mx.array(z[1][None].astype(np.float32)), z[2])
    third = curve.add(2, 0.0, 0.0, z[2], z[3], x0_t=250.0, x0_sigma=0.6)
    assert first == {"step": 0, "t": 500.0, "sigma": 1.2, "x0_t": None, "x0_sigma": None, "x_t_detail": detail(z[0]),
                     "x_t_change": None, "x0_detail": None, "x0_change": None,
                     "pixel_detail": None, "pixel_change": None, "pixels_of": None,
                     "pixel_change_from": None}
    assert second["x_t_detail"] == pytest.approx(detail(z[1]), rel=1e-6)  # read as float32
    assert second["x_t_change"] == pytest.approx(np.sqrt(np.mean((z[1] - z[0]) ** 2)), rel=1e-6)
    assert second["x0_change"] is None  # step 0 had no estimate
    assert third["x0_detail"] == detail(z[3]) and (third["x0_t"], third["x0_sigma"]) == (250.0, 0.6)
    assert third["x0_change"] == pytest.approx(np.sqrt(np.mean((z[3] - z[2]) ** 2)), rel=1e-12)
    assert [r["step"] for r in curve.records] == [0, 1, 2]
    json.dumps(curve.records, allow_nan=False)


def test_curve_pixel_change_is_measured_from_the_previous_decoded_picture():
    z = latents()
    check = checkerboard(16)
    pictures = [np.stack([check] * 3, -1), np.stack([box_blur(check)] * 3, -1)]
    curve = Curve()
    curve.add(1, 30.0, 0.2, z[0], z[0], pixels=pictures[0])
    curve.add(2, 20.0, 0.1, z[1], z[1])
    last = curve.add(3, 10.0, 0.05, z[2], z[2], pixels=pictures[1])
    assert last["pixel_detail"] == pytest.approx(detail(box_blur(check)), rel=1e-12)
    assert last["pixel_change"] == pytest.approx(np.sqrt(np.mean((box_blur(check) - check) ** 2)),
                                                 rel=1e-12)
    assert last["pixel_change_from"] == 1 and last["pixels_of"] == "x0_pred"


def test_curve_best_is_the_sharpest_estimate_among_the_last_n():
    check = checkerboard(16)
    blur1, blur2 = box_blur(check), box_blur(box_blur(check))
    # The estimate gets sharper, then over-smooths over the last two steps.
    estimates = [blur2, blur1, check, blur1, blur2]
    curve = Curve()
    curve.add(0, 50.0, 0.5, np.zeros((16, 16, 1)))
    for k, e in enumerate(estimates, start=1):
        curve.add(k, 50.0 - 10 * k, 0.1, e[..., None] + 0.3, e[..., None])  # x_t: any latent
    best = curve.best(3)
    assert best["step"] == 3 and best["basis"] == "latent" and best["among"] == [3, 4, 5]
    assert best["detail"] == detail(check)
    assert curve.best(2)["step"] == 4  # the sharp step is no longer among them
    assert curve.best(100)["among"] == [1, 2, 3, 4, 5]  # step 0 has no estimate


def test_curve_best_uses_pixels_only_when_every_candidate_has_its_estimate_decoded():
    check = checkerboard(16)
    flat, sharp = np.zeros((16, 16, 4)), np.stack([check] * 4, -1)
    rgb = lambda x: np.stack([x] * 3, -1)  # noqa: E731
    # Latent says step 2; the decoded pictures say step 1.
    curve = Curve()
    curve.add(1, 20.0, 0.2, flat, flat, pixels=rgb(check))
    curve.add(2, 10.0, 0.1, sharp, sharp, pixels=rgb(box_blur(check)))
    best = curve.best(2)
    assert best["step"] == 1 and best["basis"] == "pixels"
    assert best["detail"] == detail(check)
    mixed = Curve()
    mixed.add(1, 20.0, 0.2, flat, flat, pixels=rgb(check))
    mixed.add(2, 10.0, 0.1, sharp, sharp)
    assert mixed.best(2)["basis"] == "latent" and mixed.best(2)["step"] == 2
    noisy = Curve()  # decoded x_t counts noise as detail: never used to choose
    noisy.add(1, 20.0, 0.2, flat, flat, pixels=rgb(check), pixels_of="x_t")
    noisy.add(2, 10.0, 0.1, sharp, sharp, pixels=rgb(box_blur(check)), pixels_of="x_t")
    assert noisy.best(2)["basis"] == "latent" and noisy.best(2)["step"] == 2


def test_curve_best_ties_go_to_the_later_step():
    curve = Curve()
    for k in (1, 2, 3):
        curve.add(k, 10.0 * (3 - k), 0.0, np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
    assert curve.best(3)["step"] == 3


def test_curve_checks_its_input():
    curve = Curve()
    with pytest.raises(ValueError, match="no steps"):
        curve.best(1)
    curve.add(0, 100.0, 1.0, np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="denoised estimate"):
        curve.best(1)
    with pytest.raises(ValueError, match="increase"):
        curve.add(0, 90.0, 0.9, np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="one Curve per image"):
        curve.add(1, 90.0, 0.9, np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="pixels_of"):
        curve.add(1, 90.0, 0.9, np.zeros((4, 4, 4)), pixels_of="x0")
    with pytest.raises(ValueError, match="last_n"):
        curve.best(0)

"""How faithful a run is, and how much detail each step holds: pure array math.

Pictures are float arrays (H, W, 3) in [0, 1] (or (H, W) grey); latents are (h, w, C), as the
UNet sees them. `mx.array`s are accepted and read as float32; everything is computed in float64 so
that pinned values do not depend on the device.

Fidelity (final picture against the input):
- `psnr`: 10 log10(range^2 / MSE).
- `ssim`: the structural similarity of Wang, Bovik, Sheikh and Simoncelli (2004), with their
  Gaussian window (sigma 1.5, 11 x 11) and constants K1 = 0.01, K2 = 0.03, averaged over the
  picture's valid interior and, for colour, over the channels (or on luminance).
- `latent_distance`: RMS and max abs of the difference of two latents.

Detail (the over-smoothing curve): `detail` is the variance of the 4-neighbour Laplacian, a
standard high-frequency energy (sharp edges and texture raise it; blur lowers it; a constant or a
linear ramp gives 0). `Curve` records it per step for x_t and the denoised estimate x0_pred, in
latent space always and in pixel space where a picture was decoded, with the change from the
previous step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

# Wang et al. (2004), section III-C: window, stabilising constants.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 x 11 window: int(3.5 sigma + 0.5), the truncation scikit-image uses too
SSIM_K1, SSIM_K2 = 0.01, 0.03
# ITU-R BT.601 luma weights, for `ssim(..., luminance=True)`.
LUMA = np.array([0.299, 0.587, 0.114])


# What each per-step measure of `Curve` is, in words a plot can show.
MEASURE_TITLES = {
    "x0_detail": "detail of the estimate x0_pred (latent Laplacian variance)",
    "x_t_detail": "detail of x_t (latent Laplacian variance)",
    "x0_change": "change of x0_pred from the previous step (latent RMS)",
    "x_t_change": "change of x_t from the previous step (latent RMS)",
    "pixel_detail": "detail of the decoded picture (pixel Laplacian variance)",
    "pixel_change": "change of the decoded picture from the previous one (pixel RMS)",
}
CURVE_MEASURES = tuple(MEASURE_TITLES)


def _array(x) -> np.ndarray:
    if isinstance(x, mx.array):
        x = x.astype(mx.float32)  # numpy cannot read bfloat16
    return np.asarray(x, dtype=np.float64)


def _pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ValueError(f"{what} compares arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def _channels(x: np.ndarray, what: str) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, C)."""
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"{what} needs one picture or latent (H, W) or (H, W, C), got shape "
                         f"{x.shape}; pass one image of a batch at a time")
    return x


# ---------------------------------------------------------------------------------------------
# Fidelity


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two pictures of one shape; inf when they are equal."""
    a, b = _pair(a, b, "psnr")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian window over axes 0 and 1 of (H, W, C); borders mirrored (a b | b a)."""
    taps, r = _gaussian_taps(), SSIM_RADIUS
    x = np.pad(x, ((r, r), (r, r), (0, 0)), mode="symmetric")
    h, w = x.shape[0] - 2 * r, x.shape[1] - 2 * r
    rows = sum(taps[k] * x[k:k + h] for k in range(2 * r + 1))  # (h, W + 2r, C)
    return sum(taps[k] * rows[:, k:k + w] for k in range(2 * r + 1))  # (h, w, C)


def ssim(a, b, data_range: float = 1.0, luminance: bool = False) -> float:
    """Mean structural similarity (Wang et al. 2004) of two pictures, 1 when they are equal.

    The local means, variances and covariance are Gaussian-weighted (sigma 1.5, 11 x 11 window,
    population statistics, as in the paper); the SSIM map is averaged over the pixels whose window
    lies inside the picture. Colour pictures give the mean of the per-channel values, or with
    `luminance=True` the value on BT.601 luma. This equals scikit-image's
    `structural_similarity(a, b, data_range=..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)`.
    """
    a, b = _pair(a, b, "ssim")
    if luminance:
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"ssim on luminance needs RGB pictures (H, W, 3), got {a.shape}")
        a, b = a @ LUMA, b @ LUMA
    a, b = _channels(a, "ssim"), _channels(b, "ssim")
    side = 2 * SSIM_RADIUS + 1
    if min(a.shape[:2]) < side:
        raise ValueError(f"ssim needs pictures of at least {side} x {side} pixels, got {a.shape[:2]}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a ** 2
    var_b = _blur(b * b) - mu_b ** 2
    cov = _blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    r = SSIM_RADIUS
    inner = index[r:-r, r:-r]  # (H - 10, W - 10, C): windows that need no mirrored pixels
    return float(inner.mean(axis=(0, 1)).mean())


def latent_distance(x, y) -> dict:
    """{"rms": root mean square, "max_abs": largest absolute value} of x - y."""
    x, y = _pair(x, y, "latent_distance")
    d = x - y
    return {"rms": float(np.sqrt(np.mean(d * d))), "max_abs": float(np.max(np.abs(d)))}


def fidelity(picture, reference, latent=None, latent_reference=None) -> dict:
    """How far a picture (and optionally its latent) is from a reference, as a sidecar record.

    {"psnr": dB, "ssim": ..., "latent_rms": ..., "latent_max_abs": ...}; the latent entries only
    when both latents are given. Equal pictures have an infinite PSNR, which JSON cannot hold: it
    is written as null with "identical": true.
    """
    value = psnr(picture, reference)
    record = {"psnr": None if math.isinf(value) else value, "ssim": ssim(picture, reference)}
    if math.isinf(value):
        record["identical"] = True
    if (latent is None) != (latent_reference is None):
        raise ValueError("fidelity needs both latents or neither")
    if latent is not None:
        distance = latent_distance(latent, latent_reference)
        record.update(latent_rms=distance["rms"], latent_max_abs=distance["max_abs"])
    return record


# ---------------------------------------------------------------------------------------------
# Detail


def laplacian(x) -> np.ndarray:
    """The 4-neighbour Laplacian of (H, W) or (H, W, C), per channel, on the interior:
    (H - 2, W - 2, C). Borders are left out rather than padded, so that no edge is invented."""
    x = _channels(_array(x), "laplacian")
    if min(x.shape[:2]) < 3:
        raise ValueError(f"the Laplacian needs at least 3 x 3 pixels, got {x.shape[:2]}")
    centre = x[1:-1, 1:-1]
    return x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4.0 * centre


def detail(x) -> float:
    """High-frequency energy: the variance of the Laplacian, per channel, averaged over channels.

    Scale-dependent (times c gives times c^2), so compare like with like: pixels in [0, 1] with
    pixels, latents with latents of one model. A one-pixel 0/1 checkerboard gives 16, one-pixel
    0/1 stripes give 4, a constant or a linear ramp gives 0.
    """
    return float(laplacian(x).var(axis=(0, 1)).mean())


def rms(x) -> float:
    x = _array(x)
    return float(np.sqrt(np.mean(x * x)))


def _single(x, what: str):
    """Accept (h, w, C) or a batch of one (1, h, w, C)."""
    if x is None:
        return None
    x = np.array(_array(x))  # a copy: the curve keeps it for the next step's change
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{what} is a batch of {x.shape[0]}: keep one Curve per image and "
                             f"pass x[i]")
        x = x[0]
    return x


class Curve:
    """The over-smoothing curve of one trajectory: one record per step given to `add`.

    Each record is a flat, JSON-ready dict:
      step, t, sigma; x0_t, x0_sigma: where the denoised estimate was made (the step before: its
        time and level; None where the caller does not say, or a step has no estimate);
      x_t_detail, x_t_change: `detail` of the latent x_t, and the RMS of x_t minus the previous
        recorded x_t (None on the first record);
      x0_detail, x0_change: the same for the denoised estimate x0_pred (None where a step has no
        estimate, as step 0 has not);
      pixel_detail, pixel_change, pixels_of, pixel_change_from: the same on the decoded picture,
        where one was given, with which latent it shows ("x0_pred" or "x_t") and the step of the
        previous decoded picture the change is measured from (None where there was none).

    `best(last_n)` says which of the last steps holds the most detail.
    """

    def __init__(self):
        self._records: list[dict] = []
        self._previous = {"x_t": None, "x0": None, "pixels": None}
        self._previous_pixel_step = None

    @property
    def records(self) -> list[dict]:
        return [dict(r) for r in self._records]

    def add(self, step_index: int, t: float, sigma: float, x_t, x0_pred=None, pixels=None,
            pixels_of: str = "x0_pred", x0_t: float | None = None, x0_sigma: float | None = None) -> dict:
        """Measure one step and return its record. Steps must come in increasing order.

        x_t, x0_pred: latents (h, w, C) or (1, h, w, C); pixels: the decoded picture (H, W, 3) in
        [0, 1] of the latent named by `pixels_of`.
        """
        if pixels_of not in ("x0_pred", "x_t"):
            raise ValueError(f"pixels_of must be 'x0_pred' or 'x_t', not {pixels_of!r}")
        if self._records and step_index <= self._records[-1]["step"]:
            raise ValueError(f"curve steps must increase: step {step_index} after "
                             f"{self._records[-1]['step']}")
        x_t, x0_pred = _single(x_t, "x_t"), _single(x0_pred, "x0_pred")
        pixels = _single(pixels, "pixels")

        def change(key, now):
            before = self._previous[key]
            if now is None or before is None:
                return None
            if before.shape != now.shape:
                raise ValueError(f"curve {key} changed shape from {before.shape} to {now.shape}")
            return rms(now - before)

        record = {
            "step": int(step_index), "t": float(t), "sigma": float(sigma),
            "x0_t": None if x0_pred is None or x0_t is None else float(x0_t),
            "x0_sigma": None if x0_pred is None or x0_sigma is None else float(x0_sigma),
            "x_t_detail": detail(x_t), "x_t_change": change("x_t", x_t),
            "x0_detail": None if x0_pred is None else detail(x0_pred),
            "x0_change": change("x0", x0_pred),
            "pixel_detail": None if pixels is None else detail(pixels),
            "pixel_change": change("pixels", pixels),
            "pixels_of": None if pixels is None else pixels_of,
            "pixel_change_from": None,
        }
        if record["pixel_change"] is not None:
            record["pixel_change_from"] = self._previous_pixel_step
        self._previous["x_t"] = x_t
        self._previous["x0"] = x0_pred
        if pixels is not None:
            self._previous["pixels"] = pixels
            self._previous_pixel_step = int(step_index)
        self._records.append(record)
        return dict(record)

    def best(self, last_n: int) -> dict:
        """The step with the most detail among the last `last_n` steps (by step index, counted
        back from the last recorded step).

        "Most detail" is the highest `detail` of the denoised estimate x0_pred: on its decoded
        picture when every candidate has one (pixels_of "x0_pred"), otherwise on the latent, so
        that the candidates are always compared in one space. x_t is never used: the noise it still
        carries would count as detail. Ties go to the later step.

        Returns {"step", "t", "sigma", "x0_t", "x0_sigma" (where the estimate was made), "detail",
        "basis": "pixels" | "latent", "among": [steps], "final_detail": the last candidate's, to
        weigh the choice against}.
        """
        if last_n < 1:
            raise ValueError(f"best needs last_n >= 1, got {last_n}")
        if not self._records:
            raise ValueError("the curve has no steps yet")
        first = self._records[-1]["step"] - last_n + 1
        candidates = [r for r in self._records if r["step"] >= first and r["x0_detail"] is not None]
        if not candidates:
            raise ValueError(f"none of the last {last_n} steps has a denoised estimate to measure")
        by_pixels = all(r["pixel_detail"] is not None and r["pixels_of"] == "x0_pred"
                        for r in candidates)
        key = "pixel_detail" if by_pixels else "x0_detail"
        chosen = max(reversed(candidates), key=lambda r: r[key])  # max keeps the first: the latest
        return {"step": chosen["step"], "t": chosen["t"], "sigma": chosen["sigma"],
                "x0_t": chosen["x0_t"], "x0_sigma": chosen["x0_sigma"], "detail": chosen[key], "basis": "pixels" if by_pixels else "latent",
                "among": [r["step"] for r in candidates], "final_detail": candidates[-1][key]}

"""The scenes the shipped `shapes` model is trained on, and the analyser that judges its pictures.

A scene is one flat shape (circle, square or triangle) of one colour on a background of another,
with a caption of the form "a red circle on a blue background". Pictures are drawn with numpy
alone, anti-aliased by supersampling, so that the training program, the tests and the README's
pictures all draw the same scenes from a seed.

The analyser reads a picture back into a caption: the background's colour from the border, the
shape's colour from the pixels that differ from it, and the shape's kind from which of three
outlines drawn in its bounding box (a square, the circle inside it, the upright triangle) overlaps
it most.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

# RGB in 0..255: saturated and far apart, so that a colour is named from its nearest entry.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 128  # pixels per side: the model's native size
_SUPERSAMPLE = 4  # sub-pixels per side for the anti-aliased edges
_JITTER = 10  # each channel of a drawn colour varies by up to this much


class Scene(NamedTuple):
    shape: str
    colour: str
    background: str
    centre: tuple  # (x, y) in pixels
    radius: float  # half the side of the shape's bounding box, in pixels

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list:
    """Every caption the scenes can have: 6 colours x 3 shapes x 5 other background colours."""
    return [caption(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]


def outside_training(texts: dict, size: tuple, learnt=()) -> list:
    """Notes for the texts (their kind, "prompt", "negative prompt", ... -> the text) and the
    working size (H, W) the shipped model never saw in training: it paints something all the same,
    with no sign that it was never taught it. `learnt`: the tokens of loaded embeddings, taught since."""
    known = {"a", "on", "background", *COLOURS, *SHAPES}
    # the longest first: `tok_1` before `tok`, which would leave `_1`
    taught = re.compile("|".join(re.escape(w) for w in sorted(learnt, key=len, reverse=True)),
                        re.IGNORECASE) if learnt else None
    unknown = []
    for kind, text in texts.items():
        text = taught.sub(" ", text or "") if taught else text or ""
        words = list(dict.fromkeys(w for w in re.findall(r"\w+(?:[.'-]\w+)*", text) if w.lower() not in known))
        if words:
            shown = ", ".join(repr(w if len(w) <= 30 else w[:27] + "...") for w in words[:8])
            shown += f" and {len(words) - 8} more" if len(words) > 8 else ""
            unknown.append(f"{shown} (in the {kind})")
    notes = []
    if unknown:
        notes.append(f"the shapes model never saw {'; '.join(unknown)}: it knows 'a COLOUR SHAPE on a COLOUR "
                     f"background' (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}), and paints a scene "
                     "of those whatever it is given")
    if tuple(size) != (SIZE, SIZE):
        notes.append(f"the shapes model was trained at {SIZE}x{SIZE}; at {size[1]}x{size[0]} (width x height) it may "
                     "draw no shape, or more than one")
    return notes


def random_scene(rng: np.random.Generator, size: int = SIZE, shape: str | None = None,
                 colour: str | None = None, background: str | None = None) -> Scene:
    """A scene with the given parts (the others drawn at random): the shape fills 30-65% of the
    picture's side and lies wholly inside it."""
    names = list(COLOURS)
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else names[rng.integers(len(names))]
    if background is None:
        others = [n for n in names if n != colour]
        background = others[rng.integers(len(others))]
    if colour == background:
        raise ValueError(f"a {colour} shape on a {background} background cannot be seen")
    radius = float(rng.uniform(0.15, 0.325) * size)
    margin = radius + 2
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    return Scene(shape, colour, background, centre, radius)


def coverage(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The fraction of each pixel the shape covers, (size, size) float32 in [0, 1]."""
    n = size * _SUPERSAMPLE
    grid = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y = grid[None, :], grid[:, None]
    cx, cy = scene.centre
    r = scene.radius
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif scene.shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif scene.shape == "triangle":  # upright, base at the bottom of the bounding box
        top, bottom = cy - r, cy + r
        half_width = r * (y - top) / (bottom - top)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {', '.join(SHAPES)}")
    return inside.astype(np.float32).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def draw(scene: Scene, rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """The scene as an RGB picture (size, size, 3) uint8; `rng` jitters its two colours."""
    def tone(name):
        rgb = np.array(COLOURS[name], dtype=np.float32)
        if rng is not None:
            rgb = rgb + rng.uniform(-_JITTER, _JITTER, size=3)
        return np.clip(rgb, 0, 255)

    a = coverage(scene, size)[..., None]  # (H, W, 1)
    picture = a * tone(scene.colour) + (1 - a) * tone(scene.background)
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def batch(rng: np.random.Generator, count: int, size: int = SIZE) -> tuple[np.ndarray, list]:
    """`count` random scenes: pictures (count, size, size, 3) uint8 and their captions."""
    scenes = [random_scene(rng, size) for _ in range(count)]
    return np.stack([draw(s, rng, size) for s in scenes]), [s.caption for s in scenes]


# --- the analyser ---------------------------------------------------------------------------------


class Reading(NamedTuple):
    shape: str | None  # None when no shape stands out from the background
    colour: str | None
    background: str
    fill: float  # the shape's area over its bounding box's


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def analyse(picture: np.ndarray) -> Reading:
    """Read a picture (H, W, 3) uint8 back into its scene's parts.

    The background is the median colour of a 3-pixel border; the shape is the largest connected
    part of the pixels more than a third of the way (in RGB distance) from it to the farthest pixel
    (a speck elsewhere would widen its box), and its colour is their median. Its kind is the
    outline, drawn in its bounding box, that it overlaps most (intersection over union): the box
    itself (square), the circle inside it, or the upright triangle on its base. A fill of the box
    alone (a square all of it, a circle pi/4) misread rounded squares as circles.
    """
    pixels = np.asarray(picture, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                             pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
    back_rgb = np.median(border, axis=0)
    background = nearest_colour(back_rgb)
    distance = np.sqrt(((pixels - back_rgb) ** 2).sum(axis=-1))  # (H, W)
    far = float(distance.max())
    mask = distance > max(far / 3, 60.0)
    if mask.sum() < 16:
        return Reading(None, None, background, 0.0)
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    part = _largest_part(mask)
    rows, cols = np.nonzero(part)
    box = part[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = box.shape
    y, x = (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w  # 0..1, y down
    outlines = {"square": np.ones((h, w), bool), "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
                "triangle": np.abs(x - 0.5) <= y / 2}
    overlap = {kind: (box & o).sum() / (box | o).sum() for kind, o in outlines.items()}
    return Reading(max(overlap, key=overlap.get), colour, background, float(box.mean()))


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a boolean mask."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    best: list = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        part, stack = [], [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            part.append((r, c))
            for rr in range(max(r - 1, 0), min(r + 2, h)):
                for cc in range(max(c - 1, 0), min(c + 2, w)):
                    if mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        if len(part) > len(best):
            best = part
    out = np.zeros_like(mask)
    out[tuple(np.array(best).T)] = True
    return out

"""A sweep's contact sheet: the final pictures laid out by the fields that vary, labelled, in
pages of bounded size.

Every page's size is known from the grid before any picture is read: the cell shrinks (from
`--sheet-cell`) until the whole sheet fits `SHEET_MAX_PIXELS`; a sweep too wide even at
`SHEET_MIN_CELL` is split into pages (`sweep.sheet-001.png`, ...), which sweep.json lists.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from .files import open_regular
from .privacy import shown_value

SHEET = "sweep.sheet.png"


def _label(name: str, value, private: bool = False) -> str:
    value = shown_value(name, value, private)
    if name == "strength":
        return f"s={value:g}"
    if name == "prompt":
        return value if len(value) <= 24 else value[:21] + "..."
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def sheet_layout(grid) -> tuple:
    """(row fields, column field): the column is the field with the most values; rows are the
    others that vary, the one with the most values innermost."""
    varying = list(grid.varying())
    if not varying:
        return (), None
    column = max(reversed(varying), key=lambda f: len(grid.values(f)))
    rows = sorted((f for f in varying if f != column), key=lambda f: len(grid.values(f)))
    return tuple(reversed(rows)), column


WRAP_AFTER = 12  # one varying field of more values than this is wrapped into a near-square block


@dataclass(frozen=True)
class Places:
    """Where each run's picture sits on the sheet: (row, column) on an n_rows x n_cols table.
    Rows are the combinations of the row fields, columns the column field's values; a sweep of one
    field of many values (90 prompts) is wrapped row after row into a near-square block, each cell
    captioned with its value, where one row of them was 11,702 pixels wide."""

    grid: object  # sweep_grid.Grid
    row_fields: tuple
    column: str | None
    n_rows: int
    n_cols: int
    wrap: int | None  # the cells of a wrapped row; None: not wrapped

    @classmethod
    def of(cls, grid) -> "Places":
        row_fields, column = sheet_layout(grid)
        n_values = len(grid.values(column)) if column else 1
        if not row_fields and n_values > WRAP_AFTER:
            wrap = math.ceil(math.sqrt(n_values))
            return cls(grid, row_fields, column, math.ceil(n_values / wrap), wrap, wrap)
        n_rows = math.prod(len(grid.values(f)) for f in row_fields)
        return cls(grid, row_fields, column, n_rows, n_values, None)

    def combos(self) -> list:
        return list(itertools.product(*(self.grid.values(f) for f in self.row_fields)))

    def index(self):
        """run values -> (row, column)."""
        rows = {combo: i for i, combo in enumerate(self.combos())}
        cols = {v: i for i, v in enumerate(self.grid.values(self.column))} if self.column else {}

        def place(values: dict) -> tuple:
            c = cols[values[self.column]] if self.column else 0
            if self.wrap is not None:
                return divmod(c, self.wrap)
            return rows[tuple(values[f] for f in self.row_fields)], c
        return place

    def caption(self, r: int, c: int, private: bool) -> str | None:
        """The caption under the cell (r, c): the column field's value there (None past the last
        value of a wrapped field)."""
        values = self.grid.values(self.column)
        k = r * self.wrap + c if self.wrap is not None else c
        return _label(self.column, values[k], private) if k < len(values) else None


# One page of the contact sheet holds at most this many pixels (96 MB as RGB); a sweep too wide
# for one page at SHEET_MIN_CELL gets more pages, each listed in sweep.json.
SHEET_MAX_PIXELS = 32 << 20
SHEET_MAX_SIDE = 16384
SHEET_MIN_CELL = 48  # smaller, a picture says nothing: pages instead
_SHEET_PAD = 2


@dataclass(frozen=True)
class SheetLayout:
    """The cell size and the pages of a sweep's contact sheet: each page a block of rows and
    columns of the grid, and its file name."""

    cell: int
    pages: tuple  # ((row start, row end, column start, column end, file name), ...)


def sheet_plan(grid, cell: int = 256) -> SheetLayout:
    """The largest cell up to `cell` at which the whole sheet stays within SHEET_MAX_PIXELS (and
    SHEET_MAX_SIDE a side); below SHEET_MIN_CELL, pages of that cell instead. Computed from the
    grid alone, before any picture: every page's size is known before it is drawn."""
    from . import render

    places = Places.of(grid)
    row_fields, column, n_rows, n_cols = places.row_fields, places.column, places.n_rows, places.n_cols
    labels = [", ".join(_label(f, v) for f, v in zip(row_fields, combo))
              for combo in itertools.islice(itertools.product(*(grid.values(f) for f in row_fields)), 1000)]
    label_width = (max(map(render.text_width, labels), default=0) + 6) if row_fields else 0
    caption = render.label_margins()[1] if column else 0

    def size(rows: int, cols: int, k: int) -> tuple:
        return render.triangle_size(rows, cols, k, k, _SHEET_PAD, label_width, caption)

    def fits(rows: int, cols: int, k: int) -> bool:
        h, w = size(rows, cols, k)
        return h * w <= SHEET_MAX_PIXELS and max(h, w) <= SHEET_MAX_SIDE

    k = max(1, cell)
    while k > SHEET_MIN_CELL and not fits(n_rows, n_cols, k):
        k -= max(1, k // 16)
    k = max(min(k, cell), 1)
    if fits(n_rows, n_cols, k):
        return SheetLayout(k, ((0, n_rows, 0, n_cols, SHEET),))
    cols = n_cols
    while cols > 1 and not fits(1, cols, k):
        cols = max(1, cols // 2)
    rows = n_rows
    while rows > 1 and not fits(rows, cols, k):
        rows = max(1, rows // 2)
    pages = []
    for r0 in range(0, n_rows, rows):
        for c0 in range(0, n_cols, cols):
            pages.append((r0, min(n_rows, r0 + rows), c0, min(n_cols, c0 + cols),
                          f"{SHEET.removesuffix('.png')}-{len(pages) + 1:03d}.png"))
    return SheetLayout(k, tuple(pages))


def contact_sheet(folder: Path, runs: list, grid, cell: int = 256, page: tuple | None = None):
    """The final pictures of `runs` laid out on the two (or more) fields that vary, labelled; a
    cell of the grid without a picture stays empty. `page` (row start, row end, column start,
    column end) draws that block of the grid only. Returns a uint8 (H, W, 3) or None when no
    picture of the page exists yet. `cell` is used as given: `sheet_plan` bounds it."""
    import numpy as np
    from PIL import Image

    from . import render

    places = Places.of(grid)
    place = places.index()
    r0, r1, c0, c1 = page if page is not None else (0, places.n_rows, 0, places.n_cols)
    table = {}
    size = None  # (W, H) of every cell: the first picture's, shrunk to `cell`
    for run in runs:
        r, c = place(run.values)
        if not (r0 <= r < r1 and c0 <= c < c1):
            continue
        try:
            with open_regular(run.spec.output, "picture", "picture") as f, Image.open(f) as im:
                im = im.convert("RGB")
                if size is None:
                    scale = min(1.0, cell / max(im.size))
                    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                picture = np.asarray(im.resize(size, Image.Resampling.LANCZOS) if im.size != size else im)
        except Exception:  # noqa: BLE001 - a picture that cannot be drawn leaves its cell empty
            continue
        table[r - r0, c - c0] = picture
    if not table:
        return None
    cells = [[table.get((r, c)) for c in range(c1 - c0)] for r in range(r1 - r0)]
    private = bool(runs) and not runs[0].spec.capture.save_prompt
    captions = ([[places.caption(r, c, private) for c in range(c0, c1)] for r in range(r0, r1)]
                if places.column else None)
    row_labels = [", ".join(_label(f, v, private) for f, v in zip(places.row_fields, combo))
                  for combo in places.combos()[r0:r1]]
    return render.contact_sheet(cells, row_labels if places.row_fields else None, captions)


def pages_to_redraw(layout: SheetLayout, grid, runs: list) -> list:
    """The pages of `layout` that show any of `runs` (all of them when there is one page and
    any run)."""
    if not runs:
        return []
    if len(layout.pages) == 1:
        return list(layout.pages)
    place = Places.of(grid).index()
    places = {place(run.values) for run in runs}
    return [page for page in layout.pages
            if any(page[0] <= r < page[1] and page[2] <= c < page[3] for r, c in places)]

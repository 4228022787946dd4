"""What a run says while it works: the plan on stdout, notices and progress on stderr.

On a terminal, progress is a tqdm bar. Elsewhere (a log file, a pipe, a CI job) it is one plain
line per step, e.g. `s=0.3 step 3/15 t=200 sigma=0.57 1.9 s/step`, so that a long run in a script
still shows it is alive. `--quiet` silences both, and notices; errors are always shown.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


def _write(stream, line: str) -> None:
    """Print, and let a closed or broken stream end the printing, never the run."""
    if stream is None:
        return
    try:
        print(line, file=stream, flush=True)
    except (BrokenPipeError, OSError, ValueError, UnicodeEncodeError):
        try:
            encoding = getattr(stream, "encoding", None) or "ascii"
            print(line.encode(encoding, "replace").decode(encoding), file=stream, flush=True)
        except Exception:
            pass


@dataclass
class Console:
    quiet: bool = False
    verbose: bool = False

    @property
    def bars(self) -> bool:
        try:
            return not self.quiet and sys.stderr is not None and sys.stderr.isatty()
        except (ValueError, OSError):
            return False

    def say(self, line: str) -> None:
        if not self.quiet:
            _write(sys.stdout, line)

    def notice(self, line: str) -> None:
        if not self.quiet:
            _write(sys.stderr, f"note: {line}")

    def error(self, line: str) -> None:
        """Always shown, even with --quiet: how the run ended."""
        _write(sys.stderr, line)

    def detail(self, line: str) -> None:
        if self.verbose:
            _write(sys.stderr, line)

    def progress(self, steps, total: int, desc: str):
        """Iterate over `steps` (each with .index, .count, .t, .sigma when it is a Step), showing
        progress: a bar on a terminal, a line per item elsewhere, nothing when quiet."""
        if self.quiet:
            yield from steps
            return
        if self.bars:
            from tqdm import tqdm

            yield from tqdm(steps, total=total, desc=desc, leave=False, dynamic_ncols=True,
                            file=sys.stderr)
            return
        last = time.perf_counter()
        for item in steps:
            yield item
            now = time.perf_counter()
            index = getattr(item, "index", None)
            if index:  # the start (index 0) took no step
                line = f"{desc} step {index}/{item.count} t={item.t:g} sigma={item.sigma:.3g}"
                _write(sys.stderr, f"{line} {now - last:.2f} s/step")
            last = now

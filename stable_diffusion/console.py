"""What a run says while it works: the plan on stdout, notices and progress on stderr.

On a terminal, progress is a tqdm bar per phase, counting the steps the plan counts, with t, sigma
and the run's time left as its postfix. Elsewhere (a log file, a pipe, a CI job) it is one plain
line per step, e.g. `s=0.3 step 3/15 t=200 sigma=0.57 1.9 s/step, about 2 min left`, so that a
long run in a script still shows it is alive. `--quiet` silences both, and notices; errors are
always shown.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field

from .errors import OutputError, name_fields

# Characters a terminal acts on instead of showing (escape sequences, line breaks), written as \xNN:
# the text of a message may come from a file (a key name, a config field, a picture's record).
# Control characters, line separators and the bidirectional marks and overrides, which would
# reorder what a terminal shows (a file name that reads backwards).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
MAX_LINE = 2000  # characters of one printed line; a longer one is cut, saying how much


def shortened(name: str) -> str:
    """A name (a path, a pattern) as a message shows it: its ends, where it is long."""
    return name if len(name) <= 60 else f"{name[:40]}...{name[-15:]}"


def shown(line: str) -> str:
    """`line` as one printable line of at most MAX_LINE characters (and the count cut)."""
    line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", line)
    if len(line) > MAX_LINE:
        line = f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"
    return line


_closed_at_start: set = set()  # the standard fds (0-2) that were closed as the command started


def _write(stream, line: str) -> None:
    """Print a line (see `shown`); a reader that has gone (`| head -1`) or a device that takes no
    more (`>/dev/full`, an I/O error) ends the printing, not the run."""
    if stream is None:
        return
    if stream is sys.stdout and 1 in _closed_at_start:  # said once: its lines go to /dev/null
        _closed_at_start.discard(1)
        _write(sys.stderr, "note: standard output is closed; its lines are lost, the run goes on")
    try:
        print(shown(line), file=stream, flush=True)
    except OSError as e:
        _silence(stream)
        if stream is sys.stdout and e.errno != errno.EPIPE:  # a reader that went is no news; a full disk is
            _write(sys.stderr, f"note: standard output cannot be written ({e.strerror or e}); its lines "
                               "are lost, the run goes on")


def _silence(stream) -> None:
    """Send later writes to `stream`, and the flush at exit, to /dev/null instead of failing again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # not a file-backed stream: nothing to do
        pass


def print_out(text: str) -> None:
    """Write what a command is asked to print and exit (--help, --version) on stdout, as it is; an
    OutputError where stdout is closed or takes no more (they exited 0 having printed nothing).
    A reader that has gone (`--help | head -1`) is no error."""
    if 1 in _closed_at_start:
        raise OutputError("standard output is closed: there is nowhere to print to")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        _silence(sys.stdout)
        if e.errno != errno.EPIPE:
            raise OutputError(f"standard output cannot be written ({e.strerror or e})") from None


def write_traceback(error: BaseException) -> None:
    """-v's traceback on stderr, each line printable (a message may hold a picture's text)."""
    for line in "".join(traceback.format_exception(error)).splitlines():
        _write(sys.stderr, line)


def open_standard_streams() -> None:
    """Reopen closed fds 0-2 on /dev/null: otherwise the first file the run opens takes the number
    (a weight file read as "stdin", a picture that print() writes into). Output that cannot be
    encoded (PYTHONIOENCODING=ascii, bytes that were not UTF-8) is escaped, never an error."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            _closed_at_start.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:  # Python leaves it None when the fd was closed at start
            setattr(sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace",
                                    closefd=False))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


@dataclass
class Console:
    quiet: bool = False
    verbose: bool = False
    # A spec field -> the name its caller knows it by: lines below the command line name fields
    # as `{flag:FIELD}` (errors.py), and the command line's console names them as its flags.
    names: dict = field(default_factory=dict)
    _noted: set = field(default_factory=set, repr=False)  # the notes said: a sweep's runs say theirs once
    _bar: object = field(default=None, repr=False)  # the progress bar on the terminal, while one is drawn

    def _line(self, stream, line: str) -> None:
        """A line, above the progress bar where one is drawn (it was glued to the bar's own line)."""
        if self._bar is None:
            _write(stream, line)
            return
        self._bar.clear()
        _write(stream, line)
        self._bar.refresh()

    @property
    def bars(self) -> bool:
        try:  # a terminal of no width or no height (`script` without one behind it): tqdm draws nothing
            size = os.get_terminal_size(sys.stderr.fileno()) if sys.stderr is not None and sys.stderr.isatty() \
                else None
            return not self.quiet and size is not None and size.columns > 0 and size.lines > 0
        except (ValueError, OSError):
            return False

    def say(self, line: str) -> None:
        if not self.quiet:
            self._line(sys.stdout, line)

    def arguments(self, args, replayed: str | None = None) -> None:
        """-pp: the parsed arguments, one a line; shown even with --quiet, as the user asked for them.
        `replayed`: the picture of --replay, whose values are among them."""
        for key, value in sorted(vars(args).items()):
            if key == "replay" and replayed is not None:
                value = f"{replayed!r} (its values are among these)"
            else:
                value = repr(value)
            _write(sys.stdout, f"{key}: {value}")
        _write(sys.stdout, "(None: the default, settled as the run starts: the model's own steps and "
                           "guidance, a random seed, ...; the sidecar records every value the run used)")

    def notice(self, line: str, once_as: str | None = None) -> None:
        """A note, once: one that every run of a sweep meets (the model's, the inversion's) is said
        at the first; `once_as` names a note whose words vary from run to run (its numbers)."""
        key = line if once_as is None else once_as
        if not self.quiet and key not in self._noted:
            self._noted.add(key)
            self._line(sys.stderr, f"note: {name_fields(line, self.names)}")

    def error(self, line: str) -> None:
        """Always shown, even with --quiet: how the run ended."""
        _write(sys.stderr, line)

    def detail(self, line: str) -> None:
        """-v's lines; --quiet keeps only errors (with -v, their tracebacks)."""
        if self.verbose and not self.quiet:
            self._line(sys.stderr, name_fields(line, self.names))

    def progress(self, steps, total: int, desc: str, time_left=None):
        """Iterate over `steps` (Steps: .index, .count, .t, .sigma), showing progress: a bar on a
        terminal, a line per step elsewhere, nothing when quiet. A phase's start (index 0) takes
        no step, so `total` counts the others, as the plan does. `time_left()`, called once a
        step's work is done, gives the run's seconds left, or None where there is no estimate."""
        if self.quiet:
            yield from steps
            return
        from .costs import describe_seconds

        bar = None
        if self.bars:
            from tqdm import tqdm

            # tqdm's own time left (of this phase) is left out: the postfix says the whole run's.
            bar = self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        last = time.perf_counter()
        try:
            for step in steps:
                yield step
                now = time.perf_counter()
                if step.index:
                    left = None if time_left is None else time_left()
                    where = f"t={step.t:g} sigma={step.sigma:.3g}"
                    remaining = "" if left is None else f", {describe_seconds(left)} left"
                    if bar is not None:
                        bar.set_postfix_str(where + remaining, refresh=False)
                        bar.update(1)
                    else:
                        _write(sys.stderr, f"{desc} step {step.index}/{total} {where} "
                                           f"{now - last:.2f} s/step{remaining}")
                last = now
        finally:
            if bar is not None:
                self._bar = None
                bar.close()

"""Stop signals, in one place: Ctrl-C, SIGTERM and SIGHUP stop a run and keep what it wrote.

- `handled()`: while a run goes, the first stop signal raises KeyboardInterrupt (SIGINT) or
  `Terminated` (SIGTERM, SIGHUP); later ones are ignored so that the shutdown runs to its end. A
  signal the process was started ignoring (nohup, a script's background job) stays ignored.
- `deferred()`: a block that must not be cut (a file's rename and its entry in the sidecar) holds
  signals back and handles the first one after it.
- `shielded()`: the run's last word (its final sidecar) is not cut short at all.
- `second_stop_skips()`: after a first stop, a block that may be cut short by another (the writing
  of the frames made before the stop, which can take minutes): it raises `Skipped`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading

# Signals that stop a run, keeping what it wrote: Ctrl-C, `kill`/`timeout`, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_signal(signum, frame) -> None:
    """A handler that does nothing. Unlike SIG_IGN it also takes a signal that arrived just before
    it was installed, which Python would otherwise report as an OSError ("ignored due to race
    condition") from wherever the main thread happens to be."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler) or SIGHUP (the terminal closed): stops the run
    like Ctrl-C, exit 128 + the signal's number."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__()
        self.signum = signum


class Skipped(Exception):
    """A second stop signal, in a `second_stop_skips` block: what the block was doing is dropped."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# The read end of a pipe that the interpreter's C-level handler writes each signal's number to as
# it arrives (signal.set_wakeup_fd), while `handled` is active. Python runs the handlers of signals
# pending together in the order of their numbers (SIGHUP 1, SIGINT 2, SIGTERM 15): two that land
# during one MLX call would otherwise be told in that order, not in the order they came.
_arrivals: int | None = None


def _first_arrived(signum: int) -> int:
    """The stop signal that arrived first of those not yet handled; `signum` if none is recorded."""
    try:
        numbers = os.read(_arrivals, 4096) if _arrivals is not None else b""
    except OSError:  # nothing to read
        numbers = b""
    return next((signal.Signals(n) for n in numbers if n in STOP_SIGNALS), signum)


# The stop signal handled in the `handled` block now running, if any (`stopped_by`).
_stopped_by: int | None = None


def stop(signum, frame):
    """The handler of the first stop signal. Later ones (a second Ctrl-C, the SIGHUP of the terminal
    closing after it) are ignored: the shutdown that writes the sidecar runs to its end, and no
    traceback is printed."""
    global _stopped_by
    for s in STOP_SIGNALS:
        signal.signal(s, ignore_signal)
    _stopped_by = _first_arrived(signum)
    raise_if_stopped()


def stopped_by() -> int | None:
    """The stop signal that `handled` took, if one came: an error raised after it may be its
    doing (numpy, interrupted while it imports, reports an ImportError)."""
    return _stopped_by


def raise_if_stopped() -> None:
    """Raise the stop that came, if one did (KeyboardInterrupt for Ctrl-C, else Terminated): in
    `stop`, and again where an error was caught that the stop may have caused (an import that
    failed because Ctrl-C landed in it must not pass for a module that is missing)."""
    if _stopped_by is not None:
        raise KeyboardInterrupt() if _stopped_by == signal.SIGINT else Terminated(_stopped_by)


@contextlib.contextmanager
def _arrivals_recorded():
    global _arrivals
    read, write = os.pipe()
    for fd in (read, write):
        os.set_blocking(fd, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    _arrivals = read
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        _arrivals = None
        os.close(read)
        os.close(write)


@contextlib.contextmanager
def handled(ending: bool = False):
    """Stop signals raise inside the block (see `stop`); off the main thread, nothing changes. After
    the block the handlers from before it are back (a script goes on, and may be stopped again),
    unless `ending` (a command, whose process ends after it): then they are ignored from there on."""
    global _stopped_by
    if not _on_main_thread():
        yield
        return
    _stopped_by = None
    # Without handlers SIGTERM and SIGHUP kill at once, leaving temporaries and a "running" sidecar.
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, stop)
    try:
        with _arrivals_recorded():
            yield
    finally:
        _stopped_by = None  # outside the block a failed import is a missing module again
        for signum, handler in previous.items():
            if not ending:
                signal.signal(signum, handler)
                continue
            # A command has ended: later signals are ignored through the interpreter's exit (which
            # resets Python handlers to the default: a late SIGHUP would kill it, a Ctrl-C print a
            # traceback).
            try:
                signal.signal(signum, signal.SIG_IGN)
            except OSError:  # one arrived just now: it is ignored as well
                pass


def import_whole(name: str):
    """Import the module `name` with the stop signals held back until it is done: MLX's extension
    module aborts the process (SIGABRT, "Critical nanobind error") when Ctrl-C lands in its init."""
    with deferred():
        return importlib.import_module(name)


@contextlib.contextmanager
def deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then stop the run as usual: a
    signal between a file's rename and its entry in the ledger would leave an unlisted file."""
    if not _on_main_thread():
        yield
        return
    pending = []

    def defer(signum, frame):
        pending.append(signum)

    # One the process ignores stays ignored: held back, it would be the one handled afterwards.
    previous = {s: signal.signal(s, defer) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        first = pending[0] if pending else None
        try:
            if first is not None:
                # The first signal is handled as it would have been, before any other handler is
                # back: a second signal landing while they are restored must not overtake it.
                signal.signal(first, previous[first])
                signal.raise_signal(first)
        finally:
            for signum, handler in previous.items():
                if signal.getsignal(signum) is defer:  # the stop handler may have replaced it
                    signal.signal(signum, handler)
            if first is None and pending:
                # One that Python handled between the check above and its handler's return went
                # to `defer`: it is handled now, or it would be lost (11 SIGTERMs of 60 were, sent
                # at random to a loop of deferred blocks).
                signal.raise_signal(pending[0])


@contextlib.contextmanager
def shielded():
    """Stop signals are ignored inside the block (the run's last record is written whole)."""
    previous = {s: signal.signal(s, ignore_signal) for s in STOP_SIGNALS} if _on_main_thread() else {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def second_stop_skips():
    """After a first stop (whose handler ignores the later ones): inside the block, the next stop
    signal raises `Skipped`, once; the later ones are ignored again. A deferred block (a file's
    rename and its ledger entry) still ends first."""
    if not _on_main_thread():
        yield
        return

    def skip(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, ignore_signal)
        raise Skipped()

    # Only the signals a first stop set to be ignored (see `stop`): elsewhere (a script's run outside
    # `handled`) a SIGTERM still ends the process.
    previous = {s: signal.signal(s, skip) for s in STOP_SIGNALS if signal.getsignal(s) is ignore_signal}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""A sweep's runs on a Ray cluster: worker processes (actors) that each hold one session.

Each worker loads the model once and makes many runs, each into a private temporary folder; it
returns the run's files as bytes, and the driver writes them into the sweep's folder with the
same atomic writes as a single run (the pictures first, the sidecar last). The workers therefore
need no shared folder, and a worker that dies leaves nothing half-written: its run goes back in
the queue for another worker, and a fresh worker takes the dead one's place. A run's pictures
depend only on its spec (the seed included), so they are byte-identical to a one-process sweep on
the same platform and versions.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from . import files
from .errors import InputError
from .options import program
from .sweep import Outcome

MAX_ATTEMPTS = 3  # a run whose worker dies this many times is marked failed (it may be the cause)


class Worker:
    """One process, one session; `run` makes a spec and hands back its files."""

    def __init__(self, model, picture, argv, replay, salt: bytes | None = None):
        from .session import Session

        if salt is not None:  # a private sweep: the driver's salt, not this machine's
            from .privacy import use_salt

            use_salt(salt)
        self.session = Session(model)
        self.picture, self.argv, self.replay = picture, list(argv), replay

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec, name: str) -> dict:
        from .console import Console
        from .run import execute

        # A folder per run, removed at once: only a worker killed mid-run leaves one behind.
        folder = Path(tempfile.mkdtemp(prefix="sd-sweep-"))
        output = folder / f"{name}{spec.output.suffix}"  # a name may hold subfolders: files are relative to its own
        try:
            result = execute(self.session, replace(spec, output=output), Console(quiet=True),
                             self.argv, self.replay, self.picture)
            files = {p.relative_to(output.parent).as_posix(): p.read_bytes()
                     for p in sorted(output.parent.rglob("*")) if p.is_file()}
            return {"status": result.status, "timings": result.timings, "files": files,
                    "sidecar": Path(result.sidecar).relative_to(output.parent).as_posix(),
                    "signum": result.signum, "pid": os.getpid(),
                    "pictures_encoded": self.session.pictures_encoded,
                    "prompts_encoded": self.session.prompts_encoded}
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _command_line_withheld(ray):
    """The command line kept from ray.init, which records the process's whole command line (read
    from the system) as the job's entrypoint on the cluster, a private prompt with it, and encodes
    it as UTF-8: a prompt that is not UTF-8 failed with UnicodeEncodeError. The program's name
    stands for it (Ray has no setting for it: its helper is replaced while ray.init runs)."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "get_entrypoint_name", None)
    if original is None:  # another Ray: nothing to replace
        yield
        return
    utils.get_entrypoint_name = lambda: program("sweep")
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, which is not installed: pip install 'mlx-sd-trajectory[ray]'") from None
    return ray


class RayPool:
    """`map(runs)` as `LocalPool.map`: (run, None) when a run starts, (run, Outcome) when it ends,
    with the run's files already in the sweep's folder."""

    def __init__(self, address: str, model, picture, argv, replay, workers: int | None, console,
                 salt: bytes | None = None):
        ray = self.ray = _ray()
        self.started_ray = False
        if not ray.is_initialized():
            with _command_line_withheld(ray):
                if address == "local":
                    # A cluster of this machine alone; its workers import this copy of the package.
                    root = str(Path(__file__).resolve().parent.parent)
                    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
                    ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False,
                             runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=False,
                             logging_level="ERROR")
                else:
                    try:
                        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                    except ConnectionError:
                        where = "running on this machine" if address == "auto" else f"at {address}"
                        raise InputError(f"--ray {address}: no Ray cluster {where}; start one with `ray "
                                         "start --head`, or use --ray local") from None
            self.started_ray = True
        self.count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.args = (model, picture, list(argv), replay, salt)
        self.actor_class = ray.remote(num_cpus=1, max_restarts=0)(Worker)
        self.console = console
        self.workers = [self._start() for _ in range(self.count)]
        self.replacements = 0
        self.counts_seen: dict = {}

    def _start(self):
        actor = self.actor_class.remote(*self.args)
        return actor

    def pids(self) -> list:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def map(self, runs, console):
        ray = self.ray
        queue = collections.deque(runs)
        attempts = collections.Counter()
        idle = list(self.workers)
        busy = {}  # future -> (run, worker)
        while queue or busy:
            while queue and idle:
                worker, run = idle.pop(0), queue.popleft()
                busy[worker.run.remote(run.spec, run.name)] = (run, worker)
                if not attempts[run.name]:
                    yield run, None
            ready, _ = ray.wait(list(busy), num_returns=1)
            future = ready[0]
            run, worker = busy.pop(future)
            try:
                out = ray.get(future)
            except ray.exceptions.RayActorError:
                attempts[run.name] += 1
                self.workers.remove(worker)
                replacement = self._start()
                self.workers.append(replacement)
                idle.append(replacement)
                self.replacements += 1
                if attempts[run.name] >= MAX_ATTEMPTS:
                    yield run, Outcome("failed", {}, error=f"its worker died {attempts[run.name]} times")
                else:
                    console.notice(f"a worker died while making {run.name}; it runs again on another")
                    queue.appendleft(run)
                continue
            except ray.exceptions.RayTaskError as e:  # the run raised in the worker
                idle.append(worker)
                cause = getattr(e, "cause", None) or e
                yield run, Outcome("failed", {}, error=f"{type(cause).__name__}: {str(cause)[:300]}")
                continue
            idle.append(worker)
            self.counts_seen[out["pid"]] = (out["pictures_encoded"], out["prompts_encoded"])
            outcome = self._write(run, out)
            yield run, outcome
            if outcome.status == "interrupted":
                return

    def _write(self, run, out) -> Outcome:
        """The run's files into the sweep's folder, the sidecar last: whole files or none."""
        import json

        from .signals import deferred as interrupts_deferred

        folder = run.spec.output.parent
        sidecar = out["sidecar"]
        with interrupts_deferred():
            for name, data in out["files"].items():
                if name != sidecar:
                    files.write_bytes_atomic(folder / name, data)
            if sidecar in out["files"]:  # none from a run stopped before its first step
                files.write_bytes_atomic(folder / sidecar, out["files"][sidecar])
        record = json.loads(out["files"].get(sidecar, "{}"))
        return Outcome(out["status"], out["timings"], record.get("seed"), record.get("unet_calls"),
                       signum=out["signum"], worker=f"pid {out['pid']}")

    def counts(self) -> dict:
        return {"workers": self.count, "worker_replacements": self.replacements,
                "pictures_encoded": sum(p for p, _ in self.counts_seen.values()),
                "prompts_encoded": sum(c for _, c in self.counts_seen.values())}

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:  # already gone
                pass
        if self.started_ray:
            self.ray.shutdown()

"""One spec through a session: check, plan, load, walk, keep, record.

Everything that can be checked is checked before any weight is read: the input picture, the output
folder, the model's files and configs, the plan, the prompts and the memory it needs. A run that
stops before its first step (its first UNet call) leaves no file (the output lock removes the
folders it made). From then on the sidecar exists: "running", rewritten as each file lands, and
"finished", "interrupted" or "failed" at the end; a run killed outright leaves "running" with every
whole file listed.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import costs, errors, files, images, options, outputs, privacy, record, render, signals, sinks
from .adapters import unused_tokens
from .console import Console
from .errors import InputError, NumericalError, OutputError
from .plan import RunPlan, make_plan
from .memory import release_cpu_buffers
from .sampler import seed_keys
from .spec import RunSpec
from .walk import walk


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


@dataclass
class RunResult:
    status: str  # finished, interrupted
    files: list
    sidecar: Path
    signum: int | None = None
    timings: dict | None = None


def upright_size(picture) -> tuple:
    """(H, W) of a loaded picture as it stands in its file, before any resizing: what the plan
    sizes the run from."""
    w, h = picture.upright_size or picture.size
    return h, w


def picture_notices(picture) -> list:
    """What loading did to the picture, but its resizing: the plan says how the run sizes it."""
    return [line for line in picture.notices if line != picture.resized]


def plan_for(session, spec, image_size: tuple | None, notice=lambda line: None) -> RunPlan:
    """The spec planned against the session's model: its configs and tokenizers, no weights."""
    from .calibrate import asked_dtype_note

    session.open()
    slow = asked_dtype_note(session.dtype_name) if session.model_spec.dtype is not None else None
    if mx.default_device() == mx.cpu and slow:
        notice(slow)  # before the speed of its products is measured
    plan = make_plan(spec, session.config, session.tokenizers, image_size, notice, session.machine())
    texts = {"prompt": plan.spec.prompt, "negative prompt": plan.spec.negative_prompt}
    if plan.spec.inversion is not None:
        texts["inversion prompt"] = plan.spec.inversion.prompt
    if not plan.reads_negative:
        del texts["negative prompt"]
    for line in unused_tokens(session.learnt, list(texts.values())):
        notice(line)
    if session.source.get("source") == "package" and session.source.get("model") == "shapes":
        from .scenes import outside_training

        for line in outside_training(texts, plan.image_size, [w for *_, words in session.learnt for w in words]):
            notice(line)
    return plan


def _check_picture(spec: RunSpec, picture) -> None:
    """The loaded picture given with a spec is the spec's own image: the run reads one and its record
    names the other."""
    if picture is None:
        return
    if not spec.img2img:
        raise InputError("a picture was given with a text-to-image spec (its image is None); set the "
                         "spec's image, or leave the picture out")
    if not isinstance(picture, images.LoadedImage):
        raise InputError(f"the picture is a {type(picture).__name__}; give images.load_image(spec.image)")
    if picture.pixels_changed():  # its record and the session's cache would name the file's pixels
        raise InputError("the picture's pixels are not the ones load_image decoded (changed or replaced since); "
                         "a run records the file it names, so give the picture as load_image returns it")
    try:
        same = os.path.samefile(picture.path, spec.image)
    except OSError:
        same = False
    if not same:
        raise InputError(f"the picture was loaded from {picture.path}, but the spec's image is {spec.image}; "
                         "give the same file to both")


def _strings(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value)


# execute's other arguments: (what each must be, its test)
_ARGUMENT_KINDS = {"argv": ("a list of strings", _strings), "notes": ("a list of strings", _strings),
                   "timings": ("a dict", lambda v: isinstance(v, dict)),
                   "wait": ("True or False", lambda v: isinstance(v, bool)),
                   "output_named": ("True or False", lambda v: isinstance(v, bool)),
                   "replay": ("a function or None", lambda v: v is None or callable(v)),
                   "check_plan": ("a function or None", lambda v: v is None or callable(v))}


def _check_arguments(**given) -> None:
    """execute's other arguments, each of its kind: a string given as argv was recorded letter by
    letter, notes said one letter each, timings=[] failed mid-run."""
    for name, value in given.items():
        kind, fits = _ARGUMENT_KINDS[name]
        if not fits(value):
            raise InputError(f"execute's {name} is {type(value).__name__} {str(value)[:40]!r}, not {kind}")


def _checked_replay(replay):
    """The caller's replay(spec, model_arg), its answer checked: the record's arguments, which
    --replay reads (a number there made a picture no replay could read)."""
    def checked(resolved, model_arg):
        argv = replay(resolved, model_arg)
        if not _strings(argv):
            raise InputError(f"execute's replay gave {type(argv).__name__} {str(argv)[:40]!r}, not a list of "
                             "the arguments (strings) that make the run again")
        return list(argv)
    return checked


def execute(session, spec, console=None, argv=(), replay=None, picture=None, wait: bool = False,
            timings: dict | None = None, notes=(), output_named: bool = True, check_plan=None) -> RunResult:
    """Plan, load, walk, keep and record one spec, holding the lock of its output name (another run
    writing the same name is refused with OutputBusy, or with `wait` waited for). `picture` is the
    loaded input (images.load_image; None: load spec.image here), read again at the plan's working
    size where it differs; `replay(resolved_spec, model_arg)` gives the arguments that make the
    same files again, for the record (default: the commands' own, so that `--replay` remakes a
    picture a script made); `timings` (the caller's, if given) receives the run's
    timings as they are measured; `notes` are shown once the checks and the loading have passed
    (a refused run says only why); `console` says the run's lines (None: a quiet one);
    `output_named` False: the output's name is not the user's (a sweep's run), so a picture there
    is replaced only where it is ours (outputs.check_in_the_way); `check_plan(plan, paths)` may
    refuse the plan and the files it names, before anything heavy is read.

    Ctrl-C (KeyboardInterrupt; SIGTERM and SIGHUP too inside `signals.handled()`, as the commands
    run it: elsewhere they end the process) stops the run and returns its result with status "interrupted",
    its files and sidecar kept (a stop before the first step's UNet call leaves no sidecar, unless
    an earlier run's files are listed in it): a loop over runs checks `result.status` to stop too.
    A stop before the walk (the checks, the loading) has written nothing, and is raised as it came."""
    started = time.perf_counter()
    timings = {} if timings is None else timings
    if not isinstance(spec, RunSpec):
        raise InputError(f"execute takes a RunSpec, not {type(spec).__name__}")
    if spec.output is None:
        raise InputError("execute writes a run's files: give the RunSpec an output path (the generation "
                         "methods of StableDiffusion write none)")
    from .session import Session

    if not isinstance(session, Session):
        raise InputError(f"execute takes a Session (session.Session(ModelSpec(...))), not {type(session).__name__}")
    console = Console(quiet=True) if console is None else console
    if not isinstance(console, Console):
        raise InputError(f"execute's console is a console.Console (or None: a quiet one), not {type(console).__name__}")
    spec = spec.validate()
    _check_picture(spec, picture)
    _check_arguments(argv=argv, notes=notes, timings=timings, wait=wait, output_named=output_named,
                     replay=replay, check_plan=check_plan)
    if replay is None:
        def replay(resolved, model_arg):  # the adapters the model holds as the record is made
            return options.replay_argv(resolved, model_arg, session.model_as_held())
    else:
        replay = _checked_replay(replay)
    _reset_peaks()
    if spec.img2img and picture is None:
        picture = images.load_image(spec.image, multiple=64)
        for line in picture_notices(picture):
            console.notice(line)

    def waiting(holder):
        console.notice(f"{spec.output} is being written by another run ({holder}); waiting")

    outputs.check_name_length(spec.output)  # before its name is looked up (an OSError then); the plan's below
    with outputs.namesake_lock(spec.output, wait, waiting), files.output_lock(spec.output, wait, waiting), \
            files.as_private_as(spec.output):
        # --- 1. checks: nothing heavy is read, and nothing but the output folder is made ---------
        outputs.prepare(spec.output, console.notice)
        plan = plan_for(session, spec, upright_size(picture) if spec.img2img else None, console.notice)
        names = outputs.FileNames(spec.output, plan.longest)
        left = outputs.left_by_us(names)  # the lock is held: the sidecar stays as read until the walk
        paths = outputs.planned_files(plan, names)
        if check_plan is not None:
            check_plan(plan, paths)
        outputs.check_name_length(spec.output, [p.name for p in paths])
        replaced = outputs.check_in_the_way(names, paths, left, output_named)
        if replaced:
            console.notice(replaced)
        if spec.img2img:
            picture = session.fit(picture, plan.image_size)
        preview = _preview_source(plan, session)  # found and its config read; loaded with the model
        if not spec.capture.save_prompt:
            privacy.salt()  # a salt that cannot be made or trusted is refused before the work
        memory = _check_memory(session, plan, console)  # a refusal is one line: before the plan's
        for line in session.warnings:
            console.notice(line)
        for line in session.notices:
            console.detail(f"note: {line}")
        for line in plan.describe():
            console.say(line)
        console.say(f"seed {plan.spec.seed}")
        timings["checks_s"] = elapsed(started)

        # --- 2. load: strict keys, shapes and dtypes (model_io), once per session -------------
        environment = _environment(session, console)
        taesd = preview.load(session.dtype) if preview else None  # small: before the model's weights
        sd = session.load(timings)
        for line in [*notes, *adapter_notices(sd)]:
            console.notice(line)
        # What every picture carries; the run's own facts (the arguments as typed, the process) only
        # in the sidecar: a picture depends on what makes it, not on its name or its process.
        carried = record.base(plan, session, environment, replay, picture)
        ledger = record.Ledger(names.sidecar(), dict(carried, argv=privacy.redact_argv(argv, plan.spec),
                                                     pid=os.getpid(), **record.run_facts(plan)))

        # --- 3. walk and keep; the sidecar says how the run ended ------------------------------
        status, error, interrupt = "failed", None, None
        kept, denoisers = [], []  # filled as they are made: the last record reads what there is
        try:
            # Inside: a signal that lands just after the sidecar appears still ends it "interrupted".
            ledger.earlier = outputs.earlier_files(names, left, console.notice)  # listed until made again
            ledger.write("running")
            texts = functools.partial(record.picture_texts, plan, carried, session.source)
            _walk_and_keep(session, sd, plan, names, ledger, texts, picture, taesd, console, timings, started,
                           kept, denoisers)
            outputs.remove_earlier(names, ledger.earlier, console.notice)
            ledger.earlier = {}
            status = "finished"
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (see signals.Terminated)
            status, interrupt = "interrupted", e
        except BaseException as e:
            error = errors.described(e, options.FLAGS)
            raise
        finally:
            timings["total_s"] = elapsed(started)
            with signals.shielded():  # the last word on the run: further signals cannot cut it short
                gone = _write_last(ledger, plan, status, error, kept, denoisers, timings, memory, console)
            if ledger.earlier:  # nothing of the earlier run is lost to a run that did not finish
                say = console.notice if status == "interrupted" else console.detail
                say(f"kept the {outputs.earlier_run_files(names, ledger.earlier)} that this run did not "
                    "make again (its sidecar lists them under earlier_files)")
            console.detail(describe_timings(timings, plan.estimate))
            console.detail(_describe_peaks(memory))
        if gone and status == "finished":
            raise OutputError(f"{len(gone)} file(s) of the run were removed before it ended ("
                              f"{', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}); the sidecar "
                              f"{names.sidecar()} lists them as missing")
        return RunResult(status, ledger.files, names.sidecar(),
                         None if interrupt is None else getattr(interrupt, "signum", signal.SIGINT), timings)


def _walk_and_keep(session, sd, plan, names, ledger, texts, picture, taesd, console, timings, run_started,
                   kept, denoisers):
    """The walk, each Step evaluated once and handed to the sinks; `kept` and `denoisers` receive
    the sinks and the denoisers as they are made."""
    spec, c = plan.spec, plan.spec.capture
    # 1. the clean latent of the input picture (text to image has none), the seed's noise, the text
    h, w = plan.image_size
    x0 = mx.repeat(session.encode(picture, timings), spec.n_images, axis=0) if spec.img2img else None
    eps = sd.initial_noise((spec.n_images, h // sd.downscale, w // sd.downscale, sd.latent_channels), spec.seed)
    for what, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt or "")):
        for learnt, word in sd.tokenizers[0].learnt_inside(text):
            console.notice(f"the learnt token {learnt!r} is read inside the word {word!r} of the {what}, which the "
                           "text encoder then reads in pieces around it, as diffusers does; put spaces around the "
                           "token, or give the embedding another one ({flag:embeddings} PATH:TOKEN)")
    cond = session.condition(spec.prompt, spec.negative_prompt, plan.guided, spec.n_images, plan.image_size,
                             timings)
    denoisers.append(sd.denoiser(cond, spec.cfg, _after_layer))
    if plan.inversion is not None:
        inv = spec.inversion
        prompt = spec.prompt if inv.prompt is None else inv.prompt
        inv_cond = session.condition(prompt, spec.negative_prompt, inv.cfg > 1.0, spec.n_images,
                                     plan.image_size, timings)
        denoisers.append(sd.denoiser(inv_cond, inv.cfg, _after_layer))
    started = time.perf_counter()

    # 2. what the run keeps, and the one writer its pictures go through
    writer = sinks.FrameWriter(sinks.make_decoder(sd, c.preview, taesd), c.decode_batch,
                               ledger, texts, c.format, spec.n_rows)
    kept += _sinks(plan, names, writer, sd, x0, picture, console, timings)

    # 3. the walk: the path, then each row; a progress bar each, with the run's time left
    visits = walk(sd.noise_schedule, plan, denoisers[0], x0, eps, seed_keys(spec.seed),
                  denoisers[1] if len(denoisers) > 1 else None)
    clock = None if plan.estimate is None else costs.TimeLeft(plan.estimate)
    finished = []  # the sinks whose finish is done (step 4)
    try:
        for row, group in itertools.groupby(visits, key=lambda visit: visit.row):
            steps = (visit.step for visit in group)
            for step in console.progress(steps, *_progress(plan, row), clock and clock.seconds):
                _evaluate(step, session, timings, run_started)
                for sink in kept:
                    sink.add(row, step)
                if clock is not None:
                    clock.step_done(row, step.index, len(writer.pending))
                    _note_if_slow(clock.slow(), console)
            writer.flush()
            for sink in kept:
                sink.phase_done(row)
        release_cpu_buffers()  # the UNet is done: what remains is VAE decoding
        timings["steps_and_frames_s"] = elapsed(started)

        # 4. what is made of whole rows: the final picture or the triangle, fidelity, curves, animation
        finishing = time.perf_counter()
        for sink in kept:
            sink.finish()
            finished.append(sink)
        timings["finish_s"] = elapsed(finishing)
    except KeyboardInterrupt as e:
        # The frames made before the stop (waiting for their decoding batch, or in the batch it cut
        # short) are written, then what whole rows make (a partial triangle), by the sinks not yet
        # finished (a stop as the last rows' fidelity is decoded lost the triangle). A second stop
        # drops what is not yet written (a full-size decode takes seconds a frame on a CPU); later
        # ones are ignored until the run's record is written (signals.stop).
        if writer.waiting():
            again = "another stop signal" if isinstance(e, signals.Terminated) else "Ctrl-C again"
            console.notice(f"stopping: writing the {writer.waiting()} frame(s) made before the stop "
                           f"({again} to drop them)")
        try:
            with signals.second_stop_skips():
                for sink in (writer, *(sink for sink in kept if sink not in finished)):
                    try:
                        sink.salvage()
                    except signals.Skipped:
                        raise
                    except Exception as e:  # noqa: BLE001 - the run ends as interrupted, whatever this does
                        console.notice(f"what the run made so far could not be written ({type(e).__name__}: {e})")
        except signals.Skipped:
            console.notice("stopped again: what the run had not yet written is dropped")
        raise


# Steps this many times slower than the machine's measure: something else has the cores (the
# estimates run up to 2x low on a quiet VM).
SLOW_PACE = 3.0


def _note_if_slow(pace: float | None, console) -> None:
    """A note where the walk runs at SLOW_PACE times its estimate or more: on a CPU, another program
    computing on the same cores (a second run, a test suite) slows both far more than by half, as
    each one's BLAS threads wait on the other's."""
    # Only where the BLAS is OpenBLAS's, whose threads the advice names (a GPU's estimates are not
    # checked against contention here).
    if pace is None or pace < SLOW_PACE or mx.default_device() != mx.cpu or sys.platform != "linux":
        return
    load = f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores"  # Linux has both
    console.notice(f"the steps take {pace:.1f}x the time this machine's measure gives ({load}): other "
                   "programs computing on these cores slow a run far more than by their share; run one "
                   "at a time, or give each OPENBLAS_NUM_THREADS=1 (its pixels then differ slightly from a "
                   "run with more threads)", once_as="slow steps")


def _sinks(plan, names, writer, sd, x0, picture, console, timings) -> list:
    """The sinks of the plan's capture settings, in the order they finish."""
    spec, c = plan.spec, plan.spec.capture
    ends, curves = sinks.Ends(len(plan.rows)), sinks.Curves(plan.rows, c.last)
    noising = sinks.NoisingFrames(writer, plan, names, c.noising_path) if plan.shown else None
    reference = None if picture is None else (picture.pixels + 1.0) / 2.0
    vae = sinks.make_decoder(sd, "vae")
    if spec.triangle:
        cells = sinks.TriangleCells(writer, plan, c.shows, noising)

        def finals():  # each row's final picture as the VAE makes it, whatever its cells show
            if c.frames_are_pictures:  # the rows' last cells are that picture
                return [row[-1] for row in cells.cells]
            return list(render.to_uint8(vae(mx.concatenate([end.x_t[:1] for end in ends.finals]))))
        fidelity = sinks.Fidelity(plan, reference, x0, ends, finals, console.say, at_hand=c.frames_are_pictures)
        chain = [cells, ends, curves, fidelity, sinks.TriangleCanvas(writer, spec.output, plan, cells, fidelity)]
        frames = cells.l_path
    else:
        row = plan.rows[0]
        snapshots = sinks.Snapshots(writer, names, row, c.shows, reuse_final=c.frames_are_pictures,
                                    keep=c.animate is not None)
        final = sinks.FinalPicture(writer, spec.output, row, ends, snapshots, vae, timings)
        fidelity = None
        if spec.img2img:
            fidelity = sinks.Fidelity(plan, reference, x0, ends, lambda: [final.picture], console.say)
        best = sinks.BestStep(writer, names.best() if c.keep_best else None, row, curves, vae, console.say)
        chain = [snapshots, ends, curves, final, fidelity, best]

        def frames():
            if noising is None:
                return snapshots.frames
            # the path's last frame is the run's start (its x_t, at the same level): shown once
            again = noising.start_of(row) is not None
            return noising.frames() + [(picture, info) for picture, info in snapshots.frames
                                       if not (again and info["step"] == 0 and info["shows"] == "xt")]
    if c.curve:
        chain.append(sinks.CurvePlot(writer, names.curve(), curves))
    if c.animate:
        chain.append(sinks.Animation(writer, names.animation(c.animate), c.animate, frames, c.labels))
    return [sink for sink in [noising, *chain] if sink is not None]


def _progress(plan, row: int | None) -> tuple[int, str]:
    """(steps, name) of a progress bar: the path's, or a row's. Steps as the plan counts them: a
    phase's start (index 0: the clean latent, or the noised start) is no step."""
    if row is None:
        return (plan.inversion.steps if plan.inversion is not None else len(plan.path) - 1), "noising"
    r = plan.rows[row]
    return r.timeline.steps, f"s={r.strength:g}" if plan.spec.img2img else "denoising"


def describe_timings(timings: dict, estimate=None) -> str:
    """The sidecar's timings as -v prints them at the end: "timings: load 3.10 s, ..., total 41.00 s
    (estimated 45 s)"."""
    line = "timings: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.2f} s"
                                   for name, seconds in timings.items())
    return line if estimate is None else f"{line} (estimated {estimate.seconds:.2f} s)"


def _evaluate(step, session, timings: dict, started: float) -> None:
    """Run the step's graph once; stop at the first non-finite latent."""
    mx.eval(step.x_t) if step.x0_pred is None else mx.eval(step.x_t, step.x0_pred)
    if step.index > 0:
        # Command start (after Python's imports) to the first denoising step done.
        timings.setdefault("first_step_s", elapsed(started))
    if not mx.all(mx.isfinite(step.x_t)).item():
        where = ("in the noised start (step 0)" if step.index == 0
                 else f"at step {step.index} of {step.count}")
        from .adapters import LoraInfo

        loras = [a.path.name for a in session.sd.adapters if isinstance(a, LoraInfo)]
        raise NumericalError(f"the latents became NaN or Inf {where} (dtype {session.dtype_name}); "
                             + numerical_advice(session.dtype_name, session.model_spec.quantize, loras))


def _write_last(ledger, plan, status, error, kept, denoisers, timings, memory, console) -> list:
    """The sidecar's last word; returns the listed files gone before it (see Ledger.write_last).
    If the disk refuses it, the error that ended the run still gets reported (the sidecar then
    says "running")."""
    extra = dict(unet_calls=sum(d.calls for d in denoisers), timings=timings,
                 memory=dict(memory, peak_rss_bytes=_peak_rss(), mlx_peak_bytes=mx.get_peak_memory()))
    for sink in kept:
        extra.update(sink.record())
    if plan.inversion is not None and len(denoisers) == 2:
        inv = privacy.redacted(plan.spec).inversion
        extra["inversion"] = {"steps": plan.inversion.steps, "refine": inv.refine, "cfg": inv.cfg,
                              "prompt": inv.prompt, "unet_calls": denoisers[1].calls}
    if error is not None:
        extra["error"] = error
    if status == "interrupted" and not (ledger.files or ledger.earlier or extra["unet_calls"]):
        ledger.path.unlink(missing_ok=True)  # stopped before its first step: nothing made, nothing to say
        return []
    try:
        return ledger.write_last(status, extra)
    except OutputError as e:
        if status == "finished":
            raise
        # A failed run's own error follows, most often of the same cause (a full disk): one line
        say = console.error if status == "interrupted" else console.detail
        say(f"error: the sidecar could not be updated: {e}")
        return []


# --- checks and the environment ----------------------------------------------------------------------

def _check_memory(session, plan, console) -> dict:
    """The run's peak memory, estimated from the configs and sizes; refused if it cannot fit."""
    from . import budget

    spec = plan.spec
    h, w = plan.image_size
    width = 2 if spec.capture.shows == "both" else 1
    cells = sum(len(r.kept) for r in plan.rows) if spec.triangle else spec.n_images
    canvas = max(cells * width, len(plan.shown)) * h * w
    estimate = budget.estimate_peak_bytes(
        session.config, session.dtype_name, (h, w), spec.n_images, 1, canvas,  # one latent decoded at a time
        plan.guided, encode=spec.img2img, counts=session.parameter_counts,
        **budget.device_paths(session.dtype_name))
    available = budget.available_memory()
    console.detail(f"memory: about {budget.gib(estimate['total'])} needed at the peak, "
                   + (f"{budget.gib(available)} available" if available else "available unknown"))
    budget.check_fits(estimate, available)
    return {"estimate_bytes": estimate, "available_bytes": available}


def _environment(session, console) -> dict:
    """The device and BLAS the run computes on, for the record; -v says more."""
    from .blas import coretype_note, preload_blas
    from .calibrate import default_cpu_dtype
    from .ops import native_status

    console.detail(_describe_model(session.source))
    blas = preload_blas()
    described = blas.described()
    console.detail(f"BLAS: {described}; device {mx.default_device()}; dtype {session.dtype_name}")
    slow_kernels = coretype_note(blas) if session.dtype_name == "float32" else None
    if slow_kernels:
        console.detail(slow_kernels)
    console.detail(native_status())
    if mx.default_device() == mx.cpu and session.model_spec.dtype is None:
        console.detail(default_cpu_dtype()[1])
    return {"device": str(mx.default_device()), "blas": described, "kernels": native_status()}


def _describe_model(source: dict) -> str:
    """-v's line on the model that runs: what it is and where it was read from."""
    where = {"package": "ships with the package", "folder": "a local folder",
             "hub": f"hub cache, revision {source.get('revision')}",
             "file": f"a single file: {source.get('family')}, {source.get('prediction_type')}"}
    commit = f" at commit {source['commit'][:12]}" if source.get("commit") else ""
    line = f"model {source['model']}{commit} ({where.get(source.get('source'), source.get('source'))})"
    return line + (f", VAE {source['vae']}" if source.get("vae") else "")


def _preview_source(plan, session):
    """The TAESD of `--preview taesd`, found; None for the other previews."""
    c = plan.spec.capture
    if c.preview != "taesd":
        return None
    from .taesd import find_preview

    return find_preview(c.taesd, "sdxl" if session.config.is_xl else "sd", session.config.vae.latent_channels)


def _after_layer(x: mx.array) -> None:
    """Evaluate after each UNet layer: Python handles a signal only between MLX calls, so Ctrl-C,
    SIGTERM and SIGHUP then act within one layer rather than one whole step (tens of seconds at
    512x512 on a CPU). A stop that Python could not raise (it landed in a callback of its import
    machinery, which drops the exception) is raised here."""
    mx.eval(x)
    signals.raise_if_stopped()


def _reset_peaks() -> None:
    """The peaks the sidecar reports are the run's own: in a sweep, the runs after the first
    would otherwise report the process's highest so far."""
    mx.reset_peak_memory()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # Linux: VmHWM starts again from the current resident size
    except OSError:
        pass


def _describe_peaks(memory: dict) -> str:
    """-v's last line: the memory the run took at its peak, measured, beside the estimate."""
    def size(n: int) -> str:
        return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"

    rss = _peak_rss()
    return (f"memory at the peak: {'unknown' if rss is None else size(rss)} resident, "
            f"{size(mx.get_peak_memory())} of it MLX's arrays (estimated {size(memory['estimate_bytes']['total'])})")


def _peak_rss() -> int | None:
    """The process's peak resident memory (VmHWM), in bytes, where the system says."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def adapter_notices(sd) -> list:
    """What loading the adapters skipped, a line each."""
    from .adapters import LoraInfo

    return [a.notice for a in sd.adapters if isinstance(a, LoraInfo) and a.notice]


def numerical_advice(dtype_name: str, quantized: bool, loras: list = ()) -> str:
    """What to try when the latents stop being finite; `loras`: the names of the LoRA files fused."""
    if dtype_name != "float32":
        advice = "half precision overflowed: run again with {flag:dtype} float32"
        if loras:  # or the LoRA's weights are too large for any dtype
            advice += f"; if that fails too, run without {{flag:loras}} {', '.join(loras)}, or with a smaller weight"
    elif loras:
        advice = (f"float32 does not overflow here, so the weights are likely too large: run without "
                  f"{{flag:loras}} {', '.join(loras)}, or with a smaller weight; else check the model files")
    else:
        advice = ("float32 does not overflow here, so the model's weights may hold NaN or Inf: "
                  "check the model files")
    return advice + (", or without {flag:quantize}" if quantized else "")

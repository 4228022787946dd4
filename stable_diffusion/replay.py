"""`--replay PICTURE`: a picture's metadata turned into arguments, read as untrusted input.

A picture may come from anywhere. A record of ours gives the arguments that made it; another
tool's `parameters` text gives the fields it shares with ours. Either way the picture chooses
settings only: never where the run writes (`--output`), never a further replay, never how the
process behaves (waiting, verbosity), and never a model fetched from the hub unless the user
asks (`--allow-download`; the command line enforces it with `check_local`). A record that is not
a list of known flags and values is refused whole, with one line.

The flags a record may hold are those of the parser the command line builds (passed in), so that
this module knows no flag names besides the few it refuses, which it knows by their fields.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import options
from .errors import InputError
from .files import text_flaw
from .spec import MAX_ADAPTERS, format_named

COMMANDS = ("image2image", "txt2image")
# Fields a picture may not set, and why: destinations, other sources, the process's behaviour.
REFUSED = {"output": "where the run writes is the user's to choose",
           "replay": "a replay cannot start another",
           "help": "not a setting", "print_parser": "not a setting", "quiet": "not a setting",
           "verbose": "not a setting", "wait": "not a setting",
           "allow_download": "only the user may allow a download",
           "allow_long_replay": "only the user may allow a long replay", "version": "not a setting"}
# What a replay starts unless --allow-long-replay is given: a picture's settings, each within its
# bounds, may multiply to days of work and tens of thousands of files (and one the user gives with
# it, lowering one of them, would leave the others as the picture set them).
MAX_REPLAY_SECONDS, MAX_REPLAY_FILES = 6 * 3600, 1000
MAX_ARGUMENTS = 256  # ours hold about 40
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_SIDE = 1 << 16  # pixels: a recorded input size beyond it is not a picture of ours
MAX_ARGUMENT_CHARS = 1 << 20  # a prompt far beyond the 77 tokens any text encoder reads


def _refuse(path, reason: str) -> InputError:
    return InputError(f"replay of {_shown(path)}: {reason}; the picture cannot be replayed")


def _shown(text) -> str:
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return text if text.isprintable() else ascii(text)


def check_arguments(arguments, parser, path) -> list:
    """The recorded argument list, checked: a list of strings of sane sizes, every flag one the
    parser knows (exactly as it knows it: no abbreviation, no short flags run together), none of
    REFUSED, and the whole a command the parser accepts on its own. Returns it as a new list."""
    if not isinstance(arguments, list) or not arguments:
        raise _refuse(path, "its record's `replay` is not a list of arguments")
    if len(arguments) > MAX_ARGUMENTS:
        raise _refuse(path, f"its record holds {len(arguments)} arguments, more than {MAX_ARGUMENTS}")
    for item in arguments:
        if not isinstance(item, str):
            raise _refuse(path, f"its record's arguments must be text, found {type(item).__name__}")
        if len(item) > MAX_ARGUMENT_CHARS:
            raise _refuse(path, f"its record holds an argument of {len(item)} characters")
        if flaw := text_flaw(item, kept_bytes=True):
            raise _refuse(path, f"its record holds {flaw}")
    actions = parser._option_string_actions  # option string -> action (argparse keeps no public map)
    for item in arguments:
        if item == "--":
            break  # positionals only from here
        if not item.startswith("-") or item == "-" or options.NEGATIVE_NUMBER.match(item):
            continue
        name = item.split("=", 1)[0]
        action = actions.get(name)
        if action is None:
            if " " in item:  # argparse reads it as a value
                continue
            raise _refuse(path, f"its record holds {_shown(name)[:60]!s}, not a flag of this command")
        if action.dest in REFUSED:
            raise _refuse(path, f"its record sets {name} ({REFUSED[action.dest]})")
    try:
        parsed = parser.parse_args(list(arguments))
    except InputError as e:
        raise _refuse(path, f"its record is not a command ({_clipped(str(e).removesuffix(' (see --help)'))})") from None
    except SystemExit:
        raise _refuse(path, "its record is not a command") from None
    for dest in REFUSED:  # belt and braces: whatever argparse made of it, these stay as they were
        if hasattr(parsed, dest) and getattr(parsed, dest) != parser.get_default(dest):
            raise _refuse(path, f"its record sets {dest} ({REFUSED[dest]})")
    return list(arguments)


def check_record(record, command: str, path) -> dict:
    """The shape of a record of ours, as far as a replay reads it."""
    if not isinstance(record, dict):
        raise _refuse(path, "its record is not a JSON object")
    made_by = record.get("command")
    if made_by not in COMMANDS:
        raise _refuse(path, f"its record names no command of ours ({_shown(made_by)[:40]})")
    if made_by != command:
        raise InputError(f"{_shown(path)} was made by {made_by}; replay it with {options.program(made_by)}")
    source = record.get("input")
    if source is not None and not (isinstance(source, dict) and isinstance(source.get("path"), str)
                                   and isinstance(source.get("sha256", ""), str)):
        raise _refuse(path, "its record's input is not a path and a digest")
    for key in ("versions",):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise _refuse(path, f"its record's {key} is not an object")
    for key in ("device", "dtype", "blas", "kernels"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise _refuse(path, f"its record's {key} is not text")
    private = record.get("private")
    if private is not None and private is not False and not (
            isinstance(private, dict) and isinstance(private.get("fields", []), list)
            and all(isinstance(f, str) for f in private.get("fields", []))):
        raise _refuse(path, "its record's private is not an object listing the hashed fields")
    adapters = record.get("adapters")
    if adapters is not None and not (isinstance(adapters, list) and len(adapters) <= 2 * MAX_ADAPTERS and all(
            isinstance(a, dict) and a.get("kind") in ("lora", "embedding")
            and isinstance(a.get("sha256"), str) and _SHA256.match(a["sha256"]) for a in adapters)):
        raise _refuse(path, f"its record's adapters is not a list of at most {2 * MAX_ADAPTERS} LoRA and "
                            "embedding entries, each with its file's sha256")
    size = (source or {}).get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(
            type(v) is int and 0 < v <= MAX_SIDE for v in size)):
        raise _refuse(path, "its record's input size is not two sizes in pixels")
    return record


def _clipped(text: str, limit: int = 160) -> str:
    """A message quoted inside another, cut at a word where long (it was cut mid-word: "see --h")."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def find(argv: list, parser) -> tuple[str, list] | None:
    """(the picture of `--replay PICTURE` or `--replay=PICTURE`, the flag spelled as argparse takes
    it, the other arguments), or None."""
    argv = parser.joined(argv)  # a bare flag before --replay PICTURE stays bare once it is taken out
    for i, arg in enumerate(argv):
        if arg == "--":
            return None
        if _dest(arg, parser) != "replay":
            continue
        if "=" in arg:
            picture, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
        elif i + 1 < len(argv):
            picture, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        else:
            picture = rest = None
        if not picture:  # an empty name was read as the folder '.'
            raise InputError("--replay needs a picture: --replay out.png")
        return picture, _no_other_replay(rest, parser)
    return None


def _separator(arguments: list) -> int:
    """Where the flags end: the index of "--", else the length (positionals only after it)."""
    return arguments.index("--") if "--" in arguments else len(arguments)


def _no_other_replay(rest: list, parser) -> list:
    if any(_dest(a, parser) == "replay" for a in rest[:_separator(rest)]):
        raise InputError("--replay is given twice: replay one picture at a time")
    return rest


def expand(command: str, argv: list, parser) -> tuple[list, list, dict | None]:
    """argv with `--replay PICTURE` expanded into the arguments the picture gives, the rest of
    argv after them (so that the user's flags override), the notes to show, and the record of
    ours (None: another tool's text, or no replay)."""
    found = find(argv, parser)
    if found is None:
        return argv, [], None
    path, rest = found
    from . import infotext, picture_meta

    if Path(path).suffix.lower() == ".json":
        _refuse_a_sidecar(path)
    text, record_text = picture_meta.read_picture_texts(path)
    record = picture_meta.read_picture_metadata(path)[1] if record_text is not None else {}
    if isinstance(record, dict) and "replay" in record or not isinstance(record, dict):
        record = check_record(record, command, path)
        recorded = parser.joined(check_arguments(record.get("replay"), parser, path))
        _check_input_named_once(record, recorded, path)
        rest, picture = _picture_given(command, rest, record, path)
        notes, base = [], recorded
        if record.get("private"):
            recorded, base, notes = private_replay(command, path, record, recorded, rest, parser)
        size = _recorded_size(record, recorded)
        recorded, base = _with_size(recorded, size), _with_size(base, size)
        kept = without_relisted(base, rest, parser)
        if picture is not None:  # in place of the recorded input, its first positional
            first = options.argument_roles(kept).index("positional")
            kept = [*kept[:first], picture, *kept[first + 1:]]
        k = _separator(kept)  # the user's flags go before the positionals (a prompt "-like this")
        expanded = kept[:k] + rest + kept[k:]
        notes += input_changed(path, record, picture) + adapters_changed(path, record, recorded) \
            + model_changed(path, record, parser, recorded)
        changed = _changed(parser, recorded, expanded, record.get("dtype"))
        # -gt 0 of a triangle: one picture, whose strength the record does not hold (0.9 was taken)
        untriangled = bool(changed) and "--generate_triangle" in changed and parser.given(recorded, "generate_triangle")
        if untriangled and not parser.given(rest, "strength"):
            raise InputError(f"replay of {path}: it is a triangle, and without the triangle a run makes one "
                             "picture: give its --strength too, e.g. --strength 0.5")
        frame = record.get("frame")
        if isinstance(frame, dict) and frame.get("partial") is not None and not untriangled:  # stopped early
            notes.append(f"replay of {path}: it holds part of a triangle ({_bounded(frame['partial'])}); "
                         "this run makes all of it")
        if changed is not None and picture is not None:  # input_changed says whether it is the same
            changed = [c for c in changed if c != "image"]
        # the same picture, at a new path (given where it was recorded, the record is the same)
        recorded_input = (record.get("input") or {}).get("path")
        moved = picture is not None and not notes and os.path.abspath(picture) != recorded_input
        if changed:
            notes.append(f"replay of {path} with other {', '.join(changed)}: the pictures may differ from it")
        elif not notes and changed is not None:
            dtype = _settings(parser, expanded)["dtype"]
            restated = dtype is not None and _settings(parser, recorded)["dtype"] is None  # in its record too
            notes = [sameness(path, record, dtype, "the picture's new path" if moved else
                              "the --dtype given" if restated else None)]
        return expanded, notes, record
    if text is None or not text.strip():
        from .sweep import marked_sheet
        from .sweep_manifest import MANIFEST

        if marked_sheet(Path(path)):
            raise InputError(f"{path} is a sweep's contact sheet, which holds no one run's parameters; replay one "
                             f"of the run pictures it shows (listed in the {MANIFEST} beside it)")
        tool = picture_meta.other_tool(path)
        what = "no `parameters` text" if text is None else "an empty `parameters` text"
        theirs = f"; its settings are {tool}'s own, which this tool does not read: give them as flags" if tool else ""
        raise InputError(f"{path} carries no parameters to replay ({what}, no record of ours){theirs}")
    try:
        fields, warnings = infotext.parse_parameters(text)
    except InputError as e:  # named by the picture it came from
        raise _refuse(path, f"its {e}") from None
    notes = [f"replay of {path}: {w}" for w in warnings]
    if fields.get("seed") == -1:  # A1111's word for a seed drawn at random, and not written down
        notes.append(f"replay of {path}: Seed -1 names no seed (the other tool drew one and did not write it "
                     "down): a new one is drawn, and the picture will differ")
        del fields["seed"]
    flags = []
    inversion = ("noising_path", "inversion_cfg", "inversion_refine", "inversion_prompt")
    if command == "txt2image" and "noising_path" in fields:  # as its strength, image2image's alone
        notes.append(f"replay of {path}: Noising path: inversion is image2image's (txt2image starts from pure "
                     "noise); not used")
        fields = {k: v for k, v in fields.items() if k not in inversion}
    for key in ("negative_prompt", "steps", "sampler", "schedule", "cfg", "seed", *inversion):
        if key in fields and (fields[key] not in (None, "") or key == "inversion_prompt"):  # "": an empty one
            flags.append(f"--{key}={fields[key]}")
    if "model" in fields and not any(_dest(a, parser) == "model" for a in rest):
        notes.append(f"replay of {path}: Model {fields['model']!r} names another tool's checkpoint; "
                     "pass --model to choose ours")
    sized = any(_dest(a, parser) in ("size", "max_pixels") for a in rest[:_separator(rest)])  # the user's
    if "width" in fields and "height" in fields and not sized:  # image to image too: A1111 resized to it
        # A1111's sides are multiples of 8, ours of 64: the nearest, said where it differs.
        width, height = (max(64, 64 * ((fields[k] + 32) // 64)) for k in ("width", "height"))  # halves up
        if (width, height) != (fields["width"], fields["height"]):
            notes.append(f"replay of {path}: Size {fields['width']}x{fields['height']} is not a multiple of 64 "
                         f"a side, as this tool's sizes are: run at {width}x{height} (width x height)")
        flags.append(f"--size={height}x{width}")
    if command == "image2image" and "strength" in fields:
        flags.append(f"--strength={fields['strength']}")
    if flaw := text_flaw(fields["prompt"] + fields.get("negative_prompt", ""), kept_bytes=True):
        raise _refuse(path, f"its parameters hold {flaw}")
    # The prompt last, after "--" (it may start with a dash): image2image's input picture is the
    # user's positional, wherever argparse finds it among their flags.
    expanded = flags + rest + ([] if "--" in rest else ["--"]) + [fields["prompt"]]
    if command == "image2image":
        _parsed(parser, expanded, f"{path} records no input picture: give it first, "
                                  f"{options.program('image2image')} INPUT --replay {path}")
    return expanded, notes, None


def _refuse_a_sidecar(path) -> None:
    """A sidecar of ours given to --replay is refused, naming its run's picture where it is there."""
    from .record import read_own_sidecar

    try:
        record = read_own_sidecar(path)
    except InputError:  # not ours, or not there: the picture reader says what it is
        return
    if record is None:
        return
    finals = [f.get("file") for f in record["files"] if isinstance(f, dict) and f.get("kind") in ("final", "triangle")]
    found = [Path(path).with_name(n) for n in finals if isinstance(n, str) and n and Path(n).name == n]
    named = f" (its run's: --replay {_shown(found[0])})" if found and found[0].is_file() else ""
    raise InputError(f"{_shown(path)} is a sidecar: --replay takes a picture, whose record is in it{named}")


def _parsed(parser, arguments: list, missing: str | None) -> dict:
    """The parsed arguments; a positional missing among them is said as `missing`, if given."""
    try:
        return vars(parser.parse_args(arguments))
    except InputError as e:
        if missing is not None and "the following arguments are required" in str(e):
            raise InputError(missing) from None
        raise


# The flags a private picture's texts other than the prompt are given again with, by field.
_PRIVATE_FLAGS = {"negative_prompt": "--negative_prompt", "inversion_prompt": "--inversion_prompt"}


def private_replay(command: str, path: str, record: dict, replayed: list, rest: list, parser) -> tuple:
    """A picture made with -sp 0 records hashes, not its texts: they must be given again, the
    prompt as the user's positional (`--replay a.png "PROMPT"`), the others by their flags.
    Returns (the recorded arguments with the texts given in the hashes' place; the arguments to
    expand, which leave the prompt to the user's; notes)."""
    from . import privacy

    fields = set(record["private"].get("fields", ()))
    where = 1 if command == "image2image" else 0  # the replay's positionals: [image,] prompt
    hashes = {field: a.split("=", 1)[1] for a in replayed for field, flag in _PRIVATE_FLAGS.items()
              if a.startswith(flag + "=")}
    hashes["prompt"] = replayed[where] if len(replayed) > where else None
    if "prompt" in fields and hashes["prompt"] != record.get("prompt"):
        raise _refuse(path, "its record's prompt is not where its arguments hold it")
    base = replayed[:where] + replayed[where + 1:] if "prompt" in fields else replayed
    # argparse itself finds the user's texts among their flags
    parsed = _parsed(parser, base + rest, f"{path} was made with -sp 0: it records a salted hash, not its "
                     f"prompt; give the prompt again: {command}.py --replay {path} \"PROMPT\""
                     if "prompt" in fields else None)
    given = {field: parsed[field] for field in ("prompt", *_PRIVATE_FLAGS) if field in fields}
    for field, flag in _PRIVATE_FLAGS.items():
        if field in given and given[field] == hashes.get(field):
            raise InputError(f"{path} was made with -sp 0: it records a salted hash, not its "
                             f"{field.replace('_', ' ')}; give it again with {flag} TEXT")

    def with_text(argument: str) -> str:
        for field, flag in _PRIVATE_FLAGS.items():
            if field in given and argument.startswith(flag + "="):
                return f"{flag}={given[field]}"
        return argument

    texts = [with_text(a) for a in base]
    recorded = texts + ["--", given["prompt"]] if "prompt" in given else texts
    notes = []
    if record["private"].get("salt_id") != privacy.salt_id():
        notes.append(f"replay of {path}: its hashes were made under another user's salt, so the "
                     "texts given cannot be checked against them")
    else:
        for field, text in given.items():
            if privacy.text_hash(text) != hashes.get(field):
                notes.append(f"replay of {path}: the {field.replace('_', ' ')} given is not the one it was "
                             "made with (its salted hash differs): the pictures will differ")
    return recorded, texts, notes


# A flag of the user's that overrides a recorded one of another name: --no-float16 is a --dtype;
# an --output names its format by its suffix (a recorded jpeg's replay into x.png is a png).
_OVERRIDES = {"no_float16": "dtype", "dtype": "no_float16", "output": "output_format", "max_pixels": "size",
              "size": "max_pixels"}


def _dest(arg: str, parser) -> str | None:
    """The setting a flag argument sets (argparse's dest), spelled as argparse takes it; None for a
    value, a positional or an unknown flag (cli's parser: `action_of`)."""
    action = parser.action_of(arg)
    return None if action is None else action.dest


# The settings of one kind of run only: -gt given with a replay leaves the other kind's out.
_TRIANGLE_ONLY = {"triangle_strengths", "triangle_low_top", "triangle_align"}
_SINGLE_ONLY = {"save_last_N", "keep_best", "strength", "n_images", "n_rows"}


def without_relisted(replayed: list, rest: list, parser) -> list:
    """The recorded arguments less the values of a repeatable option (--lora, --embedding) that
    the user gives again, of a setting the user gives by another flag (--no-float16 for
    --dtype), and of the settings that only the other kind of run takes where the user turns the
    triangle on or off: given ones replace the recorded ones, as other flags override theirs."""
    given = {_dest(a, parser) for a in rest[:_separator(rest)]} - {None}
    dropped = {_dest(flag, parser) for flag in options.listed_flags()} & given
    dropped |= {_OVERRIDES[d] for d in given if d in _OVERRIDES}
    triangle = _triangle_given(rest, parser)
    if triangle is not None:
        dropped |= _SINGLE_ONLY if triangle else _TRIANGLE_ONLY
    k = _separator(replayed)
    return [a for a in replayed[:k] if _dest(a, parser) not in dropped] + replayed[k:]


def _triangle_given(rest: list, parser) -> bool | None:
    """Whether the user's own arguments turn the triangle on or off (-gt, -gt 0, -gt=no ...);
    None where they leave it as recorded."""
    args = parser.joined(rest[:_separator(rest)])
    value = None
    for i, arg in enumerate(args):
        if _dest(arg, parser) == "generate_triangle":
            word = arg.split("=", 1)[1] if "=" in arg else args[i + 1] if i + 1 < len(args) else "1"
            value = options.BOOL_WORDS.get(word.lower())
    return value


def _with_size(recorded: list, sized: list) -> list:
    k = _separator(recorded)
    return recorded[:k] + sized + recorded[k:]


def _settings(parser, arguments: list) -> dict:
    """The parsed arguments, --no-float16 read as the --dtype it is, an --output's suffix as the
    format it names."""
    settings = vars(parser.parse_args(arguments))
    settings["dtype"] = options.compute_dtype(settings.pop("no_float16", False), settings["dtype"])
    if settings.get("output_format") is None:  # no --output either: out.png
        settings["output_format"] = format_named(settings.get("output") or "out.png")
    return settings


def _changed(parser, recorded: list, expanded: list, made_in=None) -> list | None:
    """The flags (or positionals) whose values the user's own arguments change from the record's:
    the settings compared, not how the process behaves (REFUSED). None where the recorded
    arguments do not parse alone (a private prompt starting with "-" is among the user's). A
    --dtype that names the dtype the picture was made in (`made_in`, the record's) changes nothing."""
    try:
        before = _settings(parser, recorded)
    except InputError:
        return None
    after = _settings(parser, expanded)
    if made_in in ("float32", "float16", "bfloat16"):
        before["dtype"], after["dtype"] = before["dtype"] or made_in, after["dtype"] or made_in
    names = {}
    for action in parser._actions:
        names.setdefault(action.dest, next((o for o in action.option_strings if o.startswith("--")), action.dest))
    return [names.get(d, d) for d in after if d not in REFUSED and before.get(d) != after[d]]


def adapters_changed(path: str, record: dict, replayed: list) -> list:
    """A note for each recorded LoRA or embedding whose file is not the one the picture was made
    with any more (its sha256 differs), or cannot be read."""
    from .adapters import EMBEDDING_FILE, LORA_FILE, adapter_path
    from .files import file_digest

    files = [(options.lora_argument(a.split("=", 1)[1])[0], LORA_FILE)
             for a in replayed if a.startswith("--lora=")]
    files += [(options.embedding_argument(a.split("=", 1)[1])[0], EMBEDDING_FILE)
              for a in replayed if a.startswith("--embedding=")]
    notes = []
    for entry, (file, folder_file) in zip(record.get("adapters") or [], files):
        try:  # a folder given: the file in it, as the run reads it
            digest = file_digest(adapter_path(file, "adapter", folder_file), "adapter",
                                 f"{entry.get('kind')} file")[1]
        except InputError:  # ModelError too
            notes.append(f"replay of {path}: its {entry.get('kind')} file {file} cannot be read")
            continue
        if digest != entry.get("sha256"):
            notes.append(f"replay of {path}: its {entry.get('kind')} file {file} has changed since (sha256 "
                         f"{str(entry.get('sha256'))[:12]} then, {digest[:12]} now): the pictures will differ")
    return notes


def _fingerprint(record: dict) -> str | None:
    """The sampled fingerprint of the weight files a local model was made from (not a hub model's,
    pinned to its commit; not a record from before fingerprints or a hostile one)."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    found = model.get("weights_fingerprint")
    local = model.get("source") in ("folder", "file", "package")
    return found if local and isinstance(found, str) and _SHA256.match(found) else None


def model_changed(path, record: dict, parser, recorded: list) -> list:
    """A note when the weight files of the recorded model (a local folder or file, the package's,
    with its --vae) are not those the picture was made with, told by their sampled fingerprints
    (model_io.weights_fingerprint): headers and 1 MiB a file are read, as the run reads them. Only
    paths here are read: a record naming a hub id reaches no network (the replay's offline guard
    comes later), whatever its record says the model was."""
    then = _fingerprint(record)
    if then is None:
        return []
    from . import model_io
    from .session import variant_of

    settings, variant = _settings(parser, recorded), variant_of(record.get("dtype"))
    model, vae = settings["model"], settings["vae"]
    local = model in model_io.PACKAGED or "@" not in model and os.path.exists(os.path.expanduser(model))
    if not local or vae is not None and not os.path.exists(os.path.expanduser(vae)):
        return []
    try:
        folder, _ = model_io.resolve_model(model, variant, vae, settings["prediction_type"])
        now = model_io.weights_fingerprint(model_io.check_model_folder(folder, variant))
    except Exception:  # noqa: BLE001 - a note only: the run refuses what is wrong, saying why
        return []
    if now == then:
        return []
    return [f"replay of {path}: its model's weight files are not those it was made with (fingerprint "
            f"{then[:12]} then, {now[:12]} now): the pictures will differ"]


def check_cost(path, plan, files: list) -> None:
    """Refuse, before any weight loads, a replay whose plan would take more than MAX_REPLAY_SECONDS
    on this machine or write more than MAX_REPLAY_FILES files (`files`, its sidecar aside)."""
    from .costs import describe_seconds

    seconds, count = plan.estimate.seconds if plan.estimate is not None else 0, len(files) + 1
    if seconds <= MAX_REPLAY_SECONDS and count <= MAX_REPLAY_FILES:
        return
    raise InputError(f"replay of {_shown(path)}: it would take {describe_seconds(seconds)} on this machine "
                     f"and write {count:,} files; a picture starts at most {MAX_REPLAY_SECONDS // 3600} hours' work "
                     f"and {MAX_REPLAY_FILES:,} files unasked: give --allow-long-replay to run it, or lower what "
                     "it sets (--steps, --size, -sd, --save_last_N, --show_noising, --n_images)")


def _recorded_size(record: dict, recorded: list) -> list:
    """--size for a record whose arguments leave the working size to the default (made before the
    default became the model's native area): the size its input ran at."""
    source = record.get("input") or {}
    size = source.get("size")
    if any(a.startswith("--size=") for a in recorded) or size is None:  # checked by check_record
        return []
    width, height = size
    return [f"--size={height}x{width}"]


def input_changed(path, record: dict, picture: str | None = None) -> list:
    """A note when the recorded input picture is not the file at its path any more, or `picture`
    (given in its place) is not the file it was; its bytes are hashed in blocks, and only from a
    regular file within the input cap."""
    source = record.get("input")
    if not source:
        return []
    from .files import file_digest

    try:
        digest = file_digest(picture or source["path"], "hashed", "input picture")[1]
    except InputError as e:
        return [f"replay of {path}: its input picture cannot be read ({_clipped(str(e))})"]
    if digest == source.get("sha256"):
        return []
    which = f"the picture given, {picture}, is not the one it was made from" if picture else \
        f"its input picture {source['path']} has changed since"
    return [f"replay of {path}: {which} (sha256 {str(source.get('sha256', '?'))[:12]} then, {digest[:12]} "
            "now): the pictures will differ"]


def _check_input_named_once(record: dict, recorded: list, path) -> None:
    """The input picture the replay's arguments read is the one the record's input names (whose
    sha256 the replay checks): a crafted record read one file and vouched for another."""
    source = record.get("input")
    named = [a for a, role in zip(recorded, options.argument_roles(recorded)) if role == "positional"]
    if source and named and os.path.abspath(named[0]) != source["path"]:
        raise _refuse(path, f"its record's input {_bounded(source['path'])} is not the picture its arguments "
                            f"read ({_bounded(named[0])})")


def _picture_given(command: str, rest: list, record: dict, path) -> tuple[list, str | None]:
    """(the user's arguments less an input picture given before --replay, that picture): a picture
    moved since its record was made is given so (`image2image.py NEW.png --replay OLD.png`). A
    recorded input that is not there any more, with none given, is refused here, before any work."""
    if command != "image2image":
        return rest, None
    private = record.get("private") if isinstance(record.get("private"), dict) else {}
    prompts = 1 if "prompt" in set(private.get("fields", ())) else 0  # a private prompt, given again after it
    given = [i for i, role in enumerate(options.argument_roles(rest)) if role == "positional"]
    if len(given) == prompts + 1 and os.path.isfile(rest[given[0]]):
        return [a for i, a in enumerate(rest) if i != given[0]], rest[given[0]]
    if prompts and len(given) == 1 and _a_picture_file(rest[given[0]]):  # it would be taken as the prompt
        raise InputError(f"replay of {_shown(path)}: its prompt is private (kept as a hash), and the one word "
                         f"given, {_shown(rest[given[0]])}, is a picture file: give the picture, then the "
                         f"prompt: {options.program('image2image')} {_shown(rest[given[0]])} "
                         f'"PROMPT" --replay {_shown(path)}')
    source = record.get("input") if isinstance(record.get("input"), dict) else {}
    if len(given) == prompts and isinstance(source.get("path"), str) and not os.path.exists(source["path"]):
        usage = 'PICTURE "PROMPT"' if prompts else "PICTURE"
        raise InputError(f"replay of {_shown(path)}: its input picture {_shown(source['path'])} does not exist "
                         f"any more; give the picture's path first: {options.program('image2image')} {usage} "
                         f"--replay {_shown(path)}")
    return rest, None


def _a_picture_file(text: str) -> bool:
    from .images import PICTURE_FILE_SUFFIXES

    return Path(text).suffix.lower() in PICTURE_FILE_SUFFIXES and os.path.isfile(text)


def sameness(path, record: dict, dtype: str | None, restated: str | None = None) -> str:
    """Whether a replay in `dtype` (None: this machine's default, on a CPU the one measured faster)
    can give the same bytes: the same package versions, device, dtype, BLAS (as the record names
    it, its thread count too: the record is in every picture) and native CPU kernels (AMX's sums,
    say, are not AVX-512's bit for bit). `restated`: what the new record names that the picture's
    does not (the --dtype given where it had none, the input's new path): only the pixels can be
    the same."""
    from . import signals

    mx = signals.import_whole("mlx.core")
    from .blas import preload_blas
    from .ops import native_status
    from .record import versions
    from .session import default_dtype

    dtype = dtype or default_dtype()

    then = dict(record.get("versions") or {}, device=record.get("device"), dtype=record.get("dtype"),
                blas=record.get("blas"), kernels=record.get("kernels"))
    now = dict(versions(), device=str(mx.default_device()), dtype=dtype, blas=preload_blas().described(),
               kernels=native_status())
    differ = [f"{k} not recorded" if then.get(k) is None and k in ("blas", "kernels")
              else f"{k} {_bounded(then.get(k))} (now {now[k]})" for k in now if then.get(k) != now[k]]
    if not differ:
        # A hub model is pinned to its commit; local weight files by their sampled fingerprint
        # (model_changed), which records from before it lack.
        model = record.get("model") if isinstance(record.get("model"), dict) else {}
        local = _fingerprint(record) is None and (model.get("source") in ("folder", "file") or any(
            str(a).startswith("--vae=") for a in record["replay"]))
        # A replay names the hub model at the commit it pins, where the picture may name a branch.
        pinned = model.get("source") == "hub" and model.get("revision") != model.get("commit")
        return (f"replay of {path}: same package versions, device, dtype, BLAS and kernels as when it "
                "was made: the pictures should be "
                + (f"the same pixels (their metadata name the model at commit {_shown(model.get('commit'))[:12]})"
                   if pinned else f"the same pixels (their metadata name {restated})" if restated
                   else "byte-identical")
                + (", if the model's files are as they were then" if local else ""))
    # The dtype alone can be given back: another device or other kernels compute otherwise whatever it is.
    hint = f"; --dtype {then['dtype']} computes as it did" if then["dtype"] in ("float32", "float16", "bfloat16") \
        and then["dtype"] != dtype and len(differ) == 1 else ""
    return f"replay of {path}: made with {'; '.join(differ)}: the pictures may differ{hint}"


def _bounded(value, limit: int = 100) -> str:
    """A value read from a picture, printable and at most `limit` characters."""
    text = _shown(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_local(model: str, path, named: bool = True) -> None:
    """Refuse a replay whose model would come from the hub and is not in the local cache: a
    picture fetches nothing the user did not ask for. `named`: the record or the user named the
    model; else it is the default (another tool's picture names none of ours)."""
    from .model_io import hub_id_to_fetch

    missing = hub_id_to_fetch(model)
    if missing is None:
        return
    if named:
        raise InputError(f"replay of {_shown(path)}: its model {missing} is not in the local hub "
                         "cache, and a replay fetches nothing unasked; add --allow-download to "
                         "fetch it, or --model to choose a local one")
    raise InputError(f"replay of {_shown(path)}: it names no model of ours, and the default ({missing}) is not "
                     "in the local hub cache; choose one with --model (--model shapes runs the small model that "
                     "ships), or add --allow-download to fetch the default")

"""The options table (stable_diffusion/options.py): the parsers, the flags in messages and the
replay arguments are built from it, and agree with it. No model, no mlx."""

import contextlib
import io
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stable_diffusion import cli, options, replay
from stable_diffusion.errors import HubUnreachable, InputError, ModelError
from stable_diffusion.spec import Capture, Inversion, ModelSpec, RunSpec, SpecError
from stable_diffusion.sweep_cli import SWEEP_FLAGS, build_sweep, build_sweep_parser

import commands

PARSERS = [("image2image", False), ("txt2image", False), ("image2image", True), ("txt2image", True)]


def _arguments(parser) -> tuple[set, set]:
    """(option strings, positional names) of a parser, --help and --version aside."""
    flags, positional = set(), set()
    for action in parser._actions:
        if action.option_strings:
            flags.update(s for s in action.option_strings if s not in ("-h", "--help", "--version"))
        else:
            positional.add(action.dest)
    return flags, positional


@pytest.mark.parametrize("command, sweep", PARSERS)
def test_each_parser_has_exactly_the_rows_that_name_it(command, sweep):
    parser = cli.build_parser(command, sweep=sweep)
    rows = options.rows(options.parser_name(command, sweep))
    flags, positional = _arguments(parser)
    assert flags == {f for row in rows if not row.positional for f in row.flags}
    assert positional == {row.flags[0] for row in rows if row.positional}
    # Each row's dest, default and help as the table says.
    by_flag = {s: action for action in parser._actions for s in action.option_strings or [action.dest]}
    for row in rows:
        action = by_flag[row.flags[0]]
        assert all(by_flag[f] is action for f in row.flags)
        assert action.help == row.help
        assert action.default == (False if row.action == "store_true" and row.default is None
                                  else row.default)
        assert action.choices == row.choices and action.metavar == row.metavar


def test_rows_are_for_known_parsers_and_name_real_spec_fields():
    spec = RunSpec("p", Path("o.png"), image=Path("i.png"), inversion=Inversion())
    names = []
    for row in options.OPTIONS:
        assert row.parsers and row.parsers <= options.ALL
        if row.field is None:
            assert row.replay is None  # a command's own setting is never replayed
            continue
        head, _, tail = row.field.rpartition(".")
        owner = {"": spec, "capture": spec.capture, "inversion": spec.inversion,
                 "model": ModelSpec()}[head]
        assert hasattr(owner, tail), row.field
        if not row.positional:
            names.append((row.field_name, row.flag))
    # One flag per field name, so that messages cannot name the wrong one (a field may have a row
    # per command, with its own help: --size); no flag in two rows of one parser.
    assert len({name for name, _ in names}) == len(set(names))
    for parser in options.ALL:
        flags = [f for row in options.rows(parser) if not row.positional for f in row.flags]
        assert len(flags) == len(set(flags)), parser
    ranks = [row.replay.rank for row in options.OPTIONS if row.replay is not None]
    assert len(ranks) == len(set(ranks))


def test_flags_of_fields_keep_the_names_messages_used():
    before = {"strength": "--strength", "triangle_strengths": "--triangle_strengths", "steps": "--steps",
              "cfg": "--cfg", "seed": "--seed", "n_images": "--n_images", "n_rows": "--n_rows",
              "every": "-sd", "last": "--save_last_N", "shows": "--snapshot",
              "noising_every": "--show_noising", "noising_path": "--noising_path", "preview": "--preview",
              "animate": "--animate", "decode_batch": "--decoding_batch_size", "labels": "--labels",
              "low_top": "--triangle_low_top", "output": "--output", "size": "--size",
              "sampler": "--sampler", "schedule": "--schedule", "align": "--triangle_align",
              "keep_best": "--keep_best", "inversion_cfg": "--inversion_cfg",
              "inversion_refine": "--inversion_refine", "format": "--output_format", "taesd": "--taesd"}
    assert {k: cli.FLAGS[k] for k in before} == before
    assert cli.FLAGS["triangle"] == "-gt" and cli.FLAGS["quantize"] == "--quantize"
    assert cli.FLAGS["model"] == "--model" and cli.FLAGS["vae"] == "--vae"
    assert cli.FLAGS["inversion_prompt"] == "--inversion_prompt"


def test_optional_values_are_the_flags_with_an_optional_value():
    assert cli._OPTIONAL_VALUES == {**{f: tuple(options.BOOL_WORDS) for f in (
        "-gt", "--generate_triangle", "-sp", "--save_prompt", "-pp", "--print_parser")},
        "--animate": ("gif", "webp")}
    args = cli.build_parser("image2image").parse_args(["-gt", "in.png", "a barn", "--animate", "-sp"])
    assert (args.generate_triangle, args.animate, args.save_prompt) == (True, "gif", True)
    assert (args.image, args.prompt) == ("in.png", "a barn")
    # A word among a flag's choices is taken in any case.
    args = cli.build_parser("image2image").parse_args(["in.png", "a", "--animate", "WebP", "--sampler", "DDIM"])
    assert (args.animate, args.sampler, args.image, args.prompt) == ("webp", "ddim", "in.png", "a")
    # Spelled as the start of the flag, as argparse takes it: bare too, not taking the picture.
    args = cli.build_parser("image2image").parse_args(["--generate_t", "in.png", "a barn", "--anim"])
    assert (args.generate_triangle, args.animate, args.image, args.prompt) == (True, "gif", "in.png", "a barn")
    args = cli.build_parser("image2image").parse_args(["-g", "in.png", "-p", "a barn"])  # -gt, -pp
    assert (args.generate_triangle, args.print_parser, args.image, args.prompt) == (True, True, "in.png", "a barn")
    # The start of a flag of two spellings (--negative_prompt, --negative-prompt) is not ambiguous.
    for neg in (["--neg", "blue"], ["--neg=blue"], ["--negative-p", "blue"]):
        args = cli.build_parser("image2image").parse_args(["in.png", "a barn", *neg])
        assert (args.negative_prompt, args.prompt) == ("blue", "a barn")
    args = cli.build_parser("image2image").parse_args(["in.png", "a barn", "--"])  # an end of flags, nothing after
    assert (args.image, args.prompt) == ("in.png", "a barn")
    args = cli.build_parser("image2image").parse_args(["in.png", "a barn", "-g=1", "--gen=0", "-g=yes"])
    assert args.generate_triangle is True  # -g=1: the start of -gt with its value, as --gen=1 is
    with pytest.raises(InputError, match="ambiguous option: --s could match"):
        cli.build_parser("image2image").parse_args(["in.png", "a barn", "--s", "3"])
    # Taken out of a command line (a replay's --replay PICTURE), a bare flag stays bare.
    parser = cli.build_parser("image2image")
    assert replay.find(["--save_p", "--replay", "p.png", "0"], parser) == ("p.png", ["-sp=1", "0"])
    for argv in (["in.png", "--", "--"], ["in.png", "--model", "m", "-o", "q.png", "--", "--"]):
        with pytest.raises(InputError, match='the prompt "--" cannot be given'):
            cli.check_arguments(parser.parse_args(argv), "image2image")


def _resolved(command: str, argv: list):
    spec, model = cli.build_specs(command, cli.build_parser(command).parse_args(argv))
    return replace(spec, seed=11, steps=9, cfg=7.5, sampler="euler", schedule="linear"), model


ROUND_TRIPS = [
    ("image2image", []),
    ("image2image", ["-sd", "2", "--snapshot", "x0", "--save_last_N", "3", "--keep_best", "--curve",
                     "--strength", "0.35", "--negative_prompt=-a dash", "--n_images", "4", "--n_rows", "2"]),
    ("image2image", ["--show_noising", "20", "--noising_path", "markov", "--animate", "webp",
                     "--preview", "approx", "--snapshot", "both", "-sp", "0", "--decoding_batch_size", "2"]),
    ("image2image", ["--show_noising", "20", "--noising_path", "independent", "--dtype", "bfloat16",
                     "--prediction_type", "v_prediction", "-q"]),
    ("image2image", ["--noising_path", "inversion", "--inversion_cfg", "2.5", "--inversion_refine", "3",
                     "--inversion_prompt=-inverted", "-sd", "1", "--preview", "taesd", "--taesd", "tiny"]),
    ("image2image", ["--noising_path", "inversion"]),
    ("image2image", ["-gt", "--triangle_strengths", "0.25,0.5,1", "--labels", "--triangle_low_top",
                     "--triangle_align", "time", "-sd", "3", "--animate", "--output_format", "webp"]),
    ("image2image", ["-gt", "--model", "shapes"]),
    ("txt2image", []),
    ("txt2image", ["--size", "128x192", "-sd", "1", "--save_last_N", "2", "--output_format", "jpeg",
                   "--animate", "gif", "--preview", "approx"]),
]


@pytest.mark.parametrize("command, extra", ROUND_TRIPS)
@pytest.mark.parametrize("prompt", ["a red barn", "-starts with a dash"])
def test_replay_arguments_parse_back_to_the_same_spec(tmp_path, command, extra, prompt):
    image = [str(tmp_path / "in.png")] if command == "image2image" else []
    fmt = extra[extra.index("--output_format") + 1] if "--output_format" in extra else "png"
    output = tmp_path / ("out." + {"jpeg": "jpg"}.get(fmt, fmt))
    vae = ["--vae", str(tmp_path / "vae.safetensors")] if "-q" in extra else []
    spec, model = _resolved(command, [*extra, *vae, "--output", str(output), "--", *image, prompt])
    # --output first: after a "--" (a prompt starting with "-") it would be read as a positional.
    argv = ["--output", str(output), *options.replay_argv(spec, model.model + "@main", model)]
    again, model_again = _resolved(command, argv)
    assert again == spec
    assert model_again == replace(model, model=model.model + "@main")


def test_replay_arguments_are_written_as_sidecars_hold_them(tmp_path):
    spec, model = _resolved("image2image", [str(tmp_path / "in.png"), "p", "-gt", "-sd", "3", "--animate",
                                            "--labels", "-sp", "0", "--triangle_low_top", "--triangle_align",
                                            "time", "--triangle_strengths", "0.3,0.6", "--vae", "v",
                                            "--output", str(tmp_path / "o.png")])
    assert options.replay_argv(spec, "sd@abc", model) == [
        str(tmp_path / "in.png"), "p", "--model=sd@abc", "--seed=11", "--steps=9", "--cfg=7.5",
        "--sampler=euler", "--schedule=linear", "--triangle_strengths=0.3,0.6",
        f"--vae={Path('v').resolve()}", "-sd=3", "--animate=gif", "--triangle_align=time", "-sp=0",
        "-gt", "--labels", "--triangle_low_top"]
    spec, model = _resolved("image2image", ["--noising_path", "inversion", "--", str(tmp_path / "in.png"),
                                            "-p"])
    assert options.replay_argv(spec, "sd", model) == [
        "--model=sd", "--seed=11", "--steps=9", "--cfg=7.5", "--sampler=euler", "--schedule=linear",
        "--strength=0.9", "--inversion_cfg=1.0", "--inversion_refine=0", "--noising_path=inversion",
        "--", str(tmp_path / "in.png"), "-p"]


def _stderr_of(command: str, argv: list) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(command, argv)
    return status, err.getvalue()


def test_spec_errors_name_fields_and_the_command_line_names_flags(tmp_path):
    spec = RunSpec("p", tmp_path / "o.png", image=tmp_path / "in.png", capture=Capture(animate="gif"))
    with pytest.raises(SpecError) as caught:
        spec.validate()
    assert str(caught.value) == ("animate acts on saved frames, and this run saves none: add every N, "
                                 "last N or noising_every N")
    assert caught.value.named(cli.FLAGS) == (
        "--animate acts on saved frames, and this run saves none: add -sd N, --save_last_N N or "
        "--show_noising N")
    status, err = _stderr_of("image2image", [str(tmp_path / "in.png"), "p", "--animate",
                                             "-o", str(tmp_path / "o.png")])
    assert status == 2 and err == ("error: --animate acts on saved frames, and this run saves none: add "
                                   "-sd N, --save_last_N N or --show_noising N\n")
    status, err = _stderr_of("txt2image", ["p", "--animate", "-o", str(tmp_path / "o.png")])  # it has no noising
    assert status == 2 and err == ("error: --animate acts on saved frames, and this run saves none: add "
                                   "-sd N or --save_last_N N\n")
    status, err = _stderr_of("image2image", [str(tmp_path / "in.png"), "p", "--keep_best", "-gt",
                                             "-o", str(tmp_path / "o.png")])
    assert status == 2 and "add --save_last_N N (and leave out -gt)" in err


def test_model_errors_name_fields_and_the_command_line_names_flags(tmp_path):
    from stable_diffusion.model_io import resolve_model

    missing = tmp_path / "no-vae"
    with pytest.raises(ModelError) as caught:
        resolve_model("shapes", vae=missing)
    assert str(caught.value) == f"vae {missing}: no such file or folder"
    assert caught.value.named(cli.FLAGS) == f"--vae {missing}: no such file or folder"
    error = HubUnreachable("x is not cached; pass {flag:model} with a folder")
    assert str(error) == "x is not cached; pass model with a folder"
    assert error.named(cli.FLAGS) == "x is not cached; pass --model with a folder"
    text = tmp_path / "model.txt"
    text.write_text("hello")
    status, err = _stderr_of("txt2image", ["p", "--model", str(text), "-o", str(tmp_path / "o.png")])
    assert status == 2 and err.startswith(f"error: --model {text}: {text} is a file but not .safetensors")


def test_sweep_names_its_own_flags_and_the_single_commands(tmp_path):
    args = build_sweep_parser("image2image").parse_args(
        [str(tmp_path / "in.png"), "p", "-gt", "--strengths", "0.2,0.4", "-o", str(tmp_path / "s")])
    with pytest.raises(SpecError) as caught:
        build_sweep("image2image", args)
    assert caught.value.named(SWEEP_FLAGS) == (
        "--strengths and the triangle both set strengths; give the triangle's with --triangle_strengths, "
        "or sweep without -gt")
    # A user's name pattern keeps its own braces: only {flag:FIELD} names a field.
    error = SpecError("name", "{flag} 's{seed:04d}' uses {seed}; add {flag:seed}")
    assert error.named(SWEEP_FLAGS) == "--name 's{seed:04d}' uses {seed}; add --seed"


def test_an_embedding_token_is_read_as_utf8_whatever_the_locale_read():
    """LC_ALL=C keeps a token's bytes as surrogates: the embedding was learnt under another token,
    and the prompt's word (read as UTF-8) never met it."""
    import argparse
    import os

    typed = b"emb.safetensors:ch\xc3\xa0t".decode("ascii", "surrogateescape")  # as LC_ALL=C reads it
    assert options.embedding_argument(typed) == ("emb.safetensors", "ch\u00e0t")
    with pytest.raises(argparse.ArgumentTypeError, match="the TOKEN of .* is not UTF-8 text"):
        options.embedding_argument(os.fsdecode(b"emb.safetensors:ch\xe0t"))


@pytest.mark.parametrize("image, output, refused", [
    ("cat.png", "cat.png", True), ("cat.PNG", "cat.png", True),  # the same file where case is ignored
    ("cat.step-000.png", "cat.png", True), ("cat.best.png", "cat.png", True),  # files the run names
    ("cat.jpg", "cat.png", False), ("cat.webp", "cat.png", False),  # the output's name in another format
    ("cat.png", "dog.png", False)])
def test_an_output_refused_only_where_the_run_would_write_over_its_input(tmp_path, image, output, refused):
    """-o cat.png for cat.jpg was refused as "would overwrite the input picture": no file of the
    run's is cat.jpg."""
    spec = RunSpec("p", tmp_path / output, image=tmp_path / image)
    if refused:
        with pytest.raises(SpecError, match="would overwrite the input picture"):
            spec.validate()
    else:
        spec.validate()


@pytest.mark.parametrize("script", ["image2image.py", "txt2image.py", "sweep.py"])
def test_version_names_the_tool_and_what_it_runs_on(script):
    from importlib.metadata import version

    result = commands.run(script, "--version", check=True)
    assert result.stdout.startswith(f"mlx-sd-trajectory {version('mlx-sd-trajectory')} (mlx {version('mlx')}, ")
    assert result.stdout.endswith(f"; Python {sys.version.split()[0]})\n") and not result.stderr


def test_an_error_kept_in_a_record_names_the_flags():
    """A sidecar's and a sweep manifest's `error` said "run without loras x.safetensors"."""
    from stable_diffusion.errors import ModelError, NumericalError, described

    assert described(NumericalError("run without {flag:loras} x.safetensors"), options.FLAGS) == \
        "NumericalError: run without --lora x.safetensors"
    assert described(ZeroDivisionError("float division by zero"), options.FLAGS) == \
        "ZeroDivisionError: float division by zero"
    assert described(ModelError("{flag:dtype} float32"), {}) == "ModelError: dtype float32"


def test_adapter_arguments_read_a_colon_as_the_files_say(tmp_path, monkeypatch):
    """A folder's embedding took no TOKEN (`ed:mytok` was "does not exist"); a weight that is no number
    and a file named with a colon were "LoRA ... does not exist"."""
    import argparse

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ed").mkdir()
    assert options.embedding_argument("ed:mytok") == ("ed", "mytok")
    assert options.embedding_argument("ed") == ("ed", None)
    # any other path that is there takes one too (`/dev/zero:tok` was "does not exist", not a device)
    (tmp_path / "emb").write_bytes(b"")
    assert options.embedding_argument("emb:tok") == ("emb", "tok")
    assert options.embedding_argument("/dev/zero:tok") == ("/dev/zero", "tok")
    (tmp_path / "p.safetensors").write_bytes(b"")
    (tmp_path / "style:2").write_bytes(b"")
    assert options.lora_argument("p.safetensors:0.5") == ("p.safetensors", 0.5)
    assert options.lora_argument("style:2") == ("style:2", 1.0)  # no file `style`: the name is the file's
    assert options.lora_argument("style:2:0.5") == ("style:2", 0.5)
    for bad in ("p.safetensors:abc", "p.safetensors:1_0", "p.safetensors:0x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a number; give one such as p.safetensors:0.8"):
            options.lora_argument(bad)
    assert options.lora_argument("gone.safetensors:abc") == ("gone.safetensors:abc", 1.0)  # said missing later


def test_the_commands_a_message_suggests_go_by_how_the_user_started_it(monkeypatch):
    """Started as an installed script (sd-sweep, or a path to one), the installed names; else the
    .py scripts (python image2image.py, python -c)."""
    for argv0, expected in (("/venv/bin/sd-sweep", "sd-image2image"), ("sd-txt2image", "sd-image2image"),
                            ("image2image.py", "image2image.py"), ("-c", "image2image.py"), ("", "image2image.py")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert options.program("image2image") == expected, argv0


def test_numbers_are_read_in_ascii_digits_around_any_spaces():
    """Python reads the Arabic-Indic one as 1 and 1_0 as 10; a copied no-break space was taken, and is."""
    for text, value in (("\xa00.5 ", 0.5), ("+.5", 0.5), ("1e-3", 0.001), (" -1", -1.0)):
        assert options.read_float(text) == value
    assert options.read_int(" 42\u2009") == 42
    for text in ("\u0661", "1_0", "\uff15"):  # the last: a fullwidth 5
        with pytest.raises(ValueError):
            options.read_float(text)

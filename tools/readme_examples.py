"""The README's commands, read from README.md, and run as written.

- The first ```sh block is the install-and-run command: `pip install -e . && python image2image.py ...`.
- A fenced block right after a line `<!-- example -->` is a worked example that runs as written on
  the shipped model, offline: a ```sh block holds command lines (`python SCRIPT ARGS`, `#`
  comments, a trailing `\\` continues a line); a ```python block is a script. Blocks run in order,
  in one folder that holds a copy of `images/`, so a later block may read what an earlier one wrote.

tests/test_readme.py runs every example; tools/make_readme_images.py keeps some of their outputs as
the README's pictures.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- example -->"
SCRIPTS = ("image2image.py", "txt2image.py", "sweep.py")
_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Example:
    language: str  # "sh" or "python"
    text: str
    line: int  # where the block starts in the README (1-based), for messages

    def commands(self) -> list:
        """A sh block's commands, each a list of arguments (`python SCRIPT ARGS`)."""
        joined = re.sub(r"\\\n", " ", self.text)
        out = []
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line, comments=True))
        return out


def readme_text(path: Path = README) -> str:
    return path.read_text(encoding="utf-8")


def first_command(text: str) -> tuple[str, Example]:
    """(the install part, the job as an example) of the first ```sh block: `INSTALL && JOB`."""
    before, rest = text.split("```sh\n", 1)
    install, job = rest.split("```", 1)[0].strip().split(" && ", 1)
    return install, Example("sh", job, before.count("\n") + 2)


def examples(text: str) -> list[Example]:
    out = []
    for match in _BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == MARK:
            out.append(Example(match.group(1), match.group(2), text[:match.start()].count("\n") + 2))
    return out


def offline_env(folder: Path) -> dict:
    """The environment of an example: no hub, an empty cache (the shipped model needs neither)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(folder / ".empty-hub-cache"))


def prepare(folder: Path) -> Path:
    """A folder to run the examples in, holding a copy of the README's `images/`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "images", folder / "images", dirs_exist_ok=True)
    return folder


def run_example(example: Example, folder: Path, extra: tuple = (), timeout: int = 600) -> list:
    """Run one example in `folder` (made by `prepare`); `extra` arguments go after each command's
    own (e.g. --quiet). Returns the CompletedProcesses; raises on the first that fails."""
    done = []
    if example.language == "python":
        steps = [[sys.executable, "-c", example.text]]
    elif example.language == "sh":
        steps = []
        for args in example.commands():
            if len(args) < 2 or args[0] != "python" or args[1] not in SCRIPTS:
                raise ValueError(f"README line {example.line}: an example runs `python SCRIPT ...` with "
                                 f"SCRIPT one of {', '.join(SCRIPTS)}, not {' '.join(args[:2])!r}")
            steps.append([sys.executable, str(ROOT / args[1]), *args[2:], *extra])
    else:
        raise ValueError(f"README line {example.line}: an example is a sh or python block, not {example.language!r}")
    for argv in steps:
        env = offline_env(folder)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        result = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            shown = " ".join(argv[1:]) if example.language == "sh" else "the python block"
            raise RuntimeError(f"README line {example.line}: {shown} exited {result.returncode}\n"
                               f"{result.stderr[-3000:]}")
        done.append(result)
    return done

"""The README as a new user meets it: its first screen says what the tool is, shows a picture and
gives the two commands; every worked example runs as written on the shipped model, offline; every
picture it shows is made by tools/make_readme_images.py; the pages it links exist."""

import re
import sys

import pytest

from conftest import TOOLS

sys.path.insert(0, str(TOOLS))
import make_readme_images  # noqa: E402
import readme_examples  # noqa: E402

ROOT = readme_examples.ROOT
TEXT = readme_examples.readme_text()
FIRST_SCREEN = 40  # lines of a terminal or a browser window before the first scroll
TEST_COMMAND = "pip install -e '.[test,reference,ray]' && python -m pytest"


def sh_blocks(text: str) -> list:
    return [m.group(2).strip() for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
            if m.group(1) == "sh"]


def test_the_first_screen_says_what_it_is_shows_a_picture_and_gives_the_two_commands():
    screen = "\n".join(TEXT.splitlines()[:FIRST_SCREEN])
    title, _, rest = screen.partition("\n")
    assert title.startswith("# ") and "image-to-image" in title
    description = rest.strip().split("\n\n")[0]
    assert all(word in description for word in ("picture", "prompt", "strength", "triangle", "offline"))
    pictures = re.findall(r"!\[[^\]]+\]\((images/[^)]+\.png)\)", screen)
    assert pictures and all((ROOT / p).is_file() for p in pictures)
    install, run = sh_blocks(screen)[:2]
    assert install.startswith("pip install -e . && python image2image.py ") and "--model shapes" in install
    assert run == TEST_COMMAND
    # CI runs the README's test command: the same extras, then the same pytest.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test,reference,ray]'" in ci and "\nSD_REQUIRE_NATIVE=1 python -m pytest\n" in ci


def test_the_first_command_is_the_one_the_pictures_and_the_shapes_test_use():
    install, example = readme_examples.first_command(TEXT)
    assert install == "pip install -e ."
    (args,) = example.commands()
    assert args[:2] == ["python", "image2image.py"] and args[args.index("--model") + 1] == "shapes"
    assert args[args.index("--output") + 1] == make_readme_images.PICTURES["shapes-triangle.png"]


def test_examples_are_marked_and_use_only_the_shipped_model():
    examples = readme_examples.examples(TEXT)
    assert len(examples) >= 8 and {e.language for e in examples} == {"sh", "python"}
    scripts = set()
    for example in examples:
        if example.language == "python":
            assert 'from_pretrained("shapes")' in example.text or 'ModelSpec("shapes")' in example.text
            continue
        for args in example.commands():
            scripts.add(args[1])
            assert args[0] == "python" and args[1] in readme_examples.SCRIPTS, args
            assert "--replay" in args or args[args.index("--model") + 1] == "shapes", args
    assert scripts == set(readme_examples.SCRIPTS)
    # A command block without the mark is one that cannot run here (a real model, a cluster).
    unmarked = [b for b in sh_blocks(TEXT)[2:] if "--model shapes" in b and b not in
                {e.text.strip() for e in examples}]
    assert unmarked == []


def test_every_example_runs_as_written_on_the_shipped_model(tmp_path):
    folder = readme_examples.prepare(tmp_path)
    for example in readme_examples.examples(TEXT):
        readme_examples.run_example(example, folder)
    # What the guides say the examples make.
    made = {p.relative_to(folder).as_posix() for p in (folder / "out").rglob("*") if p.is_file()}
    for name in ("out/edit.png", "out/edit.step-000.png", "out/edit.step-008.png", "out/edit.anim.gif",
                 "out/edit-seed5.png", "out/aligned.png", "out/markov.noise-strip.png", "out/inverted.png",
                 "out/curve.curve.png", "out/curve.best.png", "out/private.png", "out/private-again.png",
                 "out/sweep/sweep.sheet.png", "out/sweep/sweep.jsonl", "out/t2i.png", "out/api/s0.9.png"):
        assert name in made, name
    assert (folder / "out/private.png").read_bytes() == (folder / "out/private-again.png").read_bytes()
    private = (folder / "out/private.json").read_text()
    assert "a green square on a white background" not in private and "private:" in private
    for name, source in make_readme_images.PICTURES.items():
        if source != "out/triangle.png" and not source.startswith("out/triangle."):
            assert source in made, (name, source)  # the pictures are the examples' own files


def test_every_picture_shown_is_made_by_the_script_and_every_link_resolves():
    pages = {ROOT / "README.md": TEXT}
    pages.update({p: p.read_text() for p in (ROOT / "docs").glob("*.md")})
    assert {p.name for p in pages} >= {"README.md", "performance.md", "internals.md"}
    for link in ("docs/performance.md", "docs/internals.md"):
        assert f"]({link}" in TEXT, link
    made = set(make_readme_images.PICTURES) | set(make_readme_images.DRAWN)
    shown = set()
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name} links {target}, which does not exist"
            if path.parent == ROOT / "images":
                shown.add(path.name)
    assert shown and shown <= made, shown - made
    assert set(make_readme_images.PICTURES) <= shown  # no picture made for nothing


@pytest.mark.parametrize("anchor", re.findall(r"\]\(#([^)]+)\)", TEXT))
def test_every_anchor_names_a_heading(anchor):
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", TEXT, re.M)}
    assert anchor in headings, anchor


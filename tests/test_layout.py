"""The package's layering: one table per choice, the samplers over the schedule alone, light modules light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from stable_diffusion import sampler
from stable_diffusion.choices import SAMPLER_TABLE, SCHEDULE_TABLE, display_name
from stable_diffusion.config import SchedulerConfig
from stable_diffusion.infotext import parse_parameters
from stable_diffusion.schedule import NoiseSchedule

PACKAGE = Path(sampler.__file__).parent
def _imports(path: Path, modules: set) -> set:
    """The package modules `path` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stable_diffusion"):
            parts = node.module.split(".")
            found.update(parts[1:2] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("stable_diffusion."))
    return (found & modules) - {path.stem}


def test_the_samplers_import_only_the_choices_and_the_schedule():
    """(The whole graph's direction is test_architecture's.)"""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert _imports(PACKAGE / "sampler.py", modules) <= {"choices", "schedule"}


def test_choices_and_samplers_load_no_pictures_and_the_command_line_no_mlx():
    code = ("import sys, stable_diffusion.cli, stable_diffusion.choices, stable_diffusion.spec\n"
            "light = {'mlx.core', 'PIL'} & set(sys.modules)\n"
            "import stable_diffusion.sampler\n"
            "print(sorted(light), 'PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("name", list(SAMPLER_TABLE))
def test_every_row_has_its_function_its_timesteps_and_its_name_read_back(name):
    assert sampler.SAMPLERS[name] is getattr(sampler, f"sample_{name}")
    row = SAMPLER_TABLE[name]
    assert row.family in ("k", "ddim", "dpm")
    noise = NoiseSchedule(SchedulerConfig(steps_offset=1, timestep_spacing="leading"))
    assert noise.timeline(0.5, 8, "diffusers", name).steps == 4
    for schedule in SCHEDULE_TABLE:  # the A1111 name of every sampler and schedule parses back
        fields, warnings = parse_parameters(f"p\nSteps: 8, Sampler: {display_name(name, schedule)}, Seed: 1")
        assert warnings == [] and fields["sampler"] == name
        assert fields.get("schedule") == (schedule if SCHEDULE_TABLE[schedule] else None)


def test_a_folder_names_the_first_sampler_of_its_scheduler_class():
    assert sampler._CLASS_SAMPLER["DPMSolverMultistepScheduler"] == "dpmpp_2m"
    assert set(sampler._CLASS_SAMPLER) == {row.scheduler for row in SAMPLER_TABLE.values()}

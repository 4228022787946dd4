"""The package's layering: one table per choice, imports that flow one way, light modules light."""

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
# model_io -> single_file -> testing -> single_file: issue 18, point 3, broken in its own branch.
# Any other cycle fails here.
LOADING_CIRCLE = {"model_io", "single_file", "testing"}


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


def _cycles(graph: dict) -> list:
    """The groups of modules that import each other, directly or through others."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo.extend(graph[m])
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def test_imports_flow_one_way():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {p.stem: _imports(p, modules) for p in PACKAGE.glob("*.py")}
    assert graph["sampler"] <= {"choices", "schedule"}, graph["sampler"]
    assert [c for c in _cycles(graph) if set(c) != LOADING_CIRCLE] == []


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
    assert noise.plan(0.5, 8, "diffusers", name).steps == 4
    for schedule in SCHEDULE_TABLE:  # the A1111 name of every sampler and schedule parses back
        fields, warnings = parse_parameters(f"p\nSteps: 8, Sampler: {display_name(name, schedule)}, Seed: 1")
        assert warnings == [] and fields["sampler"] == name
        assert fields.get("schedule") == (schedule if SCHEDULE_TABLE[schedule] else None)


def test_a_folder_names_the_first_sampler_of_its_scheduler_class():
    assert sampler._CLASS_SAMPLER["DPMSolverMultistepScheduler"] == "dpmpp_2m"
    assert set(sampler._CLASS_SAMPLER) == {row.scheduler for row in SAMPLER_TABLE.values()}

"""Stable Diffusion image-to-image on MLX, with every stage of the trajectory on disk."""

from .blas import preload_blas

# First, before any module imports mlx.core: on Linux this loads an optimised BLAS for MLX's CPU
# matrix products, which binds to it only if it is in the process before mlx.core (see blas.py).
preload_blas()

__all__ = ["StableDiffusion", "Step"]


def launch(module: str, function: str) -> int:
    """The scripts' (image2image.py, ...) entry: the command `function` of `module`, run. Ctrl-C
    while the modules load, and a package this Python lacks (the tool run outside its venv), are
    one line each, not a traceback."""
    import importlib
    import sys

    from .errors import NOTHING_WRITTEN, not_installed

    try:
        command = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    except KeyboardInterrupt:  # nothing has started
        if sys.stderr is not None:
            print(NOTHING_WRITTEN, file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if (line := not_installed(e)) is None:
            raise
        print(line, file=sys.stderr)
        return 1
    return command()


def main_image2image() -> int:
    """The installed `sd-image2image`: `python image2image.py`, started as launch starts it."""
    return launch("cli", "image2image_main")


def main_txt2image() -> int:
    """The installed `sd-txt2image`."""
    return launch("cli", "txt2image_main")


def main_sweep() -> int:
    """The installed `sd-sweep`."""
    return launch("sweep_cli", "sweep_main")


def __getattr__(name):
    # Imported on first use, so that `stable_diffusion.testing` and the command line's argument
    # checks do not pay for loading the networks.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'stable_diffusion' has no attribute {name!r}")

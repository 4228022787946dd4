"""Stable Diffusion image-to-image on MLX, with every stage of the trajectory on disk."""

from .blas import preload_blas

# First, before any module imports mlx.core: on Linux this loads an optimised BLAS for MLX's CPU
# matrix products, which binds to it only if it is in the process before mlx.core (see blas.py).
preload_blas()

__all__ = ["StableDiffusion", "Step"]


def __getattr__(name):
    # Imported on first use, so that `stable_diffusion.testing` and the command line's argument
    # checks do not pay for loading the networks.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'stable_diffusion' has no attribute {name!r}")

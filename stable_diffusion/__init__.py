"""Stable Diffusion image-to-image on MLX, with every stage of the trajectory on disk."""

from .pipeline import StableDiffusion, Step  # noqa: E402

__all__ = ["StableDiffusion", "Step"]

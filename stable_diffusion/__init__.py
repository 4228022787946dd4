"""Stable Diffusion image-to-image on MLX, with every stage of the trajectory on disk."""

"""Exact Git Re-Basin for Stable Diffusion checkpoints, as an sd-mecha merge method."""

"""retrack: make a diffusion model forget specific training images (ReTrack and baselines)."""

__version__ = "0.1.0"

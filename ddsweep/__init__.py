"""ddsweep: which block of a diffusion U-Net, at which epoch and noise level, classifies best."""

__version__ = "0.1.0"

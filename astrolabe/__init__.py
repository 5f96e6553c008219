"""Astrolabe: forward-process RL with streaming training for distilled autoregressive video models."""

from astrolabe._compat import install_torchvision_guard

install_torchvision_guard()

__version__ = "0.1.0"

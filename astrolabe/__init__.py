"""Astrolabe: forward-process RL with streaming training for distilled autoregressive video models.

Importing the package has no side effects (it does not even import torch); the torchvision operator
guard of :mod:`astrolabe._compat` is installed by the modules that import transformers, peft or open_clip.
"""

__version__ = "0.1.0"

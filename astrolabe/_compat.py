"""Compatibility guard for torchvision's CUDA-only wheel on CPU torch.

The only torchvision build that matches torch 2.13 on our registries is built against CUDA 13. On a
CPU torch its ``_C`` extension fails to load, and ``torchvision/_meta_registrations.py`` then calls
``torch.library.register_fake("torchvision::nms")`` for an operator that was never defined, raising
``RuntimeError: operator torchvision::nms does not exist``. Because transformers, peft, timm and
open_clip import torchvision whenever it is installed, that one error breaks all of them
(upstream: pytorch/vision#9085).

:func:`install_torchvision_guard` defines the two operator *schemas* (not kernels) before anything
imports torchvision, so its pure-Python parts import. It is called right before each import of
transformers, peft or open_clip (the text encoder, the LoRA module, the reward-model loaders), never on
``import astrolabe``. The C++ ops themselves still fail loudly if
called ("Couldn't load custom C++ ops"); we never call them. Where a working torchvision is present
(e.g. the CUDA build on a GPU box) the schema already exists and the guard is a no-op.
"""

from __future__ import annotations

import torch

_LIBRARY: torch.library.Library | None = None


def install_torchvision_guard() -> bool:
    """Define ``torchvision::nms``/``qnms`` schemas if missing. Returns True if it did anything."""
    global _LIBRARY
    if _LIBRARY is not None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False  # real torchvision ops are registered: nothing to do
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True

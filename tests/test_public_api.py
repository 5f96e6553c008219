"""Public faces: ``astrolabe.models.wan`` exports the model, its size builders and the VAE; ``import astrolabe``
leaves torch untouched."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import astrolabe.models.wan as wan


def test_wan_exports_model_sizes_and_vae():
    from astrolabe.models.wan import WanConfig, WanDiT

    assert set(wan.__all__) <= set(dir(wan))
    assert {"WanDiT", "WanConfig", "WanVAE", "wan21_t2v_1_3b", "wan21_t2v_14b", "tiny"} <= set(wan.__all__)
    for name, builder in wan.BUILDERS.items():
        assert getattr(wan, name) is builder and isinstance(builder(), WanConfig)
    assert wan.wan21_t2v_1_3b().dim == 1536 and wan.wan21_t2v_14b().dim == 5120
    model = WanDiT(wan.tiny())
    assert model.config == wan.tiny()
    assert isinstance(wan.WanVAE(wan.tiny_vae()), torch.nn.Module)


def test_import_astrolabe_has_no_side_effect_on_torch():
    """In a fresh interpreter, ``import astrolabe`` neither imports torch nor registers torchvision's op schemas."""
    code = (
        "import sys, astrolabe\n"
        "assert 'torch' not in sys.modules, 'import astrolabe imported torch'\n"
        "import torch\n"
        "try:\n"
        "    torch._C._dispatch_find_schema_or_throw('torchvision::nms', '')\n"
        "except RuntimeError:\n"
        "    print('nms-absent')\n"
        "else:\n"
        "    print('nms-present')\n"
    )
    root = str(Path(__file__).resolve().parents[1])  # this checkout's astrolabe, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "nms-absent"

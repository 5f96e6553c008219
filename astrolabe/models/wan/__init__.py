"""Wan2.1 modules: the DiT (bidirectional and block-causal, KV-cache aware), its size builders, the VAE.

``from astrolabe.models.wan import WanDiT, WanConfig, wan21_t2v_1_3b`` is the public face; the text encoder
(:mod:`astrolabe.models.wan.text_encoder`) is imported from its module, since it pulls in transformers.
"""

from astrolabe.models.wan.config import (
    BUILDERS,
    WanConfig,
    build_config,
    tiny,
    tiny_world,
    wan21_t2v_1_3b,
    wan21_t2v_14b,
)
from astrolabe.models.wan.dit import WanDiT
from astrolabe.models.wan.vae import StreamingDecoder, WanVAE, WanVAEConfig, tiny_vae, wan21_vae

__all__ = [
    "BUILDERS",
    "StreamingDecoder",
    "WanConfig",
    "WanDiT",
    "WanVAE",
    "WanVAEConfig",
    "build_config",
    "tiny",
    "tiny_vae",
    "tiny_world",
    "wan21_t2v_14b",
    "wan21_t2v_1_3b",
    "wan21_vae",
]

"""Wan2.1 DiT configuration and the named size builders (the only place that holds sizes).

Field names follow Wan2.1's ``WanModel`` constructor so a config reads like the original.
Numbers: ``shared/reference/models-reference.md`` section 1.1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1 text-to-video DiT.

    head_dim = dim / num_heads must be even (RoPE pairs); RoPE splits the head_dim/2 complex pairs into
    [temporal | height | width] = [d/2 - 2*(d//6)/... ] exactly as Wan: temporal gets ``d - 4*(d//6)``
    channels, height and width ``2*(d//6)`` each. ``learned_positions`` is the one field Wan does not have (None =
    Wan's architecture exactly).
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_positions: int = 1024
    # Not Wan's: (n, S) adds a learned absolute position embedding to the patch tokens, one row per (latent frame's
    # index in its n-frame block, first block or a later one, token of the S tokens of a frame): 2n x S x dim
    # (``WanDiT.pos_embedding``). The tiny world model's (astrolabe.world.pretrain); None in every real checkpoint.
    learned_positions: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.model_type != "t2v":
            raise ValueError(f"only model_type='t2v' is supported, got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.learned_positions is not None and min(self.learned_positions) < 1:
            raise ValueError(f"learned_positions={self.learned_positions} must be (block frames, tokens per frame) >= 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame: (H / p_h) * (W / p_w); 60x104 latents -> 1560."""
        _, p_h, p_w = self.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch size {p_h}x{p_w}"
            )
        return (latent_height // p_h) * (latent_width // p_w)


def wan21_t2v_1_3b() -> WanConfig:
    """Wan2.1-T2V-1.3B: 1,418,996,800 parameters, 825 state-dict tensors."""
    return WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)


def wan21_t2v_14b() -> WanConfig:
    """Wan2.1-T2V-14B (and Krea Realtime 14B): 14,288,491,584 parameters, 1095 tensors."""
    return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


def tiny() -> WanConfig:
    """A CPU-sized Wan DiT with the same structure and key layout (2 layers, width 64, 2 heads of 32)."""
    return WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=16, num_heads=2, num_layers=2)


def tiny_world() -> WanConfig:
    """The world model's DiT (:mod:`astrolabe.world.pretrain`): 3 layers of width 96 (3 heads of 32), text
    features of the tiny encoder's width 32 over ``text_len = 64`` tokens, and learned absolute positions for
    3-frame blocks of 4 x 4 tokens (64 x 64 videos: 8 x 8 latents, 2 x 2 patches): without them a DiT that starts
    from pure noise cannot place an object where the caption's motion needs it (RoPE is relative; measured)."""
    return WanConfig(
        dim=96, ffn_dim=192, freq_dim=64, text_dim=32, text_len=64, num_heads=3, num_layers=3, learned_positions=(3, 16)
    )


BUILDERS = {
    "wan21_t2v_1_3b": wan21_t2v_1_3b,
    "wan21_t2v_14b": wan21_t2v_14b,
    "tiny": tiny,
    "tiny_world": tiny_world,
}


def build_config(name: str) -> WanConfig:
    """Look up a size builder by name; unknown names list the known ones."""
    try:
        return BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown Wan size {name!r}; known: {sorted(BUILDERS)}") from None

"""Registry of the distilled base models: one frozen :class:`BaseModelCard` per name.

Numbers come from ``shared/reference/models-reference.md`` sections 4.2-4.3, 6 and 7. Every field is
required (no defaults), so no card silently inherits a wrong value; in particular ``flow_shift`` is 5.0
for every released model (the upstream wrapper's default 8.0 would warp [1000, 750, 500, 250] to
[1000, 960, 888.9, 727.3] instead of [1000, 937.5, 833.3, 625]).

Local file layout: each hub file lives at ``<root>/<repo name>/<path in repo>``, e.g.
``<root>/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth`` and ``<root>/Self-Forcing/checkpoints/self_forcing_dmd.pt``, which
is what ``huggingface-cli download <repo> <file> --local-dir <root>/<repo name>`` produces.

| name | DiT | steps (raw, warped at shift 5) | frames/block | window / sinks | checkpoint (entry) |
|---|---|---|---|---|---|
| self_forcing | 1.3B | 1000 750 500 250 -> 1000 937.5 833.3 625 | 3 | global | self_forcing_dmd.pt (generator_ema) |
| longlive | 1.3B | same | 3 | 12 / 3 | longlive_base.pt (generator) + lora.pt r=alpha=256 |
| longlive_base | 1.3B | same | 3 | 12 / 3 | longlive_base.pt (generator), no LoRA |
| causal_forcing_chunk | 1.3B | same | 3 | global | chunkwise/causal_forcing.pt (generator) |
| causal_forcing_frame | 1.3B | same | 1 | global | framewise/causal_forcing.pt (generator_ema) |
| causal_forcing_frame_2step | 1.3B | 1000 500 (first block 4-step) | 1 | global | causal-forcing++/framewise-2step.pt (generator_ema) |
| causal_forcing_frame_1step | 1.3B | 1000 (first block 4-step) | 1 | global | causal-forcing++/framewise-1step.pt (generator_ema) |
| krea14b | 14B | same 4-step list | 3 | global (as Astrolabe trains it) | krea-realtime-video-14b.safetensors |
| krea_served | 14B | 1000 937 833 625, unwarped | 3 | KV recompute: 3 context + 3 new | krea-realtime-video-14b.safetensors |
| tiny | tiny | same 4-step list | 3 | global | none (random init) |
| world | tiny_world | same 4-step list | 3 | global | built by ``astrolabe world build`` (``pretrained="world"``) |

``kv_cache`` says how the cache evolves between blocks: ``context_pass`` (SF, LongLive, CF and Astrolabe's
training sampler: after each block, one t = 0 pass writes its keys/values; the cache grows or rolls) or
``recompute`` (Krea's server, ``release_server.py``, models-reference 5.7: before each block the cache is
zeroed and rebuilt by one t = 0 pass over the first latent frame + the 2 newest, at RoPE positions 0..2,
and the new block is denoised at positions 3..5). ``krea_served`` is Krea Realtime 14B as Krea serves it:
steps ``[1000, 937, 833, 625]`` used as they are (Krea's ``self_forcing_server_14b.yaml`` lists
``[1000, 937, 833, 625, 0]`` with ``warp_denoising_step: false``; the trailing 0 is the clean output), i.e.
integer timesteps where the training sampler feeds the warped 937.5 and 833.33. The streaming sampler runs
``recompute`` as :mod:`astrolabe.sampling.recompute` describes (what equals ``release_server.py`` and what is
assumed); it is a generation mode (``astrolabe generate``, evaluation): rollouts and the RL update refuse it,
so ``krea14b`` stays the card Astrolabe trains with. ``sampling.kv_cache`` overrides a card's mode (e.g. the
recompute loop on the tiny model).

``pretrained="world"``: the DiT and text-encoder weights are the world model's
(:mod:`astrolabe.world.pretrain`), built locally under ``<model.checkpoint_dir or runs>/world/<key>/``; the VAE is
the tiny preview one the world model was trained against.

``fill_base`` is the DiT whose weights fill keys a checkpoint lacks, only with
``model.fill_missing_from_base`` (Causal Forcing: upstream loads its files non-strictly over the
Wan2.1-T2V-1.3B DiT, see :mod:`astrolabe.models.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, model_validator

from astrolabe.configbase import Frozen
from astrolabe.models.checkpoints import (
    LORA_ENTRY_AUTO,
    CheckpointFormat,
    StateDict,
    fill_missing_keys,
    read_dit_checkpoint,
    read_wan_base,
)
from astrolabe.models.wan.config import BUILDERS, WanConfig, build_config

VAE_STRIDE_T, VAE_STRIDE_S = 4, 8  # Wan2.1 VAE: T_lat = 1 + (T - 1) / 4, H_lat = H / 8
_FLAT_FORMATS = ("wan21_safetensors", "krea_safetensors")


class HubFile(Frozen):
    """A file (or folder) in a Hugging Face repo; stored locally at ``<root>/<repo name>/<filename>``."""

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    filename: str = Field(min_length=1)
    is_dir: bool = False

    @property
    def local_path(self) -> PurePosixPath:
        return PurePosixPath(self.repo.split("/")[1]) / self.filename

    def download_command(self, root: Path | str = "<root>") -> str:
        what = f"--include '{self.filename}/*'" if self.is_dir else self.filename
        return f"huggingface-cli download {self.repo} {what} --local-dir {Path(root) / self.repo.split('/')[1]}"


class LoraCard(Frozen):
    """A PEFT LoRA merged into the DiT at load: ``W <- W + (alpha / rank) B A``. ``entry``: the sub-dict
    (``"generator_lora"``), ``None`` for a bare adapter, ``"auto"`` for whichever the file is."""

    file: HubFile
    entry: str | None
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)


_WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B"
WAN_VAE = HubFile(repo=_WAN_1_3B, filename="Wan2.1_VAE.pth")
WAN_T5 = HubFile(repo=_WAN_1_3B, filename="models_t5_umt5-xxl-enc-bf16.pth")
WAN_T5_TOKENIZER = HubFile(repo=_WAN_1_3B, filename="google/umt5-xxl", is_dir=True)
WAN_DIT_1_3B = HubFile(repo=_WAN_1_3B, filename="diffusion_pytorch_model.safetensors")
KVCacheMode = Literal["context_pass", "recompute"]


class BaseModelCard(Frozen):
    """Everything that identifies a base model: architecture, schedule, attention window, files.

    ``denoising_steps`` is the raw config list; with ``warp_denoising_steps`` the sampler maps each S_k to
    ``T_ext[1000 - S_k]`` of the shifted 1000-entry table (models-reference 4.3). ``first_block_denoising_steps``
    (CF++ only) is the list used for the first block instead. ``local_attn_frames=None`` is global causal
    attention (``sink_frames`` must then be 0). Sizes are pixels; latents are /8 spatially, ``1 + (T-1)/4``
    in time.
    """

    name: str
    description: str
    wan_size: str
    text_encoder_kind: Literal["umt5_xxl", "tiny"]
    flow_shift: float = Field(gt=0)
    denoising_steps: tuple[int, ...] = Field(min_length=1)
    first_block_denoising_steps: tuple[int, ...] | None
    warp_denoising_steps: bool
    frames_per_block: int = Field(ge=1)
    local_attn_frames: int | None
    sink_frames: int = Field(ge=0)
    kv_cache: KVCacheMode
    context_noise: int = Field(ge=0, le=1000)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    num_frames: int = Field(gt=0)
    fps: int = Field(gt=0)
    checkpoint_format: CheckpointFormat | None
    checkpoint_entry: str | None
    checkpoint: HubFile | None
    lora: LoraCard | None
    vae: HubFile | None
    text_encoder: HubFile | None
    tokenizer: HubFile | None
    fill_base: HubFile | None
    pretrained: Literal["world"] | None

    @model_validator(mode="after")
    def _check(self) -> BaseModelCard:
        if self.wan_size not in BUILDERS:
            raise ValueError(f"wan_size {self.wan_size!r} is not a size builder; known: {sorted(BUILDERS)}")
        for steps in (self.denoising_steps, self.first_block_denoising_steps or (1000,)):
            if any(not 0 <= s <= 1000 for s in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
                raise ValueError(f"denoising steps {steps} must be strictly decreasing integers in [0, 1000]")
        if self.height % (VAE_STRIDE_S * 2) or self.width % (VAE_STRIDE_S * 2):
            raise ValueError(f"{self.height}x{self.width} must be divisible by 16 (VAE stride 8 x patch 2)")
        if (self.num_frames - 1) % VAE_STRIDE_T:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (the VAE's causal temporal stride)")
        if self.latent_frames % self.frames_per_block:
            raise ValueError(
                f"{self.latent_frames} latent frames are not a whole number of {self.frames_per_block}-frame blocks"
            )
        if self.local_attn_frames is None:
            if self.sink_frames:
                raise ValueError("sink_frames needs a local window: set local_attn_frames or sink_frames=0")
        elif not self.sink_frames + self.frames_per_block <= self.local_attn_frames:
            raise ValueError(
                f"local_attn_frames={self.local_attn_frames} must hold the sinks ({self.sink_frames}) and one block"
            )
        self._check_files()
        return self

    def _check_files(self) -> None:
        if self.pretrained is not None and (self.checkpoint_format is not None or self.text_encoder_kind != "tiny"):
            raise ValueError(f"pretrained={self.pretrained!r} takes no checkpoint_format and a tiny text encoder")
        if self.checkpoint_format is None:
            if self.checkpoint is not None or self.checkpoint_entry is not None or self.lora is not None:
                raise ValueError("a card without checkpoint_format takes no checkpoint, entry or lora")
            return
        if self.checkpoint is None:
            raise ValueError(f"checkpoint_format {self.checkpoint_format!r} needs a checkpoint file")
        flat = self.checkpoint_format in _FLAT_FORMATS
        if flat != (self.checkpoint_entry is None):
            need = "takes no checkpoint_entry" if flat else "needs a checkpoint_entry (e.g. 'generator_ema')"
            raise ValueError(f"checkpoint_format {self.checkpoint_format!r} {need}")
        if self.lora is not None and self.checkpoint_format != "longlive_pt":
            raise ValueError("only checkpoint_format 'longlive_pt' takes a lora")
        if self.text_encoder_kind == "umt5_xxl" and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError("text_encoder_kind 'umt5_xxl' needs the text_encoder and tokenizer files")

    # ---------------------------------------------------------------- derived sizes
    @property
    def latent_frames(self) -> int:
        return 1 + (self.num_frames - 1) // VAE_STRIDE_T

    @property
    def latent_height(self) -> int:
        return self.height // VAE_STRIDE_S

    @property
    def latent_width(self) -> int:
        return self.width // VAE_STRIDE_S

    @property
    def num_blocks(self) -> int:
        return self.latent_frames // self.frames_per_block

    def wan_config(self) -> WanConfig:
        return build_config(self.wan_size)

    def files(self, *, fill_base: bool = False) -> dict[str, HubFile]:
        """Every file this model needs, by role: dit, lora, vae, text_encoder, tokenizer (+ fill_base if asked)."""
        roles = {
            "fill_base": self.fill_base if fill_base else None,
            "dit": self.checkpoint,
            "lora": self.lora.file if self.lora else None,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
        }
        return {role: f for role, f in roles.items() if f is not None}


# ------------------------------------------------------------------------------------------------ cards

_STEPS_4 = (1000, 750, 500, 250)
_SHARED_WAN_FILES = {"vae": WAN_VAE, "text_encoder": WAN_T5, "tokenizer": WAN_T5_TOKENIZER}
_VIDEO_1_3B = {
    "wan_size": "wan21_t2v_1_3b",
    "text_encoder_kind": "umt5_xxl",
    "flow_shift": 5.0,
    "warp_denoising_steps": True,
    "context_noise": 0,
    "height": 480,
    "width": 832,
    "num_frames": 81,
    "fps": 16,
    "kv_cache": "context_pass",
    "pretrained": None,
    **_SHARED_WAN_FILES,
}
_CF = "zhuhz22/Causal-Forcing"
_KREA_FILE = HubFile(repo="krea/krea-realtime-video", filename="krea-realtime-video-14b.safetensors")
_KREA_SERVED_STEPS = (1000, 937, 833, 625)  # Krea self_forcing_server_14b.yaml, warp off (its trailing 0 = output)
_LONGLIVE = "Efficient-Large-Model/LongLive-1.3B"


def _causal_forcing(name: str, description: str, filename: str, entry: str, frames_per_block: int,
                    steps: tuple[int, ...], first_block: tuple[int, ...] | None) -> BaseModelCard:
    return BaseModelCard(
        name=name, description=description, **_VIDEO_1_3B, denoising_steps=steps,
        first_block_denoising_steps=first_block, frames_per_block=frames_per_block, local_attn_frames=None,
        sink_frames=0, checkpoint_format="causal_forcing_pt", checkpoint_entry=entry,
        checkpoint=HubFile(repo=_CF, filename=filename), lora=None, fill_base=WAN_DIT_1_3B,
    )


def _longlive(name: str, description: str, lora: LoraCard | None) -> BaseModelCard:
    return BaseModelCard(
        name=name, description=description, **_VIDEO_1_3B, denoising_steps=_STEPS_4,
        first_block_denoising_steps=None, frames_per_block=3, local_attn_frames=12, sink_frames=3,
        checkpoint_format="longlive_pt", checkpoint_entry="generator",
        checkpoint=HubFile(repo=_LONGLIVE, filename="models/longlive_base.pt"), lora=lora, fill_base=None,
    )


def _build_registry() -> dict[str, BaseModelCard]:
    cards = [
        BaseModelCard(
            name="self_forcing", description="Self-Forcing DMD (Wan2.1-T2V-1.3B), chunk-wise, global causal",
            **_VIDEO_1_3B, denoising_steps=_STEPS_4, first_block_denoising_steps=None, frames_per_block=3,
            local_attn_frames=None, sink_frames=0, checkpoint_format="self_forcing_pt",
            checkpoint_entry="generator_ema",
            checkpoint=HubFile(repo="gdhe17/Self-Forcing", filename="checkpoints/self_forcing_dmd.pt"), lora=None,
            fill_base=None,
        ),
        _longlive(
            "longlive", "LongLive 1.0 (1.3B): base + its r256 LoRA merged (the released model); 12-frame window, 3 sinks",
            LoraCard(file=HubFile(repo=_LONGLIVE, filename="models/lora.pt"), entry=LORA_ENTRY_AUTO, rank=256,
                     alpha=256.0),
        ),
        _longlive("longlive_base", "LongLive 1.0 stage-1 base without the LoRA (Astrolabe's default RL start)", None),
        _causal_forcing("causal_forcing_chunk", "Causal Forcing chunk-wise (3-frame blocks), 4 steps",
                        "chunkwise/causal_forcing.pt", "generator", 3, _STEPS_4, None),
        _causal_forcing("causal_forcing_frame", "Causal Forcing frame-wise (1-frame blocks), 4 steps",
                        "framewise/causal_forcing.pt", "generator_ema", 1, _STEPS_4, None),
        _causal_forcing("causal_forcing_frame_2step", "Causal Forcing++ frame-wise, 2 steps (first frame 4 steps)",
                        "causal-forcing++/framewise-2step.pt", "generator_ema", 1, (1000, 500), _STEPS_4),
        _causal_forcing("causal_forcing_frame_1step", "Causal Forcing++ frame-wise, 1 step (first frame 4 steps)",
                        "causal-forcing++/framewise-1step.pt", "generator_ema", 1, (1000,), _STEPS_4),
        BaseModelCard(
            name="krea14b", description="Krea Realtime 14B (Wan2.1-T2V-14B), global causal as Astrolabe trains it",
            **{**_VIDEO_1_3B, "wan_size": "wan21_t2v_14b"}, denoising_steps=_STEPS_4,
            first_block_denoising_steps=None, frames_per_block=3, local_attn_frames=None, sink_frames=0,
            checkpoint_format="krea_safetensors", checkpoint_entry=None, checkpoint=_KREA_FILE, lora=None,
            fill_base=None,
        ),
        BaseModelCard(
            name="krea_served", description="Krea Realtime 14B as Krea serves it (release_server.py): steps 1000 937 833 625 "
            "unwarped; KV recompute before every block: cache zeroed and rebuilt at t=0 from 3 context frames "
            "(the first latent frame, VAE re-encoded from the oldest of the last 9 decoded pixel frames once it "
            "leaves the window, + the 2 newest) at RoPE positions 0..2, new block denoised at 3..5, no context "
            "pass, unbounded length; noise streams and the blog's KV-cache attention bias (not in Krea's code) "
            "differ: see astrolabe.sampling.recompute",
            **{**_VIDEO_1_3B, "wan_size": "wan21_t2v_14b", "warp_denoising_steps": False, "kv_cache": "recompute"},
            denoising_steps=_KREA_SERVED_STEPS, first_block_denoising_steps=None, frames_per_block=3,
            local_attn_frames=6, sink_frames=0, checkpoint_format="krea_safetensors", checkpoint_entry=None,
            checkpoint=_KREA_FILE, lora=None, fill_base=None,
        ),
        BaseModelCard(
            name="tiny", description="CPU test model: tiny DiT and tiny text encoder, random init, no files",
            wan_size="tiny", text_encoder_kind="tiny", flow_shift=5.0, denoising_steps=_STEPS_4,
            first_block_denoising_steps=None, warp_denoising_steps=True, frames_per_block=3, local_attn_frames=None,
            sink_frames=0, context_noise=0, height=64, width=64, num_frames=21, fps=16, checkpoint_format=None,
            checkpoint_entry=None, checkpoint=None, lora=None, vae=None, text_encoder=None, tokenizer=None,
            kv_cache="context_pass", fill_base=None, pretrained=None,
        ),
        BaseModelCard(
            name="world", description="The tiny world model: tiny_world DiT + tiny UMT5 over word ids (text_len 64) "
            "pretrained on the procedural world (astrolabe world build), preview VAE",
            wan_size="tiny_world", text_encoder_kind="tiny", flow_shift=5.0, denoising_steps=_STEPS_4,
            first_block_denoising_steps=None, warp_denoising_steps=True, frames_per_block=3, local_attn_frames=None,
            sink_frames=0, context_noise=0, height=64, width=64, num_frames=21, fps=16, checkpoint_format=None,
            checkpoint_entry=None, checkpoint=None, lora=None, vae=None, text_encoder=None, tokenizer=None,
            kv_cache="context_pass", fill_base=None, pretrained="world",
        ),
    ]
    return {s.name: s for s in cards}


BASE_MODELS: dict[str, BaseModelCard] = _build_registry()


def base_model_names() -> list[str]:
    return sorted(BASE_MODELS)


def get_base_model(name: str) -> BaseModelCard:
    """The card called ``name``; unknown names list the known ones."""
    try:
        return BASE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown base model {name!r}; known: {base_model_names()}") from None


# ------------------------------------------------------------------------------------------------ files


def resolve_files(card: BaseModelCard, root: Path, *, fill_base: bool = False) -> dict[str, Path]:
    """Local paths of every file of ``card`` under ``root`` (whether or not they exist)."""
    return {role: Path(root) / f.local_path for role, f in card.files(fill_base=fill_base).items()}


def check_files(
    card: BaseModelCard, root: Path, roles: Iterable[str] | None = None, *, fill_base: bool = False
) -> dict[str, Path]:
    """:func:`resolve_files` (restricted to ``roles`` if given), raising ``FileNotFoundError`` that lists every
    missing file and its download command in one message (an empty directory: all of them)."""
    files = card.files(fill_base=fill_base)
    if roles is not None:
        files = {r: f for r, f in files.items() if r in set(roles)}
    paths = {role: Path(root) / f.local_path for role, f in files.items()}
    missing = [
        f"  {role}: {paths[role]}  <- {files[role].download_command(root)}"
        for role in paths
        if not (paths[role].is_dir() if files[role].is_dir else paths[role].is_file())
    ]
    if missing:
        raise FileNotFoundError(f"base model {card.name!r} is missing {len(missing)} file(s):\n" + "\n".join(missing))
    return paths


def text_encoder_directory(card: BaseModelCard, root: Path) -> Path | None:
    """The ``TextEncoderConfig.directory`` for ``card`` (the folder holding the T5 file and ``google/umt5-xxl/``)."""
    if card.text_encoder is None:
        return None
    return Path(root) / card.text_encoder.local_path.parent


def read_base_model_state(
    card: BaseModelCard,
    root: Path,
    *,
    entry: str | None = None,
    lora_entry: str | None = None,
    fill_missing_from_base: bool = False,
) -> StateDict:
    """Wan-named DiT state dict of ``card`` from the files under ``root`` (LoRA merged for ``longlive``).

    ``entry`` overrides the card's default sub-dict (e.g. ``generator`` instead of ``generator_ema``);
    ``lora_entry`` the LoRA's (``"generator_lora"``, ``"bare"`` for a bare adapter, ``"auto"``); with
    ``fill_missing_from_base`` keys the checkpoint lacks are filled from ``card.fill_base`` (logged).
    """
    if card.checkpoint_format is None or card.checkpoint is None:
        raise ValueError(f"base model {card.name!r} has no checkpoint (it is randomly initialised)")
    if fill_missing_from_base and card.fill_base is None:
        raise ValueError(f"fill_missing_from_base: base model {card.name!r} has no base DiT to fill from")
    paths = check_files(card, root, roles=("dit", "lora", "fill_base"), fill_base=fill_missing_from_base)
    lora = card.lora
    if lora_entry is None:
        lora_entry = lora.entry if lora else LORA_ENTRY_AUTO
    sd = read_dit_checkpoint(
        card.checkpoint_format,
        paths["dit"],
        entry=entry if entry is not None else card.checkpoint_entry,
        lora_path=paths.get("lora"),
        lora_entry=None if lora_entry == "bare" else lora_entry,
        lora_rank=lora.rank if lora else 256,
        lora_alpha=lora.alpha if lora else 256.0,
    )
    if fill_missing_from_base:
        sd = fill_missing_keys(sd, read_wan_base(paths["fill_base"]), f"{card.name} {paths['dit'].name}")
    return sd

"""The build layer: assemble a run's generation stack from its config and the base-model registry.

The only place that turns ``model.base`` + ``model.checkpoint_dir`` into modules: the DiT (tiny random
init, or a real checkpoint through :mod:`astrolabe.models.checkpoints`), the VAE, the text encoder, a
LoRA policy merged in for sampling, and the sampler's :class:`StreamConfig` (block size, window, sink,
warped schedule, latent grid). It sits above ``models/``, ``sampling/`` and ``rl/``, below the stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from astrolabe.config import ModelConfig, RunConfig
from astrolabe.models.checkpoints import load_dit_state
from astrolabe.models.registry import BaseModelCard, KVCacheMode, check_files, get_base_model, read_base_model_state
from astrolabe.models.registry import text_encoder_directory
from astrolabe.models.wan.attention import CausalWindow, resolve_backend
from astrolabe.models.wan.dit import WanDiT
from astrolabe.models.wan.vae import WanVAE, tiny_vae, vae_from_pretrained_dir
from astrolabe.models.wan.vae_preview import init_preview_decoder_
from astrolabe.sampling.generation import GenerationStack
from astrolabe.sampling.recompute import KREA_CONTEXT_FRAMES
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import StreamConfig

if TYPE_CHECKING:  # the text encoder imports transformers: only where a model is built
    from astrolabe.models.wan.text_encoder import WanTextEncoder

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _require_dir(mc: ModelConfig, card: BaseModelCard) -> Path:
    if mc.checkpoint_dir is None:
        files = "\n".join(f"  {f.local_path}  <- {f.download_command('<dir>')}" for f in card.files().values())
        raise FileNotFoundError(
            f"model.checkpoint_dir is not set; base model {card.name!r} needs a local directory with:\n{files}\n"
            "download them there and set model.checkpoint_dir (or use model.base=tiny on CPU)"
        )
    root = Path(mc.checkpoint_dir)
    check_files(card, root, fill_base=mc.fill_missing_from_base)  # one error listing every missing file
    return root


def stream_config(mc: ModelConfig, card: BaseModelCard, kv_cache: KVCacheMode | Literal["auto"] = "auto") -> StreamConfig:
    """Sampler sizes from the registry (window/sink overridable in the model config).

    ``kv_cache="auto"`` samples as the card says (``krea_served``: Krea's KV recompute); ``recompute`` sizes its
    own window (``K + f`` = 6 frames, no sink, as Krea's server), so a window/sink override is an error there.
    """
    mode: KVCacheMode = card.kv_cache if kv_cache == "auto" else kv_cache
    window = mc.local_attn_frames if mc.local_attn_frames is not None else card.local_attn_frames
    sink = mc.sink_frames if mc.sink_frames is not None else card.sink_frames
    if mode == "recompute":
        if mc.local_attn_frames is not None or mc.sink_frames is not None:
            raise ValueError("kv_cache='recompute' (Krea's served loop) sizes its own window (context 3 + block "
                             "frames, no sink): unset model.local_attn_frames and model.sink_frames")
        window, sink = KREA_CONTEXT_FRAMES + card.frames_per_block, 0
    flow = FlowSchedule(card.flow_shift)
    steps = StepSchedule.from_steps(flow, card.denoising_steps, card.warp_denoising_steps, float(card.context_noise))
    first = (
        StepSchedule.from_steps(flow, card.first_block_denoising_steps, card.warp_denoising_steps, float(card.context_noise))
        if card.first_block_denoising_steps is not None
        else None
    )
    return StreamConfig(
        causal=CausalWindow(card.frames_per_block, window, sink),
        steps=steps,
        latent_channels=card.wan_config().in_dim,
        latent_height=card.latent_height,
        latent_width=card.latent_width,
        first_block_steps=first,
        kv_cache=mode,
    )


def _pretrained_world(mc: ModelConfig):
    """The built world model (``pretrained="world"``) under ``<model.checkpoint_dir or runs>/world/<key>/``;
    an error saying to run ``astrolabe world build`` if it is not there."""
    from astrolabe.world.pretrain import load_world_model, world_model_root

    return load_world_model(world_model_root(mc.checkpoint_dir))


def build_dit(mc: ModelConfig, card: BaseModelCard) -> WanDiT:
    """The base DiT in eval mode on the configured device and dtype."""
    cfg = card.wan_config()
    backend = resolve_backend(mc.attention_backend, mc.device, _DTYPES[mc.dtype])
    if card.pretrained == "world":
        model = _pretrained_world(mc).dit
    elif card.checkpoint_format is None:
        model = WanDiT(cfg, attention_backend=backend)
        model.init_weights(torch.Generator().manual_seed(mc.init_seed))
    else:
        root = _require_dir(mc, card)
        entry = None if mc.checkpoint_entry == "default" else mc.checkpoint_entry
        lora_entry = None if mc.lora_entry == "default" else mc.lora_entry
        sd = read_base_model_state(
            card, root, entry=entry, lora_entry=lora_entry, fill_missing_from_base=mc.fill_missing_from_base
        )
        with torch.device("meta"):
            model = WanDiT(cfg, attention_backend=backend)
        load_dit_state(model, sd, assign=True)
    model = model.to(device=mc.device, dtype=_DTYPES[mc.dtype]).eval().requires_grad_(False)
    if mc.compile_blocks:
        model.compile_blocks()
    return model


def build_vae(mc: ModelConfig, card: BaseModelCard) -> WanVAE:
    """The VAE in eval mode: the tiny one (preview decoder unless ``tiny_vae_init=random``) or the real file."""
    if card.vae is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.init_seed + 1)
            vae = WanVAE(tiny_vae())
        if mc.tiny_vae_init == "preview":
            init_preview_decoder_(vae)
        return vae.to(mc.device).eval().requires_grad_(False)
    root = _require_dir(mc, card)
    path = check_files(card, root, roles=("vae",))["vae"]
    return vae_from_pretrained_dir(path.parent, device=mc.device)


def build_text(mc: ModelConfig, card: BaseModelCard) -> WanTextEncoder:
    """The text encoder of ``card`` (tiny random init, the world's, or umT5-XXL from ``checkpoint_dir``)."""
    from astrolabe.models.wan.text_encoder import TextEncoderConfig, build_text_encoder  # imports transformers

    wan = card.wan_config()
    if card.pretrained == "world":
        return _pretrained_world(mc).text.to(mc.device)
    if card.text_encoder_kind == "tiny":
        cfg = TextEncoderConfig(kind="tiny", text_len=wan.text_len, dtype="float32")
    else:
        root = _require_dir(mc, card)
        check_files(card, root, roles=("text_encoder", "tokenizer"))
        cfg = TextEncoderConfig(kind="umt5_xxl", directory=text_encoder_directory(card, root), text_len=wan.text_len,
                                dtype=mc.dtype)
    return build_text_encoder(cfg, seed=mc.init_seed + 2, device=mc.device)


def attach_lora_for_inference(dit: WanDiT, path: Path, policy: str = "default") -> WanDiT:
    """Merge a LoRA policy into the DiT for sampling.

    ``path`` is a PEFT adapter directory or a training checkpoint (a directory with ``lora/``, e.g. the
    ``state/`` of an nft_update output). ``policy="default"`` uses the trained adapter ``lora/``;
    ``"old"``, ``"ref"`` or ``"ema"`` use ``adapters/<policy>.safetensors`` of the checkpoint (same
    LoRA layout as ``lora/``; the rollout samples with the old policy, as NFT prescribes).
    """
    from astrolabe.rl.lora import apply_lora, copy_into_adapter_, load_lora_model, read_lora_config

    if policy == "default":
        merged = load_lora_model(dit, path).merge_and_unload()
    else:
        tensors_path = Path(path) / "adapters" / f"{policy}.safetensors"
        if not tensors_path.is_file():
            raise FileNotFoundError(
                f"{tensors_path} is missing: {path} is not a training checkpoint holding the {policy!r} policy "
                "(only nft_update checkpoints have adapters/); pass the checkpoint's state/ directory"
            )
        from safetensors.torch import load_file

        model = apply_lora(dit, read_lora_config(path), adapter_name="default")
        copy_into_adapter_(model, "default", load_file(str(tensors_path)), what=f"{policy!r} policy of {path}")
        merged = model.merge_and_unload()
    return merged.eval().requires_grad_(False)


def build_generation_stack(
    cfg: RunConfig, lora: Path | None = None, policy: str = "default"
) -> tuple[GenerationStack, BaseModelCard]:
    """DiT (with ``policy`` of the LoRA checkpoint ``lora`` merged in, if given), VAE, text encoder."""
    mc = cfg.model
    card = get_base_model(mc.base)
    dit = build_dit(mc, card)
    if lora is not None:
        dit = attach_lora_for_inference(dit, lora, policy)
    text = build_text(mc, card)
    vae = build_vae(mc, card)
    return (
        GenerationStack(
            dit=dit,
            vae=vae,
            encode_text=lambda prompts: text.encode(prompts).to(dtype=_DTYPES[mc.dtype]),
            stream=stream_config(mc, card, cfg.sampling.kv_cache),
            fps=card.fps,
            device=torch.device(mc.device),
        ),
        card,
    )

"""Build the model stack of a run from its config and the base-model registry.

The only place that turns ``model.base`` + ``model.checkpoint_dir`` into modules: the DiT (tiny random
init, or a real checkpoint through :mod:`astrolabe.models.checkpoints`), the VAE, the text encoder and
the sampler's :class:`StreamSpec` (block size, window, sink, warped schedule, latent grid).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from astrolabe.config import ModelConfig, RunConfig
from astrolabe.generate import GenerationStack
from astrolabe.models.checkpoints import load_dit_state
from astrolabe.models.registry import BaseModelSpec, check_files, get_base_model, read_base_model_state
from astrolabe.models.registry import text_encoder_directory
from astrolabe.models.wan.attention import CausalSpec
from astrolabe.models.wan.dit import WanDiT
from astrolabe.models.wan.text_encoder import TextEncoderConfig, WanTextEncoder, build_text_encoder
from astrolabe.models.wan.vae import WanVAE, tiny_vae, vae_from_pretrained_dir
from astrolabe.models.wan.vae_preview import init_preview_decoder_
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import StreamSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _require_dir(mc: ModelConfig, spec: BaseModelSpec) -> Path:
    if mc.checkpoint_dir is None:
        files = "\n".join(f"  {f.local_path}  <- {f.download_command('<dir>')}" for f in spec.files().values())
        raise FileNotFoundError(
            f"model.checkpoint_dir is not set; base model {spec.name!r} needs a local directory with:\n{files}\n"
            "download them there and set model.checkpoint_dir (or use model.base=tiny on CPU)"
        )
    return Path(mc.checkpoint_dir)


def stream_spec(mc: ModelConfig, spec: BaseModelSpec) -> StreamSpec:
    """Sampler sizes from the registry (window/sink overridable in the model config)."""
    window = mc.local_attn_frames if mc.local_attn_frames is not None else spec.local_attn_frames
    sink = mc.sink_frames if mc.sink_frames is not None else spec.sink_frames
    flow = FlowSchedule(spec.flow_shift)
    steps = StepSchedule.from_steps(flow, spec.denoising_steps, spec.warp_denoising_steps, float(spec.context_noise))
    first = (
        StepSchedule.from_steps(flow, spec.first_block_denoising_steps, spec.warp_denoising_steps, float(spec.context_noise))
        if spec.first_block_denoising_steps is not None
        else None
    )
    return StreamSpec(
        causal=CausalSpec(spec.frames_per_block, window, sink),
        steps=steps,
        latent_channels=spec.wan_config().in_dim,
        latent_height=spec.latent_height,
        latent_width=spec.latent_width,
        first_block_steps=first,
    )


def build_dit(mc: ModelConfig, spec: BaseModelSpec) -> WanDiT:
    """The base DiT in eval mode on the configured device and dtype."""
    cfg = spec.wan_config()
    if spec.checkpoint_format is None:
        model = WanDiT(cfg, attention_backend=mc.attention_backend)
        model.init_weights(torch.Generator().manual_seed(mc.init_seed))
    else:
        root = _require_dir(mc, spec)
        entry = None if mc.checkpoint_entry == "default" else mc.checkpoint_entry
        sd = read_base_model_state(spec, root, entry=entry)
        with torch.device("meta"):
            model = WanDiT(cfg, attention_backend=mc.attention_backend)
        load_dit_state(model, sd, assign=True)
    return model.to(device=mc.device, dtype=_DTYPES[mc.dtype]).eval().requires_grad_(False)


def build_vae(mc: ModelConfig, spec: BaseModelSpec) -> WanVAE:
    """The VAE in eval mode: the tiny one (preview decoder unless ``tiny_vae_init=random``) or the real file."""
    if spec.vae is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.init_seed + 1)
            vae = WanVAE(tiny_vae())
        if mc.tiny_vae_init == "preview":
            init_preview_decoder_(vae)
        return vae.to(mc.device).eval().requires_grad_(False)
    root = _require_dir(mc, spec)
    path = check_files(spec, root, roles=("vae",))["vae"]
    return vae_from_pretrained_dir(path.parent, device=mc.device)


def build_text(mc: ModelConfig, spec: BaseModelSpec) -> WanTextEncoder:
    wan = spec.wan_config()
    if spec.text_encoder_kind == "tiny":
        cfg = TextEncoderConfig(kind="tiny", text_len=wan.text_len, dtype="float32")
    else:
        root = _require_dir(mc, spec)
        check_files(spec, root, roles=("text_encoder", "tokenizer"))
        cfg = TextEncoderConfig(kind="umt5_xxl", directory=text_encoder_directory(spec, root), text_len=wan.text_len,
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
) -> tuple[GenerationStack, BaseModelSpec]:
    """DiT (with ``policy`` of the LoRA checkpoint ``lora`` merged in, if given), VAE, text encoder."""
    mc = cfg.model
    spec = get_base_model(mc.base)
    dit = build_dit(mc, spec)
    if lora is not None:
        dit = attach_lora_for_inference(dit, lora, policy)
    text = build_text(mc, spec)
    vae = build_vae(mc, spec)
    return (
        GenerationStack(
            dit=dit,
            vae=vae,
            encode_text=lambda prompts: text.encode(prompts).to(dtype=_DTYPES[mc.dtype]),
            spec=stream_spec(mc, spec),
            fps=spec.fps,
            device=torch.device(mc.device),
        ),
        spec,
    )

"""Random-weight reward checkpoints in the real on-disk layouts (tiny sizes), for tests.

- HPSv2.1: ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``) + a tiny open_clip ``<architecture>.json``.
- HPSv3: ``HPSv3.safetensors`` (full model, transformers-4.45 keys, + ``lm_head.weight``) and a Qwen2-VL
  backbone snapshot (config, byte-level tokenizer, preprocessor).
- VideoReward: ``model_config.json`` + ``checkpoint-<step>/model.pth`` (full layout), or
  ``checkpoint-<step>/adapter_model.safetensors`` + ``non_lora_state_dict.pth`` over a backbone whose
  weights are sharded (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), as the
  Qwen2-VL-2B-Instruct release ships them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from astrolabe._compat import install_torchvision_guard
from astrolabe.rewards.models.common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from astrolabe.rewards.models.hpsv2 import CHECKPOINT_FILE as HPSV2_FILE
from astrolabe.rewards.models.hpsv3 import CHECKPOINT_FILE as HPSV3_FILE
from astrolabe.rewards.models.hpsv3 import build_hpsv3_head
from astrolabe.rewards.models.qwen2vl import Qwen2VLRewardNet
from astrolabe.rewards.models.videoalign import DIMENSIONS

# ---------------------------------------------------------------------------------------------- HPSv2

TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def write_hpsv2_checkpoint(
    checkpoint_dir: Path, architecture: str = "tiny-hps-test", seed: int = 0, extra: dict[str, Any] | None = None
) -> None:
    """Random open_clip weights as ``HPS_v2.1_compressed.pt`` (``{"state_dict": ..., **extra}``) + ``<architecture>.json``."""
    import open_clip

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    arch_json = checkpoint_dir / f"{architecture}.json"
    arch_json.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(arch_json)
    torch.manual_seed(seed)  # weights only
    model = open_clip.create_model(architecture, pretrained=None)
    torch.save({"state_dict": model.state_dict(), **(extra or {})}, checkpoint_dir / HPSV2_FILE)


# ------------------------------------------------------------------------------------ Qwen2-VL backbone

QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)


def qwen2vl_test_config(
    hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
    vision_depth: int = 2, vision_dim: int = 32, vision_heads: int = 2, vocab: int = 272,
) -> Any:
    """A Qwen2VLConfig whose special-token ids match :func:`write_test_tokenizer` (byte-level, 263 ids).

    Real sizes: 7B = (3584, 28, 28, 4, 18944, 32, 1280, 16, 152064); 2B = (1536, 28, 12, 2, 8960, 32, 1280, 16, 151936).
    """
    install_torchvision_guard()
    from transformers import Qwen2VLConfig

    head_dim = hidden // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    section[0] += head_dim // 2 - sum(section)
    return Qwen2VLConfig(
        text_config={
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
            "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": None,
        },
        vision_config={"depth": vision_depth, "embed_dim": vision_dim, "num_heads": vision_heads, "hidden_size": hidden},
        image_token_id=261, video_token_id=262, vision_start_token_id=259, vision_end_token_id=260,
    )


def write_test_tokenizer(directory: Path) -> None:
    """Byte-level BPE tokenizer (256 byte tokens, no merges) + the Qwen2-VL special tokens (ids 256..262).

    Needs no download: any text tokenizes to its UTF-8 bytes. Saved as tokenizer.json + tokenizer_config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    install_torchvision_guard()
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN2VL_SPECIAL_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>").save_pretrained(
        str(directory)
    )


def write_qwen2vl_backbone_files(directory: Path, config: Any) -> None:
    """config.json (legacy-compatible), tokenizer files and preprocessor_config.json of a Qwen2-VL snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    write_test_tokenizer(directory)
    pre = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "patch_size": 14,
           "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def legacy_state_dict(net: Qwen2VLRewardNet) -> dict[str, torch.Tensor]:
    """``net``'s weights under the transformers-4.45 keys of the reference checkpoints (inverse table)."""
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("language_model."):
            key = "model." + key[len("language_model.") :]
        out[key] = value.detach().clone().contiguous()
    return out


def write_sharded_safetensors(directory: Path, state: dict[str, torch.Tensor], prefix: str, shards: int) -> None:
    """``state`` split over ``<prefix>-0000k-of-0000n.safetensors`` + ``<prefix>.safetensors.index.json``
    (HF layout: ``{"metadata": {"total_size": ...}, "weight_map": {key: shard}}``)."""
    from safetensors.torch import save_file

    keys = sorted(state)
    names = [f"{prefix}-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        save_file({k: state[k].contiguous() for k in keys if weight_map[k] == name}, str(directory / name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------------- HPSv3


def write_hpsv3_checkpoint(checkpoint_dir: Path, backbone_dir: Path, config: Any, seed: int = 0) -> None:
    """Random-weight HPSv3 in the real layout: ``HPSv3.safetensors`` (legacy keys, + ``lm_head.weight``)
    and a backbone snapshot (config, byte-level test tokenizer, preprocessor).

    ``config``'s text vocab is set to the test tokenizer size + 1 (the added ``<|Reward|>``) = 264.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)  # weights only; scoring never draws random numbers
    config.text_config.vocab_size = 264
    net = Qwen2VLRewardNet(config, build_hpsv3_head(config.text_config.hidden_size))
    state = legacy_state_dict(net)
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(checkpoint_dir / HPSV3_FILE))
    write_qwen2vl_backbone_files(backbone_dir, config)


# ----------------------------------------------------------------------------------------- VideoReward


def videoreward_net(config: Any, seed: int = 0) -> Qwen2VLRewardNet:
    """Random VideoReward network: vocab = 263 test tokens + 3 reward tokens, head Linear(D, 3, bias=False)."""
    torch.manual_seed(seed)  # weights only
    config.text_config.vocab_size = 266
    return Qwen2VLRewardNet(config, torch.nn.Linear(config.text_config.hidden_size, 3, bias=False))


def write_videoalign_checkpoint(checkpoint_dir: Path, backbone_dir: Path, config: Any, seed: int = 0, step: int = 1) -> None:
    """Random-weight VideoReward in the real *full* layout (``model_config.json`` + ``checkpoint-<step>/model.pth``
    with PEFT-free legacy keys) and a backbone snapshot."""
    net = videoreward_net(config, seed)
    (checkpoint_dir / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
    torch.save(legacy_state_dict(net), checkpoint_dir / f"checkpoint-{step}" / "model.pth")
    write_model_config(checkpoint_dir)
    write_qwen2vl_backbone_files(backbone_dir, config)


def write_videoalign_lora_checkpoint(
    checkpoint_dir: Path, backbone_dir: Path, config: Any, seed: int = 0, step: int = 1, shards: int = 2,
    lora_r: int = 2, lora_alpha: int = 4,
) -> Qwen2VLRewardNet:
    """VideoReward in the real *LoRA* layout over a sharded backbone; returns the merged network it stands for.

    Backbone: the base weights (reward tokens' rows untrained) as ``model-0000k-of-0000n.safetensors`` +
    ``model.safetensors.index.json``. Checkpoint: PEFT ``adapter_model.safetensors`` (``lora_A/B`` of the
    language model's ``q_proj`` layers, PEFT-wrapped keys) and ``non_lora_state_dict.pth`` (the trained
    ``embed_tokens`` and ``rm_head``, PEFT-wrapped ``base_model.model.`` keys, saved as ``nn.Parameter``).
    """
    from safetensors.torch import save_file

    net = videoreward_net(config, seed)
    base = legacy_state_dict(net)
    backbone_dir.mkdir(parents=True, exist_ok=True)
    base_no_head = {k: v for k, v in base.items() if not k.startswith("rm_head.")}
    base_no_head["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][:263]  # no reward tokens yet
    write_sharded_safetensors(backbone_dir, base_no_head, "model", shards)
    write_qwen2vl_backbone_files(backbone_dir, config)
    g = torch.Generator().manual_seed(seed + 1)
    lora, merged = {}, dict(base)
    for key in [k for k in base if k.endswith("self_attn.q_proj.weight") and k.startswith("model.")]:
        module = key[: -len(".weight")]
        a = torch.randn(lora_r, base[key].shape[1], generator=g) * 0.1
        b = torch.randn(base[key].shape[0], lora_r, generator=g) * 0.1
        lora[f"base_model.model.{module}.lora_A.weight"] = a
        lora[f"base_model.model.{module}.lora_B.weight"] = b
        merged[key] = base[key] + (lora_alpha / lora_r) * b @ a
    trained = {"model.embed_tokens.weight": base["model.embed_tokens.weight"] + 0.5,
               **{k: v + 0.25 for k, v in base.items() if k.startswith("rm_head.")}}
    merged.update(trained)
    non_lora = {f"base_model.model.{k}": torch.nn.Parameter(v) for k, v in trained.items()}
    ckpt = checkpoint_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(ckpt / "adapter_model.safetensors"))
    torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
    write_model_config(checkpoint_dir, lora_r=lora_r, lora_alpha=lora_alpha)
    out = videoreward_net(config, seed)
    out.load_state_dict({("language_model." + k[6:] if k.startswith("model.") else k): v for k, v in merged.items()})
    return out.eval()


def write_model_config(checkpoint_dir: Path, lora_r: int = 4, lora_alpha: int = 8, max_frame_pixels: int = 56 * 84) -> None:
    """``model_config.json`` with the fields this loader reads (same structure as VideoReward's)."""
    cfg = {
        "data_config": {"max_frame_pixels": max_frame_pixels, "num_frames": None, "fps": 2.0,
                        "eval_dim": list(DIMENSIONS), "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 3, "use_special_tokens": True,
                         "reward_token": "special", "torch_dtype": "bfloat16"},
        "peft_lora_config": {"lora_enable": True, "lora_r": lora_r, "lora_alpha": lora_alpha, "use_rslora": False},
        "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0},
    }
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "model_config.json").write_text(json.dumps(cfg, indent=2))

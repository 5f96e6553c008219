"""Typed, frozen, validated run configuration, loaded from YAML with ``--set a.b=c`` overrides.

Every knob has exactly one default, here or in the component's own config class (composed below).
Errors name the key path and what is allowed; the resolved config dumps back to YAML and reloads
identically (:func:`dump_config` / :func:`load_config`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from astrolabe.configbase import Frozen
from astrolabe.data.shards import ShardWriterConfig
from astrolabe.rewards.base import RewardsConfig
from astrolabe.rl.advantages import AdvantageConfig
from astrolabe.rl.arcopo import ArCoPOConfig
from astrolabe.rl.lora import LoRAConfig
from astrolabe.rl.nft import NFTConfig
from astrolabe.rl.schedules import PolicyAveragingConfig, ReferenceRefreshConfig
from astrolabe.rl.selective_kl import SelectiveKLConfig
from astrolabe.rl.optim import OptimConfig
from astrolabe.rl.streaming_update import StreamingUpdateConfig
from astrolabe.tracking import TrackingConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path and how to fix it."""


class ModelConfig(Frozen):
    """Which base model to run and where its files are."""

    base: str = Field("tiny", description="Base-model registry name: tiny, self_forcing, longlive, ...")
    checkpoint_dir: Path | None = Field(
        None, description="Local directory with the base model's files (None only for the tiny random model)."
    )
    checkpoint_entry: Literal["default", "generator_ema", "generator"] = Field(
        "default", description="Which sub-dict of a .pt checkpoint to load; 'default' = the registry's choice."
    )
    init_seed: int = Field(0, description="Seed of the tiny model's random weights (tiny only).")
    tiny_vae_init: Literal["preview", "random"] = Field(
        "preview",
        description="Tiny model only: 'preview' sets the VAE decoder to the Wan2.1 latent-to-RGB preview (pixels "
        "follow the latents smoothly, so pixel rewards are learnable); 'random' keeps a random decoder.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    attention_backend: Literal["sdpa", "flash"] = "sdpa"
    local_attn_frames: int | None = Field(
        None, description="Override the registry's attention window in latent frames (incl. sink); None = registry."
    )
    sink_frames: int | None = Field(None, description="Override the registry's sink frames; None = registry.")
    gradient_checkpointing: bool = False


class RolloutConfig(Frozen):
    """Streaming rollouts with clip-level group branching."""

    num_latent_frames: int | None = Field(
        None, ge=1, description="Latent frames per video; None = the base model's default."
    )
    group_size: int = Field(4, ge=2, description="K candidates branched from each shared prefix.")
    window_blocks: int = Field(2, ge=1, description="Blocks of the clip window each candidate generates.")
    window_start: Literal["first", "last", "random"] = Field(
        "random", description="Where the clip window starts (in blocks); 'random' uses the rollout seed."
    )
    prompts_per_iteration: int = Field(4, ge=1)
    seed: int = 0
    save_mp4: bool = True
    video_crf: int = Field(
        0, ge=0, le=51, description="x264 CRF of the scored mp4s (rollout and evaluation). 0 = lossless: rewards see "
        "exactly the generated frames and reruns are bit-identical (lossy x264 output differs between processes).",
    )
    shards: ShardWriterConfig = ShardWriterConfig()


class DataConfig(Frozen):
    """Prompt sources and filtering."""

    train_prompts: Path = Field(Path("builtin:tiny/train.txt"), description="txt / jsonl / csv prompt file.")
    eval_prompts: Path | None = Field(None, description="Held-out prompts; None = the split of train_prompts.")
    column: str = Field("prompt", description="Column or key with the prompt text in jsonl/csv files.")
    min_tokens: int = Field(2, ge=1)
    max_tokens: int = Field(120, ge=1)
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard of word 3-grams.")
    blocklist: tuple[str, ...] = ()
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0


class RLConfig(Frozen):
    """The update of one iteration: algorithm, objective, labels, policies, LoRA, optimizer, passes."""

    algorithm: Literal["nft", "arcopo"] = Field(
        "nft", description="'nft': forward-process NFT (rl.nft); 'arcopo': AR-CoPO / Neighbor GRPO (section arcopo)."
    )
    nft: NFTConfig = NFTConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    selective_kl: SelectiveKLConfig | None = Field(None, description="None = KL on every sample.")
    averaging: PolicyAveragingConfig = PolicyAveragingConfig()
    ema_start_step: int = Field(0, ge=0, description="First optimizer step that updates the EMA.")
    reference_refresh: ReferenceRefreshConfig = ReferenceRefreshConfig()
    reference: Literal["base", "lagging"] = Field("base", description="KL reference: base model or lagging adapter.")
    lora: LoRAConfig = LoRAConfig()
    optim: OptimConfig = OptimConfig()
    update: StreamingUpdateConfig = StreamingUpdateConfig()
    micro_batch_size: int = Field(2, ge=1, description="Candidates of one group per forward/backward.")
    accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the iteration's rollouts per NFT update stage.")
    lora_seed: int = Field(0, description="Seed of the LoRA init and of the update's noise generators.")


class PipelineConfig(Frozen):
    runs_root: Path = Path("runs")
    iterations: int = Field(3, ge=1)
    eval_every: int = Field(1, ge=1, description="Evaluate every N iterations (and at 0 and the last).")
    eval_seeds: tuple[int, ...] = Field((1000, 1001), min_length=1, description="Noise seeds of every eval video.")
    eval_max_prompts: int | None = Field(None, ge=1, description="Evaluate the first N held-out prompts; None = all.")


class RunConfig(Frozen):
    name: str = Field("tiny", pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name = run directory name.")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    eval_rewards: RewardsConfig | None = Field(None, description="Rewards reported at evaluation; None = rewards.")
    rl: RLConfig = RLConfig()
    data: DataConfig = DataConfig()
    pipeline: PipelineConfig = PipelineConfig()
    tracking: TrackingConfig = TrackingConfig()
    arcopo: ArCoPOConfig = Field(
        ArCoPOConfig(), description="AR-CoPO settings, read when rl.algorithm is 'arcopo'; G is rollout.group_size."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.rl.nft.adv_clip_max != self.rl.advantage.clip:
            raise ValueError(
                f"rl.nft.adv_clip_max ({self.rl.nft.adv_clip_max}) must equal rl.advantage.clip "
                f"({self.rl.advantage.clip}): both are the advantage clip A"
            )
        if self.rl.selective_kl is not None:
            names = {s.name for s in self.rewards.rewards}
            wanted = [self.rl.selective_kl.main_reward, *self.rl.selective_kl.auxiliary_rewards]
            missing = [n for n in wanted if n not in names]
            if missing:
                raise ValueError(
                    f"rl.selective_kl names rewards {missing} that are not in rewards.rewards {sorted(names)}"
                )
        if self.rl.algorithm == "arcopo" and self.arcopo.anchors > self.rollout.group_size:
            raise ValueError(
                f"arcopo.anchors ({self.arcopo.anchors}) must be <= rollout.group_size ({self.rollout.group_size}), "
                "the G branches anchors are drawn from; lower arcopo.anchors or raise rollout.group_size"
            )
        if self.rl.algorithm == "arcopo" and self.rl.reference != "base":
            raise ValueError(
                "rl.algorithm 'arcopo' has no KL term (its reference is the base model): set rl.reference: base"
            )
        return self


# ---------------------------------------------------------------------------------------------- I/O


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `astrolabe config show` prints every allowed key)"
        got = e.get("input")
        got_s = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{got_s}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. rl.nft.beta=0.2")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None = all defaults = the tiny CPU run) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (presets live in configs/, e.g. configs/tiny.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must contain a mapping of config sections at the top level")
        source = str(p)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    return config_from_dict(data, source)


def config_to_dict(cfg: Frozen) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(section: Any) -> str:
    """Stable hash of a config (sub)section, for cache keys."""
    data = config_to_dict(section) if isinstance(section, Frozen) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

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
from pydantic import Field, ValidationError, field_validator, model_validator

from astrolabe.configbase import Frozen
from astrolabe.data.shards import ShardWriterConfig
from astrolabe.parallel import ParallelConfig
from astrolabe.presets import GPU_SCALES, check_gpus, derived_settings, gpu_scale
from astrolabe.rewards.spec import RewardsConfig
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

    base: str = Field(
        "tiny",
        description="Base-model registry name: tiny, self_forcing, longlive, ... The tiny model's byte-level text "
        "encoder reads at most 15 bytes of each prompt (text_len 16 incl. EOS): longer prompts are truncated, so "
        "prompts that share their first 15 bytes look identical to it.",
    )
    checkpoint_dir: Path | None = Field(
        None, description="Local directory with the base model's files (None only for the tiny random model). "
        "For base 'world': the root of the world-model cache (ROOT/world/<key>/; None = runs).",
    )
    checkpoint_entry: Literal["default", "generator_ema", "generator"] = Field(
        "default", description="Which sub-dict of a .pt checkpoint to load; 'default' = the registry's choice."
    )
    lora_entry: Literal["default", "auto", "generator_lora", "bare"] = Field(
        "default", description="LongLive lora.pt: 'default' = the registry's choice ('auto': the 'generator_lora' "
        "entry if present, else a bare PEFT adapter); 'generator_lora' or 'bare' force one layout.",
    )
    fill_missing_from_base: bool = Field(
        False, description="Fill DiT keys the checkpoint lacks from the Wan2.1 base DiT (Causal Forcing EMA files; "
        "upstream loads them non-strictly). Off: a missing key is an error listing them all.",
    )
    init_seed: int = Field(0, description="Seed of the tiny model's random weights (tiny only).")
    tiny_vae_init: Literal["preview", "random"] = Field(
        "preview",
        description="Tiny model only: 'preview' sets the VAE decoder to the Wan2.1 latent-to-RGB preview (pixels "
        "follow the latents smoothly, so pixel rewards are learnable); 'random' keeps a random decoder.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the base DiT, VAE and text features for rollout, scoring and update (GPU: bfloat16). "
        "The LoRA keeps its own dtype (rl.lora.dtype, float32 = fp32 master weights) and training forwards run "
        "under rl.optim.precision autocast.",
    )
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    attention_backend: Literal["auto", "sdpa", "flash"] = Field(
        "auto",
        description="'auto' = flash-attn when it is installed, the device is CUDA and model.dtype is bfloat16, else "
        "PyTorch SDPA; 'flash' requires all three (clear error otherwise); 'sdpa' always works.",
    )
    compile_blocks: bool = Field(
        False, description="torch.compile each DiT block (GPU option; the first forwards pay the compile time)."
    )
    local_attn_frames: int | None = Field(
        None, description="Override the registry's attention window in latent frames (incl. sink); None = registry."
    )
    sink_frames: int | None = Field(None, description="Override the registry's sink frames; None = registry.")


class SamplingConfig(Frozen):
    """Inference numerics of ``astrolabe generate`` (``rope``: generate only; ``kv_cache``: every generation stack,
    but rollouts and the RL update accept only ``context_pass``, the training sampler)."""

    rope: Literal["absolute", "cache_relative"] = Field(
        "absolute",
        description="'absolute': RoPE by absolute latent frame, keys cached after RoPE (training, Self-Forcing, "
        "LongLive). 'cache_relative': the release's inference_wan.py 'block-relativistic' RoPE: keys cached "
        "un-rotated and rotated by window slot at every forward, queries from the window start (no 1024-frame "
        "limit). Used by `astrolabe generate` only.",
    )
    kv_cache: Literal["auto", "context_pass", "recompute"] = Field(
        "auto",
        description="How the KV cache evolves between blocks. 'auto': the base model card's choice (krea_served: "
        "recompute, every other card: context_pass). 'context_pass': a t=0 pass writes each finished block "
        "(the training sampler). 'recompute': Krea's served loop (release_server.py): before each block the "
        "cache is rebuilt from the first latent frame (VAE re-encoded once it leaves the window) + the 2 "
        "newest, at RoPE positions 0..2, and the block is denoised at 3..5 (unbounded length; generation "
        "and evaluation only: rollouts and the RL update refuse it).",
    )


class RolloutConfig(Frozen):
    """Streaming rollouts with clip-level group branching."""

    num_latent_frames: int | None = Field(
        None, ge=1, description="Latent frames per video; None = the base model's default."
    )
    group_size: int = Field(
        4, description="K candidates branched from each shared prefix (>= 2: advantages compare the candidates of a "
        "group; K = 1 is refused, the release never uses it). Derived from resources.gpus when that is set.",
    )
    window_blocks: int = Field(2, ge=1, description="Blocks of the clip window each candidate generates.")
    window_start: Literal["first", "last", "random"] = Field(
        "random", description="Where the clip window starts (in blocks); 'random' uses the rollout seed."
    )
    prompts_per_iteration: int = Field(
        4, ge=1, description="Prompt groups per iteration; derived from resources.gpus when that is set."
    )
    seed: int = 0
    save_mp4: bool = True
    video_crf: int = Field(
        0, ge=0, le=51, description="x264 CRF of the scored mp4s (rollout and evaluation). 0 = lossless: rewards see "
        "exactly the generated frames and reruns are bit-identical (lossy x264 output differs between processes).",
    )
    shards: ShardWriterConfig = ShardWriterConfig()

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"rollout.group_size={v}: NFT needs at least 2 candidates per group (advantages are the rewards "
                "minus the group mean, so a group of 1 has advantage 0 and learns nothing); use 2 or more "
                "(the release uses 8-24)"
            )
        return v


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


PIPELINE_STAGES = (
    "filter_prompts", "arcopo_buffer", "rollout", "score", "label_uncertainty", "nft_update", "evaluate",
)


class StageResources(Frozen):
    """Per-stage override of the process layout; None = the ``resources`` value."""

    nproc_per_node: int | None = Field(None, ge=1, description="Processes per node for this stage.")
    nnodes: int | None = Field(None, ge=1, description="Nodes for this stage.")


class ResourcesConfig(Frozen):
    """How many processes run each heavy stage, and how they are launched (issue 11 point 4).

    ``gpus`` (null or one of 8, 16, 24, 48) is the GPU scale of the release's presets: when set, the per-GPU
    batch, samples per prompt, prompt groups and the process layout are derived from it
    (:mod:`astrolabe.presets`); setting one of those keys to another value is an error.
    """

    gpus: int | None = Field(
        None, description=f"GPU scale, one of {', '.join(map(str, GPU_SCALES))} or null (set the batch keys by hand)."
    )
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node of a distributed stage.")
    nnodes: int = Field(1, ge=1, description="Nodes of a distributed stage.")
    launcher: Literal["torchrun", "slurm"] = Field(
        "torchrun", description="'torchrun' (one node, or nodes started by hand) or 'slurm' (srun + torchrun)."
    )
    rdzv_endpoint: str = Field(
        "127.0.0.1:29500", pattern=r"^[^\s:]+:\d{1,5}$", description="c10d rendezvous host:port (node 0's address)."
    )
    stages: dict[str, StageResources] = Field(
        default_factory=dict, description="Per-stage overrides, e.g. {score: {nproc_per_node: 4}}."
    )

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, v: int | None) -> int | None:
        return None if v is None else check_gpus(v)

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(v) - set(PIPELINE_STAGES))
        if unknown:
            raise ValueError(f"resources.stages names unknown stages {unknown}; known: {list(PIPELINE_STAGES)}")
        return v

    @model_validator(mode="after")
    def _check_world(self) -> ResourcesConfig:
        if self.gpus is not None and self.nproc_per_node * self.nnodes != self.gpus:
            raise ValueError(
                f"resources.gpus={self.gpus} but nproc_per_node x nnodes = {self.nproc_per_node} x {self.nnodes}; "
                "leave nproc_per_node and nnodes unset (derived) or make their product equal gpus"
            )
        return self

    def for_stage(self, stage: str) -> tuple[int, int]:
        """``(nproc_per_node, nnodes)`` of ``stage``, overrides applied."""
        o = self.stages.get(stage, StageResources())
        return (o.nproc_per_node or self.nproc_per_node, o.nnodes or self.nnodes)

    def world_size(self, stage: str | None = None) -> int:
        nproc, nnodes = self.for_stage(stage) if stage is not None else (self.nproc_per_node, self.nnodes)
        return nproc * nnodes


def _apply_gpu_scale(data: Any) -> Any:
    """Fill the keys that ``resources.gpus`` derives (:func:`astrolabe.presets.derived_settings`) into raw config data.

    A key already given with another value is an error naming both (a key given with the derived value is fine:
    a dumped config reloads). Invalid or missing ``gpus`` is left to the field validator.
    """
    if not isinstance(data, dict):
        return data
    res = data.get("resources")
    gpus = res.get("gpus") if isinstance(res, dict) else getattr(res, "gpus", None)
    if not isinstance(gpus, int) or gpus not in GPU_SCALES:
        return data
    model = data.get("model")
    base = model.get("base", "tiny") if isinstance(model, dict) else getattr(model, "base", "tiny")
    out = dict(data)
    for path, value in derived_settings(gpu_scale(str(base), gpus)).items():
        section = out.get(path[0])
        section = section.model_dump(exclude_unset=True) if isinstance(section, Frozen) else dict(section or {})
        given = section.get(path[1])
        if given is not None and path[0] == "resources":
            continue  # any layout with nproc_per_node x nnodes = gpus is fine (checked by ResourcesConfig)
        if given is not None and given != value:
            raise ValueError(
                f"{'.'.join(path)}={given} conflicts with resources.gpus={gpus}, which derives {value}; "
                f"remove {'.'.join(path)} (or set resources.gpus: null to choose the batch layout yourself)"
            )
        section[path[1]] = value
        out[path[0]] = section
    return out


class RunConfig(Frozen):
    name: str = Field("tiny", pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name = run directory name.")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    sampling: SamplingConfig = SamplingConfig()
    rewards: RewardsConfig = RewardsConfig()
    eval_rewards: RewardsConfig | None = Field(None, description="Rewards reported at evaluation; None = rewards.")
    rl: RLConfig = RLConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    pipeline: PipelineConfig = PipelineConfig()
    tracking: TrackingConfig = TrackingConfig()
    arcopo: ArCoPOConfig = Field(
        ArCoPOConfig(), description="AR-CoPO settings, read when rl.algorithm is 'arcopo'; G is rollout.group_size."
    )
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="before")
    @classmethod
    def _derive_from_gpus(cls, data: Any) -> Any:
        return _apply_gpu_scale(data)

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
        if self.rl.algorithm == "arcopo" and self.rl.selective_kl is not None:
            raise ValueError("rl.algorithm 'arcopo' has no KL term to make selective: set rl.selective_kl: null")
        if self.rl.algorithm == "arcopo" and self.parallel.strategy == "fsdp":
            raise ValueError(
                "rl.algorithm 'arcopo' trains replicated LoRA adapters (DDP), not FSDP shards: set parallel.strategy "
                "to 'ddp' (several ranks) or 'none'"
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
        got_s = "" if e["type"] in ("extra_forbidden", "missing") or not e["loc"] else f" (got {got!r})"
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


EXTENDS_KEY = "extends"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, with ``extends: other.yaml`` (relative to this file) merged underneath it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (presets live in configs/, e.g. configs/tiny.yaml)")
    if p.resolve() in _chain:
        raise ConfigError(f"{p}: 'extends' loops back to a file already being read: {[str(c) for c in _chain]}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must contain a mapping of config sections at the top level")
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{p}: '{EXTENDS_KEY}' must be one path (relative to the file), got {parent!r}")
    return deep_merge(read_config_file(p.parent / parent, (*_chain, p.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None = all defaults = the tiny CPU run) and apply ``key=value`` overrides.

    A file may start from another with ``extends: relative/path.yaml`` (deep merge, see :func:`deep_merge`).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_config_file(path)
        source = str(path)
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

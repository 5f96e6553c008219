"""LoRA on the Wan DiT through peft: config, application, adapter tensors, PEFT-format save and load.

Targets (reference 3.6, models-reference 6): every ``nn.Linear`` inside the DiT blocks, i.e. per block
``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``ffn.0`` and ``ffn.2`` (10 modules per block; the
LongLive LoRA layout). Patch/text/time embeddings, the head, norms and modulation tables are not adapted.

An adapted linear computes ``y = W x + b + (alpha / r) * B (A x)`` with ``A`` (r, in) and ``B`` (out, r).
``B`` starts at zero, so a fresh adapter is the identity (the model equals the base model).

Choice of peft entry point: :func:`apply_lora` uses ``peft.get_peft_model`` (not ``inject_adapter_in_model``)
because the :class:`peft.PeftModel` wrapper gives, for free, several named adapters on one model
(``add_adapter`` / ``set_adapter``), the ``disable_adapter()`` context (the base model as KL reference) and
the standard on-disk format that ``PeftModel.from_pretrained(WanDiT(...), dir)`` reads. With no task type,
``PeftModel.forward(*args, **kwargs)`` calls the wrapped :class:`WanDiT` with the same arguments, so
``causal=``, ``kv_cache=``, ``start_frame=``, ``cache_write=`` and ``frame_positions=`` pass through. The
inner model stays reachable as ``peft_model.get_base_model()``. Setting attributes on the wrapper does
*not* reach the inner model (the bug of reference 10.2): set them on ``get_base_model()``.

Adapter tensors use PEFT's canonical keys, without the adapter name:
``base_model.model.blocks.{i}.self_attn.q.lora_A.weight`` (the ``.default`` infix of the parameter name is
dropped), exactly the keys of ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from safetensors import safe_open
from safetensors.torch import save_file

from astrolabe._compat import install_torchvision_guard
from astrolabe.configbase import Frozen

if TYPE_CHECKING:  # peft (and transformers behind it) takes seconds to import: only where LoRA is applied
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
CHECKPOINT_LORA_DIR = "lora"  # a training checkpoint keeps its trained adapter here

# Every nn.Linear inside a DiT block (peft matches a string target with re.fullmatch on the module name).
DEFAULT_TARGET_MODULES = r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PARAM_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


class LoraMismatchError(ValueError):
    """An adapter on disk does not fit the LoRA configuration or the model it is loaded into."""


class LoRAConfig(Frozen):
    """LoRA adapter of the DiT blocks (release: r = alpha = 256, dropout 0; scale alpha / r = 1)."""

    rank: int = Field(256, ge=1, description="LoRA rank r.")
    alpha: float = Field(256.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (release: 0).")
    target_modules: str | tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES,
        description="Regex fully matching module names (peft semantics), or a list of module-name suffixes.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the LoRA weights; the release trains bf16 LoRA weights (reference 3.6)."
    )
    init: Literal["default", "gaussian"] = Field(
        "default", description="A init: 'default' = kaiming-uniform (bound 1/sqrt(in)), 'gaussian' = N(0, 1/r^2); B = 0."
    )

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"target_modules {v!r} is not a valid regex ({e}); fix the pattern") from None
            return v
        if not v:
            raise ValueError("target_modules is empty: give a regex or at least one module name")
        return tuple(sorted(set(v)))

    @property
    def scaling(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def peft_lora_config(cfg: LoRAConfig) -> LoraConfig:
    """The peft ``LoraConfig`` of ``cfg`` (no task type, no bias, plain LoRA)."""
    install_torchvision_guard()
    from peft import LoraConfig
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type=None,
        init_lora_weights=True if cfg.init == "default" else "gaussian",
    )


@contextmanager
def _global_rng_untouched() -> Iterator[None]:
    """peft initialises new LoRA layers from the global RNG; keep the caller's global streams unchanged."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


# ----------------------------------------------------------------------------------- adapter tensors


def adapter_names(model: PeftModel) -> list[str]:
    """Names of the adapters held by ``model``."""
    return list(model.peft_config)


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict) name is a LoRA tensor of some adapter (``...lora_A.<adapter>.weight``)."""
    return _PARAM_RE.match(name) is not None


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of one adapter, by canonical PEFT key (adapter name removed), in module order."""
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        m = _PARAM_RE.match(name)
        if m and m["adapter"] == adapter_name:
            out[f"{m['module']}.{m['part']}.weight"] = p
    if not out:
        known = sorted({m["adapter"] for n, _ in model.named_parameters() if (m := _PARAM_RE.match(n))})
        raise KeyError(f"model has no LoRA adapter {adapter_name!r}; adapters present: {known}")
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` (FSDP2) is all-gathered (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies of one adapter's tensors (canonical keys), ready for safetensors.

    Sharded (FSDP2) parameters are gathered whole: every rank must call it, in the same order.
    """
    return {k: full_tensor(p.detach()).to("cpu", copy=True).contiguous()
            for k, p in adapter_parameters(model, adapter_name).items()}


def check_same_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict key and shape equality; the error lists the first differences."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise LoraMismatchError(
            f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}); the adapter was made for other target modules or another model size"
        )
    bad = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items() if given[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise LoraMismatchError(
            f"{what}: {len(bad)} tensors have the wrong shape, e.g. {k}: {got} instead of {want}; "
            "the LoRA rank or the model size differs"
        )


@torch.no_grad()
def copy_into_adapter_(model: nn.Module, adapter_name: str, state: Mapping[str, torch.Tensor], what: str = "") -> None:
    """Strictly copy ``state`` (canonical keys) into the adapter's parameters (cast to their dtype/device)."""
    params = adapter_parameters(model, adapter_name)
    check_same_keys(params, state, what or f"adapter {adapter_name!r}")
    for k, p in params.items():
        p.copy_(state[k].to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def copy_adapter_(model: nn.Module, source: str, target: str) -> None:
    """``target <- source`` tensor by tensor (same canonical keys)."""
    src, dst = adapter_parameters(model, source), adapter_parameters(model, target)
    check_same_keys(dst, src, f"copy adapter {source!r} -> {target!r}")
    for k, p in dst.items():
        p.copy_(src[k].to(dtype=p.dtype))


@torch.no_grad()
def init_adapter_(model: nn.Module, adapter_name: str, init: str, rank: int, generator: torch.Generator) -> None:
    """Re-initialise an adapter from an explicit generator, with peft's distributions.

    default:  A ~ U(-1/sqrt(in), 1/sqrt(in))   (kaiming_uniform with a = sqrt(5))
    gaussian: A ~ N(0, (1/r)^2)
    B = 0 in both cases, so the adapter is the identity.
    """
    for key, p in adapter_parameters(model, adapter_name).items():
        if key.endswith("lora_B.weight"):
            p.zero_()
            continue
        shape = p.shape  # (r, in)
        if init == "default":
            bound = 1.0 / math.sqrt(shape[1])
            a = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        elif init == "gaussian":
            a = torch.randn(shape, generator=generator, dtype=torch.float32) / rank
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'default' or 'gaussian'")
        p.copy_(a.to(device=p.device, dtype=p.dtype))


def _cast_adapter_(model: nn.Module, adapter_name: str, dtype: torch.dtype) -> None:
    for p in adapter_parameters(model, adapter_name).values():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def _check_targets_are_linear(model: PeftModel, adapter_name: str) -> int:
    """Every adapted module wraps an ``nn.Linear``; returns how many modules were adapted."""
    modules = {k.rsplit(".lora_", 1)[0] for k in adapter_parameters(model, adapter_name)}
    named = dict(model.named_modules())
    for name in modules:
        base = named[name].get_base_layer()
        if not isinstance(base, nn.Linear):
            raise LoraMismatchError(f"target module {name} is a {type(base).__name__}, not nn.Linear; fix target_modules")
    return len(modules)


# ----------------------------------------------------------------------------------- application


def apply_lora(
    model: nn.Module,
    cfg: LoRAConfig,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
) -> PeftModel:
    """Wrap ``model`` (a :class:`WanDiT`, modified in place) in a ``PeftModel`` with one LoRA adapter.

    Only that adapter's LoRA weights require grad; the base weights are frozen. LoRA weights are cast to
    ``cfg.dtype``. With ``generator`` the A matrices are drawn from it (:func:`init_adapter_`); with None
    they keep peft's init (meant for adapters whose weights are loaded right after). Either way the
    caller's global RNG state is left unchanged.
    """
    install_torchvision_guard()
    from peft import get_peft_model

    with _global_rng_untouched():
        peft_model = get_peft_model(model, peft_lora_config(cfg), adapter_name=adapter_name)
    _finish_adapter(peft_model, cfg, adapter_name, generator)
    return peft_model


def add_lora_adapter(
    peft_model: PeftModel, cfg: LoRAConfig, adapter_name: str, generator: torch.Generator | None = None
) -> None:
    """Add another adapter with the same layout to an existing ``PeftModel`` (frozen; the active adapter
    is unchanged)."""
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
    active = peft_model.active_adapter
    with _global_rng_untouched():
        peft_model.add_adapter(adapter_name, peft_lora_config(cfg))
    peft_model.set_adapter(active)
    _finish_adapter(peft_model, cfg, adapter_name, generator)
    for p in adapter_parameters(peft_model, adapter_name).values():
        p.requires_grad_(False)


def _finish_adapter(peft_model: PeftModel, cfg: LoRAConfig, adapter_name: str, generator: torch.Generator | None) -> None:
    _cast_adapter_(peft_model, adapter_name, cfg.torch_dtype)
    if generator is not None:
        init_adapter_(peft_model, adapter_name, cfg.init, cfg.rank, generator)
    n_modules = _check_targets_are_linear(peft_model, adapter_name)
    n_params = sum(p.numel() for p in adapter_parameters(peft_model, adapter_name).values())
    logger.info(
        "LoRA adapter %r: %d modules, %d parameters, r=%d alpha=%g %s",
        adapter_name, n_modules, n_params, cfg.rank, cfg.alpha, cfg.dtype,
    )


# ----------------------------------------------------------------------------------- save / load


def save_adapter(model: PeftModel, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write one adapter in standard PEFT format: ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``PeftModel.from_pretrained(WanDiT(cfg), out_dir)`` loads it (under the name ``default``).
    """
    return write_adapter(adapter_state_dict(model, adapter_name), model.peft_config[adapter_name], out_dir)


def write_adapter(tensors: Mapping[str, torch.Tensor], peft_config: LoraConfig, out_dir: str | Path) -> Path:
    """Write adapter ``tensors`` (canonical keys, CPU) and their peft config in standard PEFT format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config.save_pretrained(str(out))
    return out


def resolve_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter directory, given either that directory or a checkpoint directory holding ``lora/``."""
    p = Path(path)
    for cand in (p, p / CHECKPOINT_LORA_DIR):
        if (cand / ADAPTER_CONFIG_NAME).is_file() and (cand / ADAPTER_WEIGHTS_NAME).is_file():
            return cand
    raise FileNotFoundError(
        f"no LoRA adapter at {p}: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} in {p} or in "
        f"{p / CHECKPOINT_LORA_DIR} (a training checkpoint); pass an adapter or checkpoint directory"
    )


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (canonical keys; a ``.default`` infix is removed)."""
    d = resolve_adapter_dir(path)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(d / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            out[key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = f.get_tensor(key)
    return out


def read_lora_config(path: str | Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT adapter directory (dtype from the stored tensors)."""
    d = resolve_adapter_dir(path)
    raw = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraMismatchError(f"{d} holds a {raw.get('peft_type')} adapter, not LoRA")
    for flag in ("use_dora", "use_rslora"):
        if raw.get(flag):
            raise LoraMismatchError(f"{d}: {flag}=true is not supported; use a plain LoRA adapter")
    targets = raw["target_modules"]
    with safe_open(str(d / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    dtype_names = {"F32": "float32", "BF16": "bfloat16"}
    if len(dtypes) != 1 or next(iter(dtypes)) not in dtype_names:
        raise LoraMismatchError(f"{d}: adapter tensors have dtypes {sorted(dtypes)}; expected all F32 or all BF16")
    return LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        dtype=dtype_names[next(iter(dtypes))],
    )


def check_lora_compatible(expected: LoRAConfig, found: LoRAConfig, where: str) -> None:
    """Rank, alpha and target modules must agree (they define the function the adapter computes)."""
    diffs = [
        f"{name}: {getattr(found, name)!r} on disk vs {getattr(expected, name)!r} configured"
        for name in ("rank", "alpha", "target_modules")
        if getattr(found, name) != getattr(expected, name)
    ]
    if diffs:
        raise LoraMismatchError(f"LoRA adapter at {where} does not match the LoRA config ({'; '.join(diffs)}); "
                                "set the LoRA config to the adapter's values or use a matching adapter")


def lora_config_of(model: PeftModel, adapter_name: str = "default") -> LoRAConfig:
    """The :class:`LoRAConfig` (rank, alpha, dropout, targets) of an adapter held by ``model``."""
    if adapter_name not in model.peft_config:
        raise KeyError(f"model has no adapter {adapter_name!r}; adapters present: {list(model.peft_config)}")
    cfg = model.peft_config[adapter_name]
    targets = cfg.target_modules
    return LoRAConfig(rank=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else tuple(targets))


def load_adapter(model: PeftModel, path: str | Path, adapter_name: str = "default") -> Path:
    """Strictly load a PEFT adapter directory (or a checkpoint's ``lora/``) into an existing adapter."""
    d = resolve_adapter_dir(path)
    check_lora_compatible(lora_config_of(model, adapter_name), read_lora_config(d), str(d))
    copy_into_adapter_(model, adapter_name, read_adapter_tensors(d), what=f"adapter {d}")
    logger.info("loaded LoRA adapter %s into %r", d, adapter_name)
    return d


def load_lora_model(base: nn.Module, path: str | Path, adapter_name: str = "default") -> PeftModel:
    """``base`` (a WanDiT with its base weights loaded) wrapped with the adapter stored at ``path``.

    ``path`` is a PEFT adapter directory or a training checkpoint directory containing ``lora/``.
    Unlike ``PeftModel.from_pretrained`` every key and shape is checked (no silent partial load).
    """
    cfg = read_lora_config(path)
    model = apply_lora(base, cfg, adapter_name=adapter_name)
    load_adapter(model, path, adapter_name)
    return model

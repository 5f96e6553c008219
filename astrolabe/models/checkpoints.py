"""Checkpoint adapters: every released Wan2.1-family DiT file -> a plain Wan-named state dict.

One explicit adapter per format (``shared/reference/models-reference.md`` section 6); nothing is
guessed from the file's contents: the caller names the format and, for pickled dicts, the entry.

| format              | file(s)                                            | entry (default)                   |
|---------------------|----------------------------------------------------|-----------------------------------|
| ``wan21_safetensors`` | ``diffusion_pytorch_model.safetensors`` or shards + ``...safetensors.index.json`` | flat |
| ``self_forcing_pt`` | ``checkpoints/self_forcing_dmd.pt``                  | ``generator_ema``                 |
| ``longlive_pt``     | ``models/longlive_base.pt`` + ``models/lora.pt``     | ``generator`` + LoRA ``auto`` (below) |
| ``causal_forcing_pt`` | ``chunkwise/causal_forcing.pt``, ``framewise/...``  | caller: ``generator`` / ``generator_ema`` |
| ``krea_safetensors`` | ``krea-realtime-video-14b.safetensors``             | flat                              |

Key normalisation rule (applied by every adapter, :func:`normalize_wan_key`), in this order:

1. remove every ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` and ``_orig_mod.`` segment;
2. remove one leading ``module.`` (DDP);
3. remove one leading ``model.`` (``WanDiffusionWrapper.model``).

``freqs`` (a RoPE table some forks keep as an attribute) is dropped by :data:`IGNORED_KEYS`; any
other difference from the model's keys is a :class:`CheckpointMismatchError` (every missing key listed).

LongLive's ``lora.pt`` (PEFT LoRA, merged into the base) is read by :mod:`astrolabe.models.peft_lora`.

Causal Forcing EMA weights may lack keys: upstream (thu-ml/Causal-Forcing ``inference.py``) retries the
load with ``strict=False`` over ``CausalWanModel.from_pretrained("wan_models/Wan2.1-T2V-1.3B/")``, so any
missing tensor silently keeps the Wan2.1 base value. Here a missing key is an error that lists them all;
:func:`fill_missing_keys` fills them from the base DiT only when the caller asks
(``model.fill_missing_from_base``), and logs every filled name.

Pickles are read with ``torch.load(weights_only=True)`` only (:func:`safe_torch_load`, with a named
allow-list of numpy scalars); a file holding other objects is an error, never unpickled unsafely.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from astrolabe.models.wan.config import BUILDERS

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
CheckpointFormat = Literal[
    "wan21_safetensors", "self_forcing_pt", "longlive_pt", "causal_forcing_pt", "krea_safetensors"
]
CHECKPOINT_FORMATS: tuple[str, ...] = get_args(CheckpointFormat)

WRAPPER_SEGMENTS: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES: tuple[str, ...] = ("module.", "model.")  # stripped once each, in this order
IGNORED_KEYS: frozenset[str] = frozenset({"freqs"})
WAN_SINGLE_FILE = "diffusion_pytorch_model.safetensors"
WAN_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"

# Where users get each format (HF repo: file). Shown in every "file not found" error.
FORMAT_SOURCES: dict[str, str] = {
    "wan21_safetensors": f"`{WAN_SINGLE_FILE}` from HF `Wan-AI/Wan2.1-T2V-1.3B`, or the shards + "
    f"`{WAN_INDEX_FILE}` from HF `Wan-AI/Wan2.1-T2V-14B`",
    "self_forcing_pt": "`checkpoints/self_forcing_dmd.pt` from HF `gdhe17/Self-Forcing`",
    "longlive_pt": "`models/longlive_base.pt` and `models/lora.pt` from HF `Efficient-Large-Model/LongLive-1.3B`",
    "causal_forcing_pt": "`chunkwise/causal_forcing.pt` or `framewise/causal_forcing.pt` (or "
    "`causal-forcing++/framewise-2step.pt` / `framewise-1step.pt`) from HF `zhuhz22/Causal-Forcing`",
    "krea_safetensors": "`krea-realtime-video-14b.safetensors` from HF `krea/krea-realtime-video`",
}
MAX_LISTED = 8
_MAX_MISSING_LISTED = 128  # missing keys are listed in full up to this many (a wrong file lacks all 825)
LORA_ENTRY_AUTO = "auto"


# ------------------------------------------------------------------------------------------------ errors


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or directory is missing."""


class CheckpointReadError(CheckpointError):
    """A file exists but cannot be read (truncated download, wrong format, non-tensor pickle, bad entry)."""


class CheckpointMismatchError(CheckpointError):
    """The state dict's keys or shapes do not match the model."""


class NonFiniteWeightsError(CheckpointError):
    """The state dict holds NaN or inf values."""


def _source(fmt: str) -> str:
    """Where a file comes from: the known format's source, or ``fmt`` itself (a free-form source, e.g. a reward's)."""
    return FORMAT_SOURCES.get(fmt, fmt)


def _not_found(path: Path, fmt: str, what: str) -> CheckpointNotFoundError:
    expects = f"Format {fmt!r} expects {FORMAT_SOURCES[fmt]}" if fmt in FORMAT_SOURCES else f"Source: {fmt}"
    return CheckpointNotFoundError(f"{what} {path} not found. {expects}.")


def _require_file(path: Path, fmt: str, what: str = "checkpoint file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, fmt, what)
    return path


# ------------------------------------------------------------------------------------------------ readers


# Non-tensor globals a training pickle may legitimately hold, allowed by name under ``weights_only=True``:
# numpy scalars and dtypes (metrics or steps a trainer stored as numpy values; numpy 1 and numpy 2 module
# paths). Plain containers, ints, floats, strings, tensors and ``nn.Parameter`` need no entry. No released
# file is documented to hold these (models-reference 6); anything else is refused, never unpickled unsafely.
def _numpy_safe_globals() -> list[object]:
    import numpy as np

    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    dtypes = sorted({type(np.dtype(t)) for t in ("bool", "int32", "int64", "float16", "float32", "float64")}, key=str)
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


def safe_torch_load(path: Path, source: str) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with the numpy allow-list, memory-mapped when
    the file allows it. ``source`` says where to re-download the file (shown in the error).

    Raises:
        CheckpointReadError: truncated/corrupt file, or a global outside the allow-list (named in the message).
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped: read them whole
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointReadError(
            f"could not read {path} with torch.load(weights_only=True): {err}. The file is truncated/corrupt or "
            f"holds objects other than tensors, containers and numpy scalars; re-download {source}."
        ) from err


def torch_load_tensors(path: Path, fmt: str) -> object:
    """:func:`safe_torch_load` of a checkpoint file of format ``fmt`` (missing file: a not-found error)."""
    return safe_torch_load(_require_file(path, fmt), _source(fmt))


def read_safetensors(path: Path, fmt: str) -> StateDict:
    """All tensors of one ``.safetensors`` file (CPU)."""
    path = _require_file(path, fmt)
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as err:
        raise CheckpointReadError(
            f"could not read {path} as safetensors: {err}. Truncated or corrupt? Re-download {_source(fmt)}."
        ) from err


def select_entry(obj: object, entry: str | None, path: Path) -> StateDict:
    """The tensor dict at ``obj[entry]`` (``entry=None``: ``obj`` itself); every value must be a tensor."""
    if entry is not None:
        if not isinstance(obj, Mapping) or entry not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointReadError(f"{path} has no entry {entry!r}; its top-level entries are {keys}")
        obj = obj[entry]
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path} entry {entry!r} is a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        hint = "" if entry is not None else " (did you forget to name the entry, e.g. 'generator'?)"
        raise CheckpointReadError(f"{path} entry {entry!r}: non-tensor values under {bad[:MAX_LISTED]}{hint}")
    return dict(obj)


def normalize_wan_key(key: str) -> str:
    """Apply the wrapper-stripping rule of the module docstring to one key."""
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    for prefix in LEADING_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def normalize_wan_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """:func:`normalize_wan_key` on every key; two raw keys landing on one name is an error."""
    out: StateDict = {}
    origin: dict[str, str] = {}
    for raw, tensor in sd.items():
        key = normalize_wan_key(raw)
        if key in out:
            raise CheckpointReadError(f"keys {origin[key]!r} and {raw!r} both normalise to {key!r}")
        out[key], origin[key] = tensor, raw
    return out


# ------------------------------------------------------------------------------------------------ adapters


def read_wan_base(path: Path) -> StateDict:
    """Wan2.1 base DiT: a directory with ``diffusion_pytorch_model.safetensors`` or shards + index json,
    or the single file / index json itself. Keys are the plain Wan names."""
    fmt = "wan21_safetensors"
    path = Path(path)
    if path.is_dir():
        if (path / WAN_INDEX_FILE).is_file():
            return normalize_wan_keys(read_sharded_safetensors(path / WAN_INDEX_FILE, fmt))
        if (path / WAN_SINGLE_FILE).is_file():
            return normalize_wan_keys(read_safetensors(path / WAN_SINGLE_FILE, fmt))
        raise _not_found(path / WAN_SINGLE_FILE, fmt, f"neither {WAN_SINGLE_FILE} nor {WAN_INDEX_FILE} in")
    if path.name.endswith(".index.json"):
        return normalize_wan_keys(read_sharded_safetensors(path, fmt))
    return normalize_wan_keys(read_safetensors(path, fmt))


def read_sharded_safetensors(index_path: Path, fmt: str) -> StateDict:
    """Shards listed by an HF index json (``{"weight_map": {key: shard file}}``); each shard must hold
    exactly the keys the index assigns to it. ``fmt``: a checkpoint format, or a free-form source for errors."""
    index_path = _require_file(index_path, fmt, "index file")
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointReadError(f"{index_path} is not an index json with a 'weight_map': {err}") from err
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(_require_file(index_path.parent / shard, fmt, "shard"), fmt)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            diff = sorted(set(tensors) ^ listed)[:MAX_LISTED]
            raise CheckpointReadError(f"shard {shard} does not hold the keys {index_path.name} lists for it: {diff}")
        out.update(tensors)
    return out


def read_generator_pt(path: Path, entry: str | None, fmt: str) -> StateDict:
    """A SF-family ``.pt`` dict: take ``entry`` (e.g. ``generator`` / ``generator_ema``), normalise keys."""
    return normalize_wan_keys(select_entry(torch_load_tensors(path, fmt), entry, Path(path)))


def read_self_forcing(path: Path, entry: str = "generator_ema") -> StateDict:
    """Self-Forcing ``self_forcing_dmd.pt``; default ``generator_ema`` (what the authors' inference loads)."""
    return read_generator_pt(path, entry, "self_forcing_pt")


def read_causal_forcing(path: Path, *, entry: str) -> StateDict:
    """Causal Forcing ``.pt``: the authors load ``generator`` for chunk-wise, ``generator_ema`` for
    frame-wise / CF++ (EMA keys may carry ``_fsdp_wrapped_module.``); no default, the caller names it."""
    return read_generator_pt(path, entry, "causal_forcing_pt")


def read_krea(path: Path) -> StateDict:
    """Krea Realtime 14B: one flat safetensors, keys ``model.`` + the 1095 Wan 14B names."""
    return normalize_wan_keys(read_safetensors(path, "krea_safetensors"))


def read_longlive(
    path: Path,
    lora_path: Path | None,
    *,
    entry: str = "generator",
    lora_entry: str | None = LORA_ENTRY_AUTO,
    lora_rank: int = 256,
    lora_alpha: float = 256.0,
) -> StateDict:
    """LongLive 1.0: ``longlive_base.pt`` (entry ``generator``) merged with the PEFT ``lora.pt``.

    ``lora_path=None`` returns the base alone (which is *not* the model LongLive serves).
    """
    base = read_generator_pt(path, entry, "longlive_pt")
    if lora_path is None:
        logger.warning("LongLive loaded WITHOUT its LoRA (%s): this is the stage-1 base, not the released model", path)
        return base
    from astrolabe.models.peft_lora import merge_lora, read_peft_lora  # here: that module imports this one

    lora = read_peft_lora(lora_path, entry=lora_entry, rank=lora_rank)
    return merge_lora(base, lora, alpha=lora_alpha)


# --------------------------------------------------------------------------------------------- dispatch


def read_dit_checkpoint(
    fmt: CheckpointFormat,
    path: Path,
    *,
    entry: str | None = None,
    lora_path: Path | None = None,
    lora_entry: str | None = LORA_ENTRY_AUTO,
    lora_rank: int = 256,
    lora_alpha: float = 256.0,
) -> StateDict:
    """Read a DiT checkpoint of format ``fmt`` into a Wan-named state dict.

    ``entry`` is required for the ``.pt`` formats (the registry holds each model's default); the
    safetensors formats are flat and take no entry. ``lora_*`` only apply to ``longlive_pt``.
    """
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {list(CHECKPOINT_FORMATS)}")
    flat = fmt in ("wan21_safetensors", "krea_safetensors")
    if flat and entry is not None:
        raise ValueError(f"format {fmt!r} is a flat safetensors file: do not pass entry={entry!r}")
    if not flat and entry is None:
        raise ValueError(f"format {fmt!r} is a dict of state dicts: name the entry (e.g. 'generator_ema')")
    if lora_path is not None and fmt != "longlive_pt":
        raise ValueError(f"lora_path is only used by format 'longlive_pt', not {fmt!r}")
    if fmt == "wan21_safetensors":
        return read_wan_base(path)
    if fmt == "krea_safetensors":
        return read_krea(path)
    if fmt == "longlive_pt":
        return read_longlive(
            path, lora_path, entry=entry, lora_entry=lora_entry, lora_rank=lora_rank, lora_alpha=lora_alpha
        )
    return read_generator_pt(path, entry, fmt)


# ------------------------------------------------------------------------------------------------ loading


def infer_wan_size(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the DiT size of a state dict: width from ``blocks.0.self_attn.k.weight`` rows, depth from
    the highest block index; names the matching size builder if any."""
    k = sd.get("blocks.0.self_attn.k.weight")
    if k is None:
        return None
    dim = k.shape[0]
    idx = [int(m.group(1)) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key))]
    layers = max(idx) + 1
    names = [n for n, b in BUILDERS.items() if (c := b()).dim == dim and c.num_layers == layers]
    label = {"wan21_t2v_1_3b": "the 1.3B model", "wan21_t2v_14b": "the 14B model"}
    what = f"this looks like {label.get(names[0], names[0])} ({names[0]})" if names else "no known size builder"
    return f"the checkpoint has dim {dim} and {layers} blocks: {what}"


def _mismatch_hints(sd: Mapping[str, torch.Tensor], missing: list[str]) -> list[str]:
    hints = []
    if missing and len(missing) <= _MAX_MISSING_LISTED:
        hints.append(
            "a few keys are missing: Causal Forcing EMA files may lack some (upstream loads them non-strictly, "
            "keeping the Wan2.1 base values); set model.fill_missing_from_base=true to fill them from the base DiT "
            "explicitly"
        )
    if any("lora_" in k for k in sd):
        hints.append("it holds LoRA keys: read it with read_peft_lora and merge_lora")
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in sd):
        hints.append("it uses diffusers names (attn1/attn2/condition_embedder); use the original Wan2.1 repo files")
    return hints


def check_state_against_model(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointMismatchError` listing the first missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shaped):
        return
    lines = [
        f"checkpoint does not match the model ({len(expected)} tensors expected, {len(sd)} given)",
        f"missing {len(missing)}: {missing[:_MAX_MISSING_LISTED]}",
        f"unexpected {len(unexpected)}: {unexpected[:MAX_LISTED]}",
        f"mis-shaped {len(shaped)}: {shaped[:MAX_LISTED]}",
    ]
    size = infer_wan_size(sd)
    if size is not None:
        cfg = getattr(model, "config", None)
        built = f" (the model was built with dim {cfg.dim} and {cfg.num_layers} blocks)" if cfg is not None else ""
        lines.append(size + built)
    lines += _mismatch_hints(sd, missing)
    raise CheckpointMismatchError("\n  ".join(lines))


def fill_missing_keys(sd: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], what: str) -> StateDict:
    """``sd`` completed with the tensors of ``base`` it lacks (keys in :data:`IGNORED_KEYS` aside); every filled
    key is logged. This is the explicit form of upstream's ``strict=False`` load over the base model."""
    missing = sorted(k for k in base if k not in sd and k not in IGNORED_KEYS)
    if missing:
        logger.warning("%s: filling %d missing tensors from the base DiT: %s", what, len(missing), missing)
    else:
        logger.info("%s: no tensor missing; fill_missing_from_base changed nothing", what)
    return {**dict(sd), **{k: base[k] for k in missing}}


def check_finite(sd: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the tensors that hold NaN or inf."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"{len(bad)} tensors hold NaN/inf: {bad[:MAX_LISTED]}. The file is corrupt or the run diverged."
        )


def load_dit_state(model: nn.Module, sd: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Validate and load a Wan-named state dict into ``model`` (strict).

    Drops :data:`IGNORED_KEYS`, checks names and shapes (:func:`check_state_against_model`) and finiteness
    (:func:`check_finite`), then ``model.load_state_dict(sd, strict=True, assign=assign)``. With ``assign=True``
    (model built on the meta device) the model takes the checkpoint's tensors and dtype as they are.
    """
    ignored = [k for k in sd if k in IGNORED_KEYS]
    if ignored:
        logger.info("ignoring non-parameter keys %s", ignored)
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    check_state_against_model(model, sd)
    check_finite(sd)
    model.load_state_dict(sd, strict=True, assign=assign)

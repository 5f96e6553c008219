"""PEFT LoRA files of Wan DiTs: parse, merge into a state dict, or convert for a PEFT-wrapped ``WanDiT``.

LongLive's ``lora.pt`` is either the trainer's dict (``{"generator_lora": ..., "critic_lora": ..., "step": ...}``)
or a bare PEFT adapter state dict; ``lora_entry="auto"`` takes ``generator_lora`` when present, else the
bare dict when every value is a tensor, else fails listing the top-level entries (override: name the entry,
or ``None`` for a bare adapter).

Merging is ``W <- W + (alpha / r) B A`` in fp32 (:func:`merge_lora`); LongLive's release has r = alpha = 256.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from astrolabe.models.checkpoints import (
    MAX_LISTED,
    LORA_ENTRY_AUTO,
    WRAPPER_SEGMENTS,
    CheckpointMismatchError,
    CheckpointReadError,
    StateDict,
    select_entry,
    torch_load_tensors,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraPair:
    """One adapted Linear: ``A`` (r, in_features), ``B`` (out_features, r)."""

    A: torch.Tensor
    B: torch.Tensor


# `base_model.model.` (PEFT wrapper, optional) + module + `.lora_A|B` + optional adapter name + `.weight`.
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?"
    r"(?P<module>blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02]))"
    r"\.lora_(?P<which>[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$"
)


def parse_peft_lora(sd: Mapping[str, torch.Tensor], rank: int) -> dict[str, LoraPair]:
    """PEFT LoRA keys -> ``{wan module name: LoraPair}``.

    Accepted key form (after removing wrapper segments): ``[base_model.model.]blocks.{i}.{self_attn|cross_attn}.
    {q|k|v|o}.lora_{A|B}[.<adapter>].weight`` and ``...ffn.{0|2}.lora_{A|B}...``. Any other key, a module with
    only A or only B, more than one adapter name, or a rank other than ``rank`` is an error.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str | None] = set()
    unknown = []
    for raw, tensor in sd.items():
        key = raw
        for segment in WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        m = _LORA_KEY.match(key)
        if m is None:
            unknown.append(raw)
            continue
        adapters.add(m.group("adapter"))
        parts.setdefault(m.group("module"), {})[m.group("which")] = tensor
    if unknown:
        raise CheckpointReadError(f"{len(unknown)} keys are not PEFT LoRA keys of Wan blocks: {unknown[:MAX_LISTED]}")
    if len(adapters) > 1:
        raise CheckpointReadError(f"LoRA file mixes adapter names {sorted(map(str, adapters))}; expected one")
    out: dict[str, LoraPair] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointReadError(f"LoRA module {module} has only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointReadError(
                f"LoRA {module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not have rank {rank} "
                "(A must be (r, in), B (out, r)); pass the right lora_rank"
            )
        out[module] = LoraPair(A=a, B=b)
    return out


def resolve_lora_entry(obj: object, path: Path) -> str | None:
    """``"auto"`` for a LongLive LoRA file: ``generator_lora`` if present, ``None`` (bare adapter) if every
    top-level value is a tensor; otherwise :class:`CheckpointReadError` listing the top-level entries."""
    if isinstance(obj, Mapping):
        if "generator_lora" in obj:
            return "generator_lora"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return None
    keys = sorted(map(str, obj))[:MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointReadError(
        f"{path}: cannot tell where the LoRA is (no 'generator_lora' entry, not a bare adapter of tensors); "
        f"top-level entries: {keys}. Name the entry (model.lora_entry) or pass a bare PEFT adapter file."
    )


def read_peft_lora(path: Path, *, entry: str | None = LORA_ENTRY_AUTO, rank: int = 256) -> dict[str, LoraPair]:
    """LongLive ``lora.pt``: the PEFT state at ``entry`` (``generator_lora``), the bare PEFT dict (``None``), or
    whichever of the two the file is (``"auto"``, :func:`resolve_lora_entry`)."""
    obj = torch_load_tensors(path, "longlive_pt")
    if entry == LORA_ENTRY_AUTO:
        entry = resolve_lora_entry(obj, Path(path))
        logger.info("LongLive LoRA %s: %s", path, f"entry {entry!r}" if entry else "bare adapter")
    return parse_peft_lora(select_entry(obj, entry, Path(path)), rank)


def merge_lora(sd: Mapping[str, torch.Tensor], lora: Mapping[str, LoraPair], alpha: float) -> StateDict:
    """``W <- W + (alpha / r) * B @ A`` for every adapted Linear, accumulated in fp32, cast back to W's dtype.

    Biases and every other tensor are returned unchanged (same objects). LongLive: r = alpha = 256 -> scale 1.
    """
    out = dict(sd)
    for module, pair in lora.items():
        key = f"{module}.weight"
        if key not in out:
            raise CheckpointMismatchError(f"LoRA adapts {module} but the base state dict has no {key}")
        w = out[key]  # (out, in)
        r = pair.A.shape[0]
        if w.shape != (pair.B.shape[0], pair.A.shape[1]):
            raise CheckpointMismatchError(
                f"LoRA {module}: B @ A is {(pair.B.shape[0], pair.A.shape[1])} but {key} is {tuple(w.shape)}"
            )
        delta = (alpha / r) * (pair.B.float() @ pair.A.float())  # (out, in)
        out[key] = (w.float() + delta).to(w.dtype)
    return out


def lora_to_peft_state(lora: Mapping[str, LoraPair]) -> StateDict:
    """``{module: LoraPair}`` -> the dict ``peft.set_peft_model_state_dict`` takes for a PEFT-wrapped ``WanDiT``
    (``base_model.model.<module>.lora_{A|B}.weight``), to keep the LoRA separate instead of merging."""
    out: StateDict = {}
    for module, pair in lora.items():
        out[f"base_model.model.{module}.lora_A.weight"] = pair.A
        out[f"base_model.model.{module}.lora_B.weight"] = pair.B
    return out

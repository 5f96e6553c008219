"""Capture and restore every random stream of a run (torch CPU/CUDA, numpy, python, named generators)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A training checkpoint is missing a piece or does not match the run that loads it."""


def capture_rng(generators: Mapping[str, torch.Generator | np.random.Generator]) -> dict[str, Any]:
    """Snapshot of every random stream: torch CPU, CUDA (all devices), numpy global, python, named ones."""
    np_state = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "torch_generators": {k: g.get_state() for k, g in generators.items() if isinstance(g, torch.Generator)},
        "numpy_generators": {
            k: json.dumps(g.bit_generator.state) for k, g in generators.items() if isinstance(g, np.random.Generator)
        },
    }


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator | np.random.Generator]) -> None:
    """Inverse of :func:`capture_rng`. The registered generator names must equal the saved ones."""
    saved = set(state["torch_generators"]) | set(state["numpy_generators"])
    if saved != set(generators):
        raise CheckpointError(
            f"rng.pt holds generators {sorted(saved)} but {sorted(generators)} are registered; register exactly "
            "the generators of the saved run (TrainingState.register_generator) before load()"
        )
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        else:
            logger.warning("checkpoint holds CUDA RNG states but CUDA is unavailable; they are not restored")
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    for k, g in generators.items():
        if isinstance(g, torch.Generator):
            if k not in state["torch_generators"]:
                raise CheckpointError(f"generator {k!r} is a torch.Generator now but was a numpy Generator when saved")
            g.set_state(state["torch_generators"][k])
        else:
            if k not in state["numpy_generators"]:
                raise CheckpointError(f"generator {k!r} is a numpy Generator now but was a torch.Generator when saved")
            g.bit_generator.state = json.loads(state["numpy_generators"][k])

"""Benchmarks of the streaming system (``astrolabe bench rollout|update``) and their measuring tools.

Memory on CPU (no allocator statistics there) is measured two ways, each configuration in a fresh
subprocess (:func:`run_in_subprocess`) so no configuration inherits another's heap:

- ``rss_peak_bytes``: the process's peak resident set (``VmHWM`` in ``/proc/self/status``) minus a baseline.
  After the model and the inputs are built, the peak is reset (``echo 5 > /proc/self/clear_refs``, Linux
  >= 4.0) and the baseline is the resident set at that moment; without ``clear_refs`` the baseline is the
  peak so far. It includes allocator slack and is coarse (pages, arenas).
- ``tensor_peak_bytes``: the peak of the bytes held by live tensor storages created during the measured
  work, tracked exactly by :class:`LiveTensorPeak` (a ``TorchDispatchMode`` that sees every op output,
  forward and backward, and a finaliser per storage). Deterministic; excludes non-tensor memory.

On CUDA both are replaced by ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start.
Timings use ``time.perf_counter`` (with ``torch.cuda.synchronize`` on CUDA); never assert them in tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_RESULT_TAG = "ASTROLABE_BENCH_RESULT "


# ----------------------------------------------------------------------------------- process memory


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def peak_rss_bytes() -> int:
    """Peak resident set of this process (``VmHWM``; ``getrusage`` where /proc is absent)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> int:
    """Reset the peak to the current resident set where Linux allows it; returns the new baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        log.debug("clear_refs unavailable; the RSS baseline is the peak so far")
    return peak_rss_bytes()


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (forward and backward ops alike).

    Every op output's storage is counted once when first seen and uncounted when it is freed (a
    ``weakref.finalize`` on the storage). Outputs that share an input's storage (views, in-place ops) are
    not new memory and are skipped, so slicing a tensor made before the mode does not count it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._track(storage)
        return out


@contextmanager
def measure(device: torch.device, track_tensors: bool = True) -> Iterator[dict[str, float]]:
    """Measure peak memory and wall time of the enclosed work into the yielded dict.

    Keys: ``time_s``, ``rss_peak_bytes`` (CPU) / ``cuda_peak_bytes`` (CUDA), ``tensor_peak_bytes`` (CPU, when
    ``track_tensors``; tracking slows the work, so time a separate untracked pass when timings matter).
    """
    out: dict[str, float] = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    mode = LiveTensorPeak() if track_tensors and not cuda else None
    t0 = time.perf_counter()
    if mode is not None:
        with mode:
            yield out
    else:
        yield out
    if cuda:
        torch.cuda.synchronize(device)
    out["time_s"] = time.perf_counter() - t0
    if cuda:
        out["cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated(device) - base)
    else:
        out["rss_peak_bytes"] = float(max(0, peak_rss_bytes() - base))
    if mode is not None:
        out["tensor_peak_bytes"] = float(mode.peak)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- fresh processes


def run_in_subprocess(func: Callable[..., dict[str, Any]], timeout_s: float = 1800.0, **kwargs: Any) -> dict[str, Any]:
    """Run ``func(**kwargs)`` (a module-level function, JSON-able kwargs and result) in a fresh interpreter."""
    code = "from astrolabe.bench import _child_main; _child_main()"
    args = [sys.executable, "-c", code, func.__module__, func.__qualname__, json.dumps(kwargs)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    raise RuntimeError(
        f"benchmark worker {func.__module__}.{func.__qualname__}({kwargs}) failed with exit code "
        f"{proc.returncode}:\n{proc.stderr[-4000:]}"
    )


def _child_main() -> None:
    """Entry point of :func:`run_in_subprocess`'s child: import, call, print the tagged JSON result."""
    import importlib

    module, name, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = getattr(importlib.import_module(module), name)(**kwargs)
    sys.stdout.write(_RESULT_TAG + json.dumps(result) + "\n")


def call(func: Callable[..., dict[str, Any]], fresh_process: bool, **kwargs: Any) -> dict[str, Any]:
    """``func(**kwargs)`` in a fresh subprocess or, for quick smoke runs, in this process."""
    return run_in_subprocess(func, **kwargs) if fresh_process else func(**kwargs)


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a measurement below the resolution)."""
    return a / b if b else float("nan")


def peak_key(device: str) -> str:
    """The peak-memory measurement of a device: ``cuda_peak_bytes`` on CUDA, ``rss_peak_bytes`` elsewhere."""
    return "cuda_peak_bytes" if device.startswith("cuda") else "rss_peak_bytes"


# ----------------------------------------------------------------------------------- shared set-up


@dataclass(frozen=True)
class StreamSetup:
    """Model and streaming settings shared by the rollout and update benchmarks.

    ``size``: a Wan size builder name (random weights); ``latent_hw``: latent (h, w); ``window`` /
    ``sink`` / ``block``: the attention window, sink and block sizes in latent frames (``window=None``:
    no rolling window); ``threads``: torch CPU threads (None = torch's default).
    """

    size: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    latent_hw: tuple[int, int] = (8, 8)
    window: int | None = 12
    sink: int = 3
    block: int = 3
    threads: int | None = None

    def worker_kwargs(self) -> dict[str, Any]:
        """The settings as JSON-able keyword arguments of a benchmark worker (``latent_hw`` as a list)."""
        return {**asdict(self), "latent_hw": list(self.latent_hw)}

    def require_cuda(self, bench: str) -> None:
        """Raise RuntimeError if this setup runs on CUDA but CUDA is not available."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"the GPU {bench} bench needs CUDA; run `astrolabe bench {bench}` for the CPU variant")


GPU_SETUP = StreamSetup(size="wan21_t2v_1_3b", device="cuda", dtype="bfloat16", latent_hw=(60, 104))
"""The GPU variant: Wan2.1 1.3B with random weights, bf16, 480x832 video (60x104 latents)."""


def build_model(size: str, device: str, dtype: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Wan DiT of a named size (``tiny``, ``wan21_t2v_1_3b``, ...) on ``device``."""
    from astrolabe.models.wan.config import build_config
    from astrolabe.models.wan.dit import WanDiT

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available; use device='cpu' with size='tiny'")
    model = WanDiT(build_config(size), attention_backend="sdpa")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device=device, dtype=getattr(torch, dtype))


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
